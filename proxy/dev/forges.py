"""``tracegate dev``'s webhook side: a GitLab and a Gitea entry, their secrets, the bundled
payloads and the exact ``curl`` lines that send them, so CI traces are drawn on this machine.

On every start ``dev`` writes, in its state directory:

* ``secrets/gitlab-webhook-token`` and ``secrets/gitea-webhook-secret`` (new random values,
  mode 0600 in a 0700 directory; removed when ``dev`` stops, as the signing key is). The policy
  refers to them with ``{file: …}`` and the printed ``curl`` lines read them with ``$(cat …)``:
  no secret value is ever printed. (The Gitea line hands the secret to ``openssl dgst -hmac``
  as an argument, which other local users can see in the process list while it runs: a dev
  secret for a loopback listener, nothing more.)
* ``payloads/``: the recorded-shape payloads bundled in this package (``proxy/dev/payloads/``,
  copies of ``examples/webhooks/``: a GitLab pipeline hook and a job hook, a Gitea
  ``workflow_run``, ``workflow_job`` and ``push``) with their forge URLs rewritten to the dev
  issuer's. The stand-in issuer plays the forge of both entries (each pins it as its
  ``instance:``), so the pipeline trace is keyed on the same instance as the dev token's
  ``iss``; the GitLab payloads name project 4242, pipeline 99001 and job 880011 — the dev
  token's ``project_id``, ``pipeline_id`` and ``job_id`` — so their job span is the span ``GET
  /v1/traceparent`` answers for the dev token. A new port at each start is a new instance,
  so each start draws its traces afresh (sending a payload twice in one run is a duplicate,
  as a forge's redelivery is).
* ``policies/20-dev-webhooks.yaml``: the two ``webhooks:`` entries (GitLab bound by
  ``project_id``, Gitea by repository; both pinning ``instance:``), so the dev policy passes
  ``tracegate check --strict``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from proxy.dev.state import DEV_PROJECT_ID, write_private

WEBHOOKS_FILE = "20-dev-webhooks.yaml"
#: The forge URLs the bundled payloads were recorded with; rewritten to the dev issuer's.
RECORDED_HOSTS = ("https://gitlab.example.com", "https://gitea.example.com")
GITLAB_TOKEN = "gitlab-webhook-token"  # noqa: S105 - a file name, not its value
GITEA_SECRET = "gitea-webhook-secret"  # noqa: S105 - a file name, not its value


@dataclass(frozen=True)
class Delivery:
    """One bundled payload and how its forge sends it: the door, and the event header."""

    file: str
    source: str  # gitlab | gitea
    event: str  # X-Gitlab-Event / X-Gitea-Event


DELIVERIES = (
    Delivery("gitlab-pipeline.json", "gitlab", "Pipeline Hook"),
    Delivery("gitlab-job.json", "gitlab", "Job Hook"),
    Delivery("gitea-workflow-run.json", "gitea", "workflow_run"),
    Delivery("gitea-workflow-job.json", "gitea", "workflow_job"),
    Delivery("gitea-push.json", "gitea", "push"),
)

WEBHOOKS_YAML = """\
# Rewritten by `tracegate dev` on every start: the stand-in forge's URL (the dev issuer's) and
# the secrets change. Send the bundled payloads with the curl lines `tracegate dev` prints.
webhooks:
  - name: dev-gitlab
    source: gitlab
    project_id: {project_id}  # the dev token's project_id
    secret: [{{file: {gitlab_secret}}}]
    events: [pipeline, job]
    service_account: ci
    instance: {instance}  # the dev token's iss: its job span is /v1/traceparent's
  - name: dev-gitea
    source: gitea
    repository: payments/api
    secret: [{{file: {gitea_secret}}}]
    events: [push, workflow_run, workflow_job]
    service_account: ci
    services: [payments-api]  # the push marker's
    instance: {instance}
