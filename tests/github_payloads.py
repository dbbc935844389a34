"""GitHub webhook deliveries shaped after GitHub's documentation ("Webhook events and
payloads": ``push``, ``deployment_status``, ``workflow_run``, ``workflow_job``, ``ping``;
"Validating webhook deliveries": HMAC-SHA256 of the raw body, ``sha256=`` in
``X-Hub-Signature-256``), with the headers GitHub sends. Numbers are strings nowhere: GitHub
sends ids as JSON numbers and times as ISO 8601 with ``Z``; a queued job's runner fields
and an unfinished job's ``conclusion``/``completed_at`` are null.

The run of :func:`collector_run` / :func:`collector_job` has the ids of the recorded
``workflow_job`` delivery in the OpenTelemetry Collector's githubreceiver test data
(run 14460881260, attempt 13, job 40685651258, steps "Set up job" and on), so the ids
tracegate draws for it can be held against the ones the Collector drew for the same run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any
from urllib.parse import urlencode

REPO_ID, REPO = 424242, "payments-org/api"
RUN_ID, JOB_ID, RERUN_JOB_ID = 22259804324, 63077711001, 63077799002
HEAD_SHA = "c040cae0f0dc81641728557b80f09cfa23b83fe5"
BEFORE = "9d0c1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b"
DEPLOY_SHA = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081"

# The Collector's recorded run (receiver/githubreceiver/testdata/workflow-job-completed.json).
COLLECTOR_REPO_ID, COLLECTOR_REPO = 614849916, "open-telemetry/open-telemetry-otel-collector"
COLLECTOR_RUN, COLLECTOR_ATTEMPT, COLLECTOR_JOB = 14460881260, 13, 40685651258


def user(login: str = "alice", id_: int = 1001) -> dict[str, Any]:
    return {
        "login": login,
        "id": id_,
        "node_id": "MDQ6VXNlcjEwMDE=",
        "avatar_url": f"https://avatars.githubusercontent.com/u/{id_}?v=4",
        "url": f"https://api.github.com/users/{login}",
        "html_url": f"https://github.com/{login}",
        "type": "User",
        "site_admin": False,
    }


def repository(full_name: str = REPO, id_: int = REPO_ID, host: str = "https://github.com") -> dict[str, Any]:
    owner, name = full_name.split("/", 1)
    return {
        "id": id_,
        "node_id": "R_kgDOGe5Kkg",
        "name": name,
        "full_name": full_name,
        "private": True,
        "owner": {**user(owner, 2020), "type": "Organization"},
        "html_url": f"{host}/{full_name}",
        "url": f"https://api.github.com/repos/{full_name}",
        "clone_url": f"{host}/{full_name}.git",
        "default_branch": "main",
        "visibility": "private",
    }


def push(
    ref: str = "refs/heads/main", after: str = HEAD_SHA, repo: str = REPO, host: str = "https://github.com"
) -> dict[str, Any]:
    commit = {
        "id": after,
        "tree_id": "f1e2d3c4b5a6978869504132231405f6e7d8c9b0",
        "distinct": True,
        "message": "Round invoice totals half-even\n\nLonger body.",
        "timestamp": "2026-11-21T08:59:31Z",
        "url": f"{host}/{repo}/commit/{after}",
        "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": [],
        "removed": [],
        "modified": ["invoice.py"],
    }
    return {
        "ref": ref,
        "before": BEFORE,
        "after": after,
        "repository": repository(repo, host=host),
        "pusher": {"name": "alice", "email": "alice@example.com"},
        "sender": user(),
        "created": False,
        "deleted": after == "0" * 40,
        "forced": False,
        "base_ref": None,
        "compare": f"{host}/{repo}/compare/{BEFORE[:12]}...{after[:12]}",
        "commits": [commit],
        "head_commit": commit,
    }


def deployment_status(
    state: str = "success", environment: str = "production", ref: str = "main", host: str = "https://github.com"
) -> dict[str, Any]:
    deployment = {
        "url": f"https://api.github.com/repos/{REPO}/deployments/1818",
        "id": 1818,
        "node_id": "DE_kwDOGe5Kks4AAAcK",
        "sha": DEPLOY_SHA,
        "ref": ref,
        "task": "deploy",
        "payload": {},
        "original_environment": environment,
        "environment": environment,
        "description": "Deploy 2026.11.21",
        "creator": user("deploy-bot", 4242),
        "created_at": "2026-11-21T10:00:00Z",
        "updated_at": "2026-11-21T10:02:10Z",
        "production_environment": environment == "production",
    }
    status = {
        "url": f"https://api.github.com/repos/{REPO}/deployments/1818/statuses/9090",
        "id": 9090,
        "state": state,
        "creator": user("deploy-bot", 4242),
        "description": "",
        "environment": environment,
        "target_url": "",
        "log_url": f"https://github.com/{REPO}/actions/runs/{RUN_ID}",
        "created_at": "2026-11-21T10:02:10Z",
        "updated_at": "2026-11-21T10:02:10Z",
    }
    return {
        "action": "created",
        "deployment_status": status,
        "deployment": deployment,
        "repository": repository(host=host),
        "sender": user("deploy-bot", 4242),
    }


def ping() -> dict[str, Any]:
    return {
        "zen": "Design for failure.",
        "hook_id": 501,
        "hook": {
            "type": "Repository",
            "id": 501,
            "name": "web",
            "active": True,
            "events": ["push", "deployment_status", "workflow_job", "workflow_run"],
            "config": {
                "content_type": "json",
                "insecure_ssl": "0",
                "url": "https://tracegate.example.com/webhooks/github",
            },
        },
        "repository": repository(),
        "sender": user(),
    }


def workflow_run(
    status: str = "completed",
    conclusion: str | None = "success",
    attempt: int = 1,
    *,
    run_id: int = RUN_ID,
    repo: str = REPO,
    repo_id: int = REPO_ID,
    host: str = "https://github.com",
) -> dict[str, Any]:
    """A ``workflow_run`` delivery: ``requested`` → ``in_progress`` → ``completed``. A run has no
    ``completed_at``: it ends at ``updated_at``; it starts at ``run_started_at``."""
    finished = status == "completed"
    times = {1: ("2026-11-21T09:00:00Z", "2026-11-21T09:06:40Z"), 2: ("2026-11-21T09:20:00Z", "2026-11-21T09:24:30Z")}
    started, updated = times.get(attempt, times[1])
    run = {
        "id": run_id,
        "name": "CI",
        "node_id": "WFR_kwLOGe5Kks8AAAAFLrJ4pA",
        "head_branch": "main",
        "head_sha": HEAD_SHA,
        "path": ".github/workflows/ci.yml",
        "display_title": "Round invoice totals half-even",
        "run_number": 42,
        "event": "push",
        "status": status,
        "conclusion": conclusion if finished else None,
        "workflow_id": 111222,
        "check_suite_id": 31415926,
        "url": f"https://api.github.com/repos/{repo}/actions/runs/{run_id}",
        "html_url": f"{host}/{repo}/actions/runs/{run_id}",
        "created_at": started,
        "updated_at": updated if finished else started,
        "run_attempt": attempt,
        "run_started_at": started,
        "actor": user(),
        "triggering_actor": user(),
        "previous_attempt_url": (
            f"https://api.github.com/repos/{repo}/actions/runs/{run_id}/attempts/{attempt - 1}" if attempt > 1 else None
        ),
        "head_commit": {"id": HEAD_SHA, "message": "Round invoice totals half-even"},
    }
    return {
        "action": "completed" if finished else ("requested" if status == "queued" else "in_progress"),
        "workflow_run": run,
        "workflow": {"id": 111222, "name": "CI", "path": ".github/workflows/ci.yml", "state": "active"},
        "repository": repository(repo, repo_id, host),
        "sender": user(),
    }


def step(number: int, name: str, conclusion: str | None, started: str | None, completed: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "status": "completed" if conclusion else "queued",
        "conclusion": conclusion,
        "number": number,
        "started_at": started,
        "completed_at": completed,
    }


def workflow_job(
    status: str = "completed",
    *,
    job_id: int = JOB_ID,
    attempt: int = 1,
    conclusion: str = "failure",
    run_id: int = RUN_ID,
    repo: str = REPO,
    repo_id: int = REPO_ID,
    host: str = "https://github.com",
    name: str = "test",
    times: tuple[str, str, str] = ("2026-11-21T09:00:02Z", "2026-11-21T09:00:07Z", "2026-11-21T09:06:31Z"),
    steps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``workflow_job`` delivery: ``queued`` → ``in_progress`` → ``completed``. A re-run job
    is a new job (a new id, a new check run) with the next ``run_attempt``."""
    created, started, completed = times
    finished = status == "completed"
    if steps is None:
        steps = [
            step(1, "Set up job", "success", started, "2026-11-21T09:00:09Z"),
            step(2, "Run actions/checkout@v4", "success", "2026-11-21T09:00:09Z", "2026-11-21T09:00:11Z"),
            step(3, "Run tests", conclusion, "2026-11-21T09:00:11Z", "2026-11-21T09:06:29Z"),
            step(4, "Complete job", "success", "2026-11-21T09:06:29Z", completed),
        ]
    job = {
        "id": job_id,
        "run_id": run_id,
        "workflow_name": "CI",
        "head_branch": "main",
        "run_url": f"https://api.github.com/repos/{repo}/actions/runs/{run_id}",
        "run_attempt": attempt,
        "node_id": "CR_kwDOGe5Kks8AAAAOsm1Ktg",
        "head_sha": HEAD_SHA,
        "url": f"https://api.github.com/repos/{repo}/actions/jobs/{job_id}",
        "html_url": f"{host}/{repo}/actions/runs/{run_id}/job/{job_id}",
        "status": status,
        "conclusion": conclusion if finished else None,
        "created_at": created,
        "started_at": started if status != "queued" else created,
        "completed_at": completed if finished else None,
        "name": name,
        "steps": steps if finished else [],
        "check_run_url": f"https://api.github.com/repos/{repo}/check-runs/{job_id}",
        "labels": ["ubuntu-latest"],
        "runner_id": 346 if status != "queued" else None,
        "runner_name": "GitHub Actions 320" if status != "queued" else None,
        "runner_group_id": 2 if status != "queued" else None,
        "runner_group_name": "GitHub Actions" if status != "queued" else None,
    }
    return {
        "action": status,
        "workflow_job": job,
        "repository": repository(repo, repo_id, host),
        "sender": user(),
    }


