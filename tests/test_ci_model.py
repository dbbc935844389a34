"""The CI trace model's pure parts: forge timestamps, instance URLs, and the id derivation
both sides (webhooks and /v1/traceparent) share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.webhooks.pipeline import instance_of, job_span_id, parse_time, pipeline_span_id, trace_id, traceparent
from tests.ci_payloads import ns


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2016-08-12 15:23:28 UTC", ns("2016-08-12T15:23:28Z")),  # GitLab pipeline hook
        ("2021-02-23T02:41:37.886Z", ns("2021-02-23T02:41:37.886Z")),  # GitLab job hook
        ("2026-11-21T09:00:05+02:00", ns("2026-11-21T07:00:05Z")),  # Gitea with a zone
        ("2026-11-21T09:00:05.123456789Z", ns("2026-11-21T09:00:05.123456789Z")),  # nanoseconds kept
        ("0001-01-01T00:00:00Z", None),  # Go's zero time: unset
        ("", None),
        ("yesterday", None),
        (None, None),
        (1700000000, None),
    ],
)
def test_forge_times(text: object, expected: int | None) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://GitLab.Example.com/", "https://gitlab.example.com"),
        ("https://example.com:8443/gitlab", "https://example.com:8443/gitlab"),
        ("ftp://example.com", None),
        ("not a url", None),
    ],
)
def test_instances(url: str, expected: str | None) -> None:
    assert instance_of(url) == expected


@given(st.text(max_size=40), st.text(max_size=12), st.text(max_size=12), st.text(max_size=12))
def test_ids_are_well_formed_and_distinct_per_part(instance: str, project: str, pipeline: str, job: str) -> None:
    trace = trace_id(instance, project, pipeline)
    root = pipeline_span_id(instance, project, pipeline)
    span = job_span_id(instance, project, pipeline, job)
    assert len(trace) == 32 and len(root) == len(span) == 16
    assert int(trace, 16) and int(root, 16) and int(span, 16)
    assert root != span
    assert traceparent(instance, project, pipeline, job) == f"00-{trace}-{span}-01"
    assert trace_id(instance, project, pipeline + "1") != trace
    assert job_span_id(instance, project, pipeline, job, "2") != span


def test_the_readme_picture_is_what_the_code_draws() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("trace_svg", root / "docs" / "trace_svg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = module.render(module.spans())
    assert drawn == (root / "docs" / "ci-trace.svg").read_text(), "run: python docs/trace_svg.py"
    assert drawn.count("<rect x=") >= 5 + 4  # five spans, four queue shades
