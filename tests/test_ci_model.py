"""The CI trace model's pure parts: forge timestamps, instance URLs, and the id derivation
both sides (webhooks and /v1/traceparent) share."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ci.pipeline import instance_of, job_span_id, parse_time, pipeline_span_id, trace_id, traceparent
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
        ("https://gitlab.example.com:443", "https://gitlab.example.com"),
        ("http://127.0.0.1:80/", "http://127.0.0.1"),
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


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


def _mutations() -> st.SearchStrategy[dict[str, object]]:
    """Documented payloads with one field anywhere replaced by arbitrary JSON."""
    from tests import ci_payloads as c

    bases = [c.gitlab_pipeline(), c.gitlab_job(880011), c.gitea_run(), c.gitea_job()]

    def mutate(base: dict[str, object], path: list[int], value: object) -> dict[str, object]:
        node: object = base
        for step in path:
            if isinstance(node, dict) and node:
                key = sorted(node)[step % len(node)]
                if not isinstance(node[key], (dict, list)) or step % 3 == 0:
                    node[key] = value
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                node = node[step % len(node)]
        return base

    return st.builds(mutate, st.sampled_from(bases), st.lists(st.integers(0, 50), min_size=1, max_size=4), _json)


@given(_mutations())
def test_no_payload_breaks_the_span_builders(payload: dict[str, object]) -> None:
    from proxy.ci import actions, gitlab
    from proxy.ci.pipeline import CiSpan, otlp_json

    results: list[object] = [
        gitlab.spans_for(event, payload, "https://gitlab.example.com", with_jobs=True)
        for event in ("Pipeline Hook", "Job Hook")
    ]
    results += [actions.spans_for(event, payload) for event in actions.EVENTS]
    gitlab.instance_for(payload, None)
    for result in results:
        spans = result.spans if isinstance(result, gitlab.Spans) else [result] if isinstance(result, CiSpan) else []
        for span in spans:
            [encoded] = json.loads(otlp_json([span], "ci/x", "gitlab"))["resourceSpans"][0]["scopeSpans"][0]["spans"]
            assert 0 < int(encoded["startTimeUnixNano"]) <= int(encoded["endTimeUnixNano"])
            span.outbox_key("gitlab")


def test_the_outbox_key_is_the_spans_ids_and_final_state_not_its_times() -> None:
    from dataclasses import replace

    from proxy.ci.pipeline import CiSpan, RunId

    span = CiSpan(
        RunId("https://g.example", "1", "2"), "job x", 10, 50, "success", {}, job_id="3", final_state="success"
    )
    key = span.outbox_key("gitlab")
    assert replace(span, start_ns=20, end_ns=90, name="job y").outbox_key("gitlab") == key
    others = [
        replace(span, final_state="skipped"),
        replace(span, attempt="2"),
        replace(span, job_id="4"),
        replace(span, job_id=None),
        replace(span, run=RunId("https://g.example", "1", "3")),
        replace(span, run=RunId("https://h.example", "1", "2")),
    ]
    assert len({key, *(s.outbox_key("gitlab") for s in others)}) == 1 + len(others)
