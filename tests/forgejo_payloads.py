"""Forgejo's own Actions webhook deliveries, shaped after Forgejo's source: ``modules/structs``
(``hook.go``: ``ActionPayload`` {action, run, prior_status, last_run}, ``WorkflowRunPayload``
{action, run}, ``WorkflowJobPayload`` {action, job, run}; ``action.go``: ``ActionRun``,
``ActionRunJob``; ``repo_actions.go``: ``ActionWorkflowJob`` for the Gitea-shaped
``workflow_job``), ``services/webhook/notifier.go`` (which event carries which payload:
``X-Forgejo-Event`` is ``action_run_<success|failure|recover>``, ``workflow_run_<status>``,
``workflow_job_<status>``) and ``services/convert`` (``ToActionRun``, ``ToActionRunJob``).

Go's encoding: times are RFC 3339 (``time.Time``), unset ones Go's zero time; ``duration`` is
nanoseconds; ``ScheduleID`` has no JSON tag. ``ActionRunJob`` differs between releases: one
carries the job's ``started``/``stopped``/``created``/``updated`` and no attempt
(:func:`job_with_times`), the newest ``attempt`` and ``handle`` and no times (:func:`job_newest`).

The run: 901 (``index_in_repo`` 42) of payments/api (repository 7) on forgejo.example.com;
job 2001 ``build`` passes, job 2002 ``test`` fails, then is re-run and passes.
"""

from __future__ import annotations

import json
from typing import Any

from tests import gitea_payloads as g

HOST = "https://forgejo.example.com"
RUN_ID, RUN_INDEX, REPO_ID = 901, 42, 7
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
ZERO = "0001-01-01T00:00:00Z"
#: (started, stopped) of the run per final status: the first attempt failed, the re-run passed.
RUN_TIMES = {
    "failure": ("2026-11-21T10:00:02+00:00", "2026-11-21T10:04:30+00:00"),
    "success": ("2026-11-21T10:20:00+00:00", "2026-11-21T10:23:10+00:00"),
}
#: Job times (created, started, stopped), per (job id, final status).
JOB_TIMES = {
    (2001, "success"): ("2026-11-21T10:00:01Z", "2026-11-21T10:00:05.5Z", "2026-11-21T10:01:40Z"),
    (2002, "failure"): ("2026-11-21T10:01:41Z", "2026-11-21T10:01:44Z", "2026-11-21T10:04:29Z"),
    (2002, "success"): ("2026-11-21T10:20:00Z", "2026-11-21T10:20:03Z", "2026-11-21T10:23:09Z"),
}
JOB_NAMES = {2001: "build", 2002: "test"}


def run(status: str, *, final: str = "failure") -> dict[str, Any]:
    """``convert.ToActionRun``: ``status`` now; ``final`` chooses the attempt's times."""
    started, stopped = RUN_TIMES[final]
    done = status in ("success", "failure", "cancelled", "skipped")
    return {
        "id": RUN_ID,
        "title": "Fix rounding in invoice totals",
        "repository": g.repository("payments/api", host=HOST),
        "workflow_id": "ci.yml",
        "index_in_repo": RUN_INDEX,
        "trigger_user": g.user("alice"),
        "ScheduleID": 0,
        "prettyref": "main",
        "is_ref_deleted": False,
        "commit_sha": SHA,
        "is_fork_pull_request": False,
        "need_approval": False,
        "approved_by": 0,
        "event": "push",
        "event_payload": json.dumps({"ref": "refs/heads/main", "after": SHA}),
        "trigger_event": "push",
        "status": status,
        "started": started if status != "waiting" else ZERO,
        "stopped": stopped if done else ZERO,
        "created": "2026-11-21T10:00:00Z",
        "updated": stopped if done else started,
        "duration": 268_000_000_000 if done else 0,
        "html_url": f"{HOST}/payments/api/actions/runs/{RUN_INDEX}",
    }


def action_run(status: str, action: str, *, prior: str = "running", last: str | None = None) -> dict[str, Any]:
    """``action_run_<action>``: ``ActionPayload`` for a run now done (``action`` success,
    failure or recover; ``last``: the previous run of the workflow's status)."""
    body: dict[str, Any] = {"action": action, "run": run(status, final=status), "prior_status": prior}
    if last is not None:
        body["last_run"] = {**run(last, final=last), "id": RUN_ID - 1, "index_in_repo": RUN_INDEX - 1}
    return body


