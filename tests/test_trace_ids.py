"""Trace ids that line up with other producers (``trace_ids:``): each derivation pinned
against values worked out by hand from its published algorithm — never by calling
tracegate — and the choices no job could join refused by ``tracegate check``.

The algorithms, as written where they are published:

* tracegate (docs/pipeline-traces.md, proxy/ci/trace_ids.py): SHA-256 of the
  NUL-joined ("tracegate-cicd-trace", instance, project id, run id), first 32 hex digits;
  the root span the same over "tracegate-cicd-pipeline", first 16; a job's over
  ("tracegate-cicd-job", instance, project, run, job id, attempt), first 16.
* the OpenTelemetry Collector githubreceiver (opentelemetry-collector-contrib,
  receiver/githubreceiver/trace_event_handling.go): ``newTraceID`` sha256("<run_id><run_attempt>t")
  [:32]; ``newParentSpanID`` sha256("<run_id><run_attempt>s")[16:32];
  ``newSpanIDFromCheckRun`` sha256("<check_run_id>-j" | "-q" | "-<step name>-s")[16:32].
  Its golden file (testdata/workflow-job-expected.yaml) shows the trace and root ids it drew
  for run 14460881260, attempt 13: those two are the Collector's own output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.ci import trace_ids
from proxy.ci.pipeline import CiSpan, RunId
from proxy.cli import main

# tracegate, for https://github.com, repository 424242, run 22259804324, job 63077711001 attempt 2:
# printf 'tracegate-cicd-trace\0https://github.com\0424242\022259804324' | sha256sum → cafa49e5…
TG_TRACE = "cafa49e54e37fedc835eaa56ff0a482d"
TG_ROOT = "d6df7cf59d711065"
TG_JOB = "01328c0c3d0eace6"
# tracegate, GitLab pipeline 99001 of project 4242 on https://gitlab.example.com, job 880013 (no attempt).
TG_GITLAB_TRACE = "72bafae5db7a322752f22c554f788d13"
TG_GITLAB_JOB = "26587fb7e45c6d4c"

# The Collector: its golden output for run 14460881260 attempt 13, and check run 40685651258's
# job, queue and "Set up job" step span ids (echo -n '40685651258-j' | sha256sum, digits 16–32).
OC_TRACE = "731ec8a47fd7450f753a812a4a8aa5a0"
OC_ROOT = "aba151af7cfbcf0f"
OC_JOB = "2b09b38c69b64a9c"
OC_QUEUE = "79ff76cc79430e14"
OC_STEP = "d592338e114eb265"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_pinned_values_are_the_published_algorithms() -> None:
    """The constants, from the algorithms' text (a check on the hand-written hex)."""
    nul = "\0"
    assert _sha(nul.join(("tracegate-cicd-trace", "https://github.com", "424242", "22259804324")))[:32] == TG_TRACE
    assert _sha(nul.join(("tracegate-cicd-pipeline", "https://github.com", "424242", "22259804324")))[:16] == TG_ROOT
    job = ("tracegate-cicd-job", "https://github.com", "424242", "22259804324", "63077711001", "2")
    assert _sha(nul.join(job))[:16] == TG_JOB
    assert _sha("14460881260" + "13" + "t")[:32] == OC_TRACE
    assert _sha("14460881260" + "13" + "s")[16:32] == OC_ROOT
    assert (_sha("40685651258-j")[16:32], _sha("40685651258-q")[16:32]) == (OC_JOB, OC_QUEUE)
    assert _sha("40685651258-Set up job-s")[16:32] == OC_STEP


def test_tracegate_ids_are_pinned() -> None:
    assert trace_ids.trace_id("https://github.com", "424242", "22259804324") == TG_TRACE
    assert trace_ids.pipeline_span_id("https://github.com", "424242", "22259804324") == TG_ROOT
    assert trace_ids.job_span_id("https://github.com", "424242", "22259804324", "63077711001", "2") == TG_JOB
    run = RunId("https://github.com", "424242", "22259804324", attempt="7")  # the attempt keys nothing here
    assert (run.trace_id, run.root_span_id, run.job_span_id("63077711001", "2")) == (TG_TRACE, TG_ROOT, TG_JOB)
    gitlab = RunId("https://gitlab.example.com", "4242", "99001")
    job = CiSpan(run=gitlab, name="job", start_ns=1, end_ns=2, result="success", attributes={}, job_id="880013")
    assert (job.run.trace_id, job.span_id, job.parent_span_id) == (TG_GITLAB_TRACE, TG_GITLAB_JOB, gitlab.root_span_id)