"""


def write(state: Path, instance: str) -> Path:
    """Write the secrets, the payloads and the webhook entries for a dev issuer at ``instance``
    (``state``: the dev state directory, 0700). Returns the policy file written."""
    root = state.resolve()
    kept = root / "secrets"
    kept.mkdir(mode=0o700, exist_ok=True)
    kept.chmod(0o700)
    for name in (GITLAB_TOKEN, GITEA_SECRET):
        write_private(kept / name, secrets.token_urlsafe(32).encode())
    payloads = root / "payloads"
    payloads.mkdir(exist_ok=True)
    bundled = files("proxy.dev") / "payloads"
    for delivery in DELIVERIES:
        text = bundled.joinpath(delivery.file).read_text(encoding="utf-8")
        for host in RECORDED_HOSTS:
            text = text.replace(host, instance)
        (payloads / delivery.file).write_text(text, encoding="utf-8")
    policy = root / "policies" / WEBHOOKS_FILE
    policy.write_text(
        WEBHOOKS_YAML.format(
            project_id=DEV_PROJECT_ID,
            instance=instance,
            # JSON strings are YAML scalars: a state path with spaces or quotes stays one value.
            gitlab_secret=json.dumps(str(kept / GITLAB_TOKEN)),
            gitea_secret=json.dumps(str(kept / GITEA_SECRET)),
        )
    )
    return policy


def remove(state: Path) -> None:
    """Remove the secrets (``dev`` stopping); the payloads and the entries may stay."""
    for name in (GITLAB_TOKEN, GITEA_SECRET):
        with contextlib.suppress(FileNotFoundError):
            (state / "secrets" / name).unlink()


def curl_lines(state: Path, ingest: str, nonce: str) -> list[str]:
    """The shell lines that deliver each bundled payload to tracegate at ``ingest`` as its
    forge would: GitLab's secret token in ``X-Gitlab-Token``, Gitea's HMAC-SHA256 of the exact
    body in ``X-Gitea-Signature``. ``nonce`` makes this start's Gitea delivery ids its own."""
    root = state.resolve()
    lines = []
    for n, delivery in enumerate(DELIVERIES, start=1):
        body = shlex.quote(str(root / "payloads" / delivery.file))
        url = f"{ingest}/webhooks/{delivery.source}"
        head = f"curl -sS -w '\\n' {url} -H 'Content-Type: application/json'"
        if delivery.source == "gitlab":
            secret = shlex.quote(str(root / "secrets" / GITLAB_TOKEN))
            auth = f'-H {shlex.quote("X-Gitlab-Event: " + delivery.event)} -H "X-Gitlab-Token: $(cat {secret})"'
        else:
            secret = shlex.quote(str(root / "secrets" / GITEA_SECRET))
            sign = f"openssl dgst -sha256 -hmac \"$(cat {secret})\" -r < {body} | cut -d' ' -f1"
            auth = (
                f"-H 'X-Gitea-Event: {delivery.event}' -H 'X-Gitea-Delivery: dev-{nonce}-{n}' "
                f'-H "X-Gitea-Signature: $({sign})"'
            )
        lines.append(f"{head} {auth} --data-binary @{body}")
    return lines


def traceparent_line(ingest: str, token_variable: str) -> str:
    """``TRACEPARENT`` for the dev token's job: the span the GitLab job payload draws."""
    return f'export TRACEPARENT=$(curl -fsS -H "Authorization: Bearer ${{{token_variable}}}" {ingest}/v1/traceparent)'


def banner(state: Path, ingest: str, token_variable: str, nonce: str) -> list[str]:
    """What ``dev`` prints of its webhook side, after the token and the exporter variables."""
    return [
        "# CI traces: send the bundled webhook payloads (GitLab pipeline and job hooks; Gitea workflow_run, "
        "workflow_job and push) as the forges would:",
        *curl_lines(state, ingest, nonce),
        "# the job's own spans join the GitLab job span: parent them on this (after the token line above)",
        traceparent_line(ingest, token_variable),
        f"# the dev policy passes: tracegate check --strict {state}/policies",
    ]