def collector_job() -> dict[str, Any]:
    """The Collector's recorded run, its ``test (1.23)`` job, as GitHub delivered it."""
    times = ("2025-04-16T21:08:58Z", "2025-04-16T21:09:03Z", "2025-04-16T21:10:25Z")
    steps = [
        step(1, "Set up job", "success", "2025-04-16T21:09:02Z", "2025-04-16T21:09:04Z"),
        step(2, "Run actions/checkout@v4", "success", "2025-04-16T21:09:04Z", "2025-04-16T21:09:05Z"),
        step(3, "Make test-all", "success", "2025-04-16T21:09:06Z", "2025-04-16T21:10:20Z"),
        step(11, "Complete job", "success", "2025-04-16T21:10:23Z", "2025-04-16T21:10:23Z"),
    ]
    return workflow_job(
        job_id=COLLECTOR_JOB,
        attempt=COLLECTOR_ATTEMPT,
        conclusion="success",
        run_id=COLLECTOR_RUN,
        repo=COLLECTOR_REPO,
        repo_id=COLLECTOR_REPO_ID,
        name="test (1.23)",
        times=times,
        steps=steps,
    )


def collector_run() -> dict[str, Any]:
    body = workflow_run(attempt=COLLECTOR_ATTEMPT, run_id=COLLECTOR_RUN, repo=COLLECTOR_REPO, repo_id=COLLECTOR_REPO_ID)
    body["workflow_run"].update(run_started_at="2025-04-16T21:08:50Z", updated_at="2025-04-16T21:10:30Z")
    return body


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=2).encode()


def form(payload: dict[str, Any]) -> bytes:
    """A delivery whose hook's content type is ``application/x-www-form-urlencoded``."""
    return urlencode({"payload": json.dumps(payload)}).encode()


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(
    event: str, body: bytes, secret: str | None, *, delivery: str | None = None, content_type: str = "application/json"
) -> dict[str, str]:
    """Headers as GitHub sends them (a repository hook). Without a secret GitHub sends no
    signature headers at all; with one, SHA-1 and SHA-256 both."""
    headers = {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/7a0c2f1",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "501",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": str(REPO_ID),
    }
    if secret is not None:
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
        headers["X-Hub-Signature-256"] = sign(body, secret)
    return headers
