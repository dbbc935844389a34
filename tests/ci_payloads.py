"""CI webhook payloads built from the documented shapes in ``examples/webhooks/`` (GitLab's
Pipeline Hook and Job Hook, Gitea's workflow_run and workflow_job), and the headers each
forge sends with them."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "webhooks"
PROJECT_ID, PIPELINE_ID = 4242, 99001


def example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    return loaded


def ns(text: str) -> int:
    """An ISO 8601 UTC time as Unix nanoseconds, computed independently of tracegate."""
    whole, _, fraction = text.removesuffix("Z").partition(".")
    moment = datetime.fromisoformat(whole + "+00:00")
    return int(moment.timestamp()) * 1_000_000_000 + int((fraction + "000000000")[:9])


def gitlab_time(iso: str) -> str:
    """GitLab's pipeline-hook form of a time: ``2026-11-21 08:00:00 UTC`` (whole seconds)."""
    return iso.removesuffix("Z").split(".")[0].replace("T", " ") + " UTC"


# The jobs of pipeline 99001: (id, name, stage, final status, created, started, finished, failure).
# unit-tests failed (880011) and was retried (880013); lint failed.
JOBS = [
    (880010, "compile", "build", "success", "2026-11-21T08:00:00.000Z", "2026-11-21T08:00:04.250Z",
     "2026-11-21T08:01:30.500Z", None),
    (880011, "unit-tests", "test", "failed", "2026-11-21T08:01:30.125Z", "2026-11-21T08:01:32.750Z",
     "2026-11-21T08:03:09.500Z", "script_failure"),
    (880012, "lint", "test", "failed", "2026-11-21T08:01:30.130Z", "2026-11-21T08:01:33.000Z",
     "2026-11-21T08:02:10.000Z", "script_failure"),
    (880013, "unit-tests", "test", "success", "2026-11-21T08:03:10.000Z", "2026-11-21T08:03:15.000Z",
     "2026-11-21T08:06:40.000Z", None),
]  # fmt: skip
PIPELINE_CREATED, PIPELINE_FINISHED = "2026-11-21T08:00:00Z", "2026-11-21T08:06:40Z"


def gitlab_job(job_id: int, status: str | None = None, *, project_id: int = PROJECT_ID) -> dict[str, Any]:
    """The Job Hook for one job of :data:`JOBS` in ``status`` (default: its final one);
    intermediate statuses carry no finish (and ``created``/``pending`` no start)."""
    _, name, stage, final, created, started, finished, failure = next(j for j in JOBS if j[0] == job_id)
    status = status or final
    body = example("gitlab-job.json")
    body.update(
        build_id=job_id,
        build_name=name,
        build_stage=stage,
        build_status=status,
        pipeline_id=PIPELINE_ID,
        project_id=project_id,
        build_failure_reason=failure if status == "failed" else None,
    )
    body["project"]["id"] = project_id
    times = {
        "build_created_at": created,
        "build_started_at": None if status in ("created", "pending") else started,
        "build_finished_at": finished if status == final else None,
    }
    for key, value in times.items():
        body[key] = body[key + "_iso"] = value
    body["build_duration"] = (ns(finished) - ns(started)) / 1e9 if status == final else None
    body["build_queued_duration"] = (ns(started) - ns(created)) / 1e9
    return body


def gitlab_pipeline(status: str = "failed", *, project_id: int = PROJECT_ID) -> dict[str, Any]:
    """The Pipeline Hook; ``builds[]`` holds the latest attempt of each job only (880011 is
    gone: GitLab replaced it with its retry 880013)."""
    body = example("gitlab-pipeline.json")
    attrs = body["object_attributes"]
    attrs.update(status=status, created_at=gitlab_time(PIPELINE_CREATED))
    attrs["finished_at"] = gitlab_time(PIPELINE_FINISHED) if status in ("failed", "success") else None
    body["project"]["id"] = project_id
    template = body["builds"][0]
    builds = []
    for job_id, name, stage, final, created, started, finished, failure in JOBS:
        if job_id == 880011:
            continue
        build = copy.deepcopy(template)
        build.update(
            id=job_id,
            name=name,
            stage=stage,
            status=final,
            created_at=gitlab_time(created),
            started_at=gitlab_time(started),
            finished_at=gitlab_time(finished),
            failure_reason=failure,
        )
        builds.append(build)
    body["builds"] = builds
    return body