def test_otel_collector_ids_are_the_githubreceivers() -> None:
    assert trace_ids.collector_trace_id("14460881260", "13") == OC_TRACE
    assert trace_ids.collector_root_span_id("14460881260", "13") == OC_ROOT
    assert trace_ids.collector_job_span_id("40685651258") == OC_JOB
    assert trace_ids.collector_queue_span_id("40685651258") == OC_QUEUE
    assert trace_ids.collector_step_span_id("40685651258", "Set up job") == OC_STEP
    run = RunId("https://github.com", "614849916", "14460881260", scheme="otel-collector", attempt="13")
    job = CiSpan(run=run, name="job", start_ns=1, end_ns=2, result="success", attributes={}, job_id="40685651258")
    assert (run.trace_id, run.root_span_id, job.span_id, job.parent_span_id) == (OC_TRACE, OC_ROOT, OC_JOB, OC_ROOT)
    # Each attempt is its own trace there; the instance and repository key nothing.
    other = RunId("https://ghe.example.com", "1", "14460881260", scheme="otel-collector", attempt="14")
    assert other.trace_id != OC_TRACE and other.job_span_id("40685651258") == OC_JOB
    # Switching a repository's ids is a new outbox row, not a duplicate of the old span.
    tracegate = CiSpan(
        run=RunId("https://github.com", "614849916", "14460881260"),
        name="job",
        start_ns=1,
        end_ns=2,
        result="success",
        attributes={},
        job_id="40685651258",
        attempt="13",
    )
    assert tracegate.outbox_key("github") != job.outbox_key("github")


HEAD = """
service_accounts:
  ci:
    access_token: {env: LS}
webhooks:
"""


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "{name: gl, source: gitlab, project_id: 1, secret: [{env: H}], service_account: ci, trace_ids: gitlab}",
            "webhook 'gl'.trace_ids 'gitlab': GitLab derives its CI Job Telemetry trace id from the root pipeline's "
            "id but has not published how",
        ),
        (
            "{name: gh, source: github, repository_id: 2, secret: [{env: H}], service_account: ci, "
            "events: [workflow_run], trace_ids: gitlab}",
            "a job of a child pipeline cannot learn its root pipeline's id from its ID token; use tracegate",
        ),
        (
            "{name: gl, source: gitlab, project_id: 1, secret: [{env: H}], service_account: ci, "
            "trace_ids: otel-collector}",
            "webhook 'gl'.trace_ids 'otel-collector': the Collector's githubreceiver derives ids for GitHub runs; its "
            "gitlabreceiver keys the trace on the pipeline's finished_at, which a running job cannot know",
        ),
        (
            "{name: fj, source: forgejo, repository: a/b, secret: [{env: H}], service_account: ci, "
            "events: [workflow_job], trace_ids: otel-collector}",
            "a Gitea or Forgejo job's token names no job (check_run_id)",
        ),
        (
            "{name: gh, source: github, repository_id: 2, secret: [{env: H}], service_account: ci, "
            "events: [workflow_run], trace_ids: jaeger}",
            "webhook 'gh'.trace_ids 'jaeger': must be one of tracegate, otel-collector, gitlab",
        ),
        (
            "{name: gh, source: github, repository_id: 2, repository: a/b, secret: [{env: H}], service_account: ci, "
            "events: [workflow_run]}",
            "webhook 'gh': repository_id and repository in one entry",
        ),
        (
            "{name: gh, source: github, project_id: 2, secret: [{env: H}], service_account: ci, events: [push]}",
            "webhook 'gh': project_id is for source: gitlab; use repository_id",
        ),
        (
            "{name: gt, source: gitea, repository_id: 2, secret: [{env: H}], service_account: ci, services: [s]}",
            "webhook 'gt': repository_id is for source: github; use repository",
        ),
        (
            "{name: gh, source: github, repository_id: 2, secret: [{env: H}], service_account: ci}",
            "webhook 'gh' is missing 'services' (the services its push/release/deployment_status markers go to)",
        ),
    ],
)
def test_check_refuses_what_no_job_could_join(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, expected: str
) -> None:
    (tmp_path / "p.yaml").write_text(HEAD + f"  - {entry}\n")
    assert main(["check", str(tmp_path)], environ={"LS": "k", "H": "h"}) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'p.yaml'}:6: " in out and expected in out, out


def test_check_takes_collector_ids_for_github_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.policy import load_policy
    from proxy.policy.webhooks import trace_ids_of

    entry = (
        "{name: gh, source: github, repository_id: [2, 3], secret: [{env: H}], service_account: ci, "
        "events: [workflow_run, workflow_job], trace_ids: otel-collector, instance: 'https://github.com'}"
    )
    plain = "{name: gt, source: gitea, repository: a/b, secret: [{env: H}], service_account: ci, services: [s]}"
    (tmp_path / "p.yaml").write_text(HEAD + f"  - {entry}\n  - {plain}\n")
    assert main(["check", str(tmp_path)], environ={"LS": "k", "H": "h"}) == 0, capsys.readouterr().out
    collector, gitea = load_policy(tmp_path, environ={"LS": "k", "H": "h"}).webhooks
    assert (trace_ids_of(collector), collector.project_ids, str(collector.source)) == (
        "otel-collector",
        frozenset({"2", "3"}),
        "github",
    )
    assert trace_ids_of(gitea) == "tracegate"