def workflow_run(status: str, action: str, *, final: str = "failure") -> dict[str, Any]:
    """``workflow_run_<status>``: ``WorkflowRunPayload`` (``action`` new_run_attempt,
    run_status_changed or run_completed)."""
    return {"action": action, "run": run(status, final=final)}


def job_with_times(job_id: int, status: str, *, final: str) -> dict[str, Any]:
    """``ActionRunJob`` as the release whose ``ToActionRunJob(ctx, job)`` sends the job's
    times and ``run_id``, but no attempt. ``final``: the attempt's final status (its times)."""
    created, started, stopped = JOB_TIMES[job_id, final]
    done = status == final
    return {
        "id": job_id,
        "run_id": RUN_ID,
        "repo_id": REPO_ID,
        "owner_id": 3,
        "name": JOB_NAMES[job_id],
        "needs": ["build"] if job_id == 2002 else [],
        "runs_on": ["docker"],
        "task_id": job_id * 10 + (2 if final == "success" and job_id == 2002 else 1),
        "status": status,
        "started": started if status not in ("waiting", "blocked") else ZERO,
        "stopped": stopped if done else ZERO,
        "created": created,
        "updated": stopped if done else started,
        "html_url": f"{HOST}/payments/api/actions/runs/{RUN_INDEX}/jobs/{job_id - 2001}",
    }


def job_newest(job_id: int, status: str, *, attempt: int = 1) -> dict[str, Any]:
    """``ActionRunJob`` as the newest releases send it: ``attempt`` and ``handle``, no times."""
    return {
        "id": job_id,
        "run_id": RUN_ID,
        "attempt": attempt,
        "handle": f"{job_id:08x}-0000-4000-8000-{attempt:012d}",
        "repo_id": REPO_ID,
        "owner_id": 3,
        "name": JOB_NAMES[job_id],
        "html_url": f"{HOST}/payments/api/actions/runs/{RUN_INDEX}/jobs/{job_id - 2001}/attempt/{attempt}",
        "needs": ["build"] if job_id == 2002 else [],
        "runs_on": ["docker"],
        "task_id": job_id * 10 + attempt,
        "status": status,
    }


def workflow_job(job: dict[str, Any], action: str, *, run_status: str = "running") -> dict[str, Any]:
    """``workflow_job_<job status>``: ``WorkflowJobPayload`` (``action`` new_job_attempt,
    job_status_changed or job_completed) with the job's run as it stands."""
    return {"action": action, "job": job, "run": run(run_status)}


def gitea_shaped_job(status: str, *, attempt: int) -> dict[str, Any]:
    """Forgejo's ``workflow_job`` in Gitea's shape (``WorkflowJobStatusUpdate``:
    ``ActionWorkflowJob``): ``action`` and ``status`` are Forgejo's job status, there is no
    ``conclusion``; steps carry a status only; unset times are left out or null."""
    final = "failure" if attempt == 1 else "success"
    created, started, stopped = JOB_TIMES[2002, final]
    done = status in ("success", "failure", "cancelled", "skipped")
    steps = [
        {"name": "Set up job", "number": 0, "status": "success", "started_at": started, "completed_at": started},
        {"name": "Run tests", "number": 1, "status": final if done else "running", "started_at": started}
        | ({"completed_at": stopped} if done else {}),
    ]
    job: dict[str, Any] = {
        "id": 2002,
        "html_url": f"{HOST}/payments/api/actions/runs/{RUN_INDEX}/jobs/1",
        "run_id": RUN_ID,
        "run_url": f"{HOST}/api/v1/repos/payments/api/actions/runs/{RUN_ID}",
        "workflow_name": "ci.yml",
        "name": "test",
        "labels": ["docker"],
        "run_attempt": attempt,
        "head_sha": SHA,
        "head_branch": "main",
        "status": status,
        "runner_id": 4,
        "runner_name": "forgejo-runner-1",
        "steps": steps,
        "created_at": created,
        "started_at": started,
    }
    if done:
        job["completed_at"] = stopped
    return {
        "action": status,
        "workflow_job": job,
        "repository": g.repository("payments/api", host=HOST),
        "sender": g.user("alice"),
    }