def gitlab_headers(event: str, token: str | None, *, instance: str, uuid_: str | None = None) -> dict[str, str]:
    """Headers as GitLab sends them. A retry of a delivery repeats its UUID and Idempotency-Key."""
    key = uuid_ or str(uuid.uuid4())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/18.5.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Webhook-UUID": "5d5a7c0e-6a7b-4c1e-9f00-0a1b2c3d4e5f",
        "X-Gitlab-Instance": instance,
        "X-Gitlab-Event-UUID": key,
        "Idempotency-Key": key,
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers


# Gitea Actions: run 512 of payments/api; job 1301 failed on attempt 1 and passed on attempt 2.
def gitea_run(status: str = "completed", conclusion: str = "success", attempt: int = 2) -> dict[str, Any]:
    body = example("gitea-workflow-run.json")
    run = body["workflow_run"]
    run.update(status=status, conclusion=conclusion if status == "completed" else "", run_attempt=attempt)
    if status != "completed":
        body["action"] = "in_progress"
        run["completed_at"] = "0001-01-01T00:00:00Z"
    if attempt == 2:
        run["started_at"], run["completed_at"] = "2026-11-21T09:00:00Z", "2026-11-21T09:10:00Z"
    return body


def gitea_job(status: str = "completed", attempt: int = 1) -> dict[str, Any]:
    body = example("gitea-workflow-job.json")
    job = body["workflow_job"]
    job["run_attempt"] = attempt
    if attempt == 2:
        job.update(
            conclusion="success",
            created_at="2026-11-21T09:05:00Z",
            started_at="2026-11-21T09:05:02Z",
            completed_at="2026-11-21T09:09:58Z",
            steps=[
                {
                    "name": "Run tests",
                    "number": 1,
                    "status": "completed",
                    "conclusion": "success",
                    "started_at": "2026-11-21T09:05:03Z",
                    "completed_at": "2026-11-21T09:09:50Z",
                }
            ],
        )
    if status != "completed":
        body["action"] = status
        job.update(status=status, conclusion="", completed_at="0001-01-01T00:00:00Z")
        if status == "queued":
            job["started_at"] = "0001-01-01T00:00:00Z"
    return body


# Downstream pipelines of pipeline 99001 (GitLab's pipeline hook for a pipeline with a
# source pipeline: lib/gitlab/data_builder/pipeline.rb, source_pipeline_attrs): the trigger
# jobs (bridges, which send no hook of their own) 880020 and 880021.
CHILD_PIPELINE_ID, CHILD_JOB_ID, BRIDGE_CHILD = 99002, 880030, 880020
DOWNSTREAM_PROJECT_ID, DOWNSTREAM_PIPELINE_ID, BRIDGE_DOWNSTREAM = 5252, 99003, 880021


def gitlab_downstream_pipeline(
    pipeline_id: int, *, project_id: int, source: str, job_id: int, status: str = "success"
) -> dict[str, Any]:
    """The Pipeline Hook of a pipeline triggered by job ``job_id`` of pipeline 99001 (project
    4242): ``source`` ``parent_pipeline`` (a child pipeline, same project) or ``pipeline`` (a
    multi-project pipeline); ``source_pipeline`` names the upstream project, pipeline and job."""
    body = gitlab_pipeline(status, project_id=project_id)
    attrs = body["object_attributes"]
    attrs.update(id=pipeline_id, iid=pipeline_id - 98700, source=source, name=f"downstream {pipeline_id}")
    attrs["url"] = attrs["url"].replace(str(PIPELINE_ID), str(pipeline_id))
    if project_id != PROJECT_ID:
        body["project"].update(
            path_with_namespace="payments/deploy", web_url="https://gitlab.example.com/payments/deploy"
        )
        attrs["url"] = f"https://gitlab.example.com/payments/deploy/-/pipelines/{pipeline_id}"
    body["source_pipeline"] = {
        "project": {
            "id": PROJECT_ID,
            "web_url": "https://gitlab.example.com/payments/api",
            "path_with_namespace": "payments/api",
        },
        "job_id": job_id,
        "pipeline_id": PIPELINE_ID,
    }
    for offset, build in enumerate(body["builds"]):
        build["id"] = pipeline_id * 10 + offset
    return body


def gitlab_child_job() -> dict[str, Any]:
    """The Job Hook of the child pipeline's job: it names its own pipeline only."""
    body = gitlab_job(880010)
    body.update(build_id=CHILD_JOB_ID, pipeline_id=CHILD_PIPELINE_ID)
    body["commit"]["id"] = CHILD_PIPELINE_ID
    return body
