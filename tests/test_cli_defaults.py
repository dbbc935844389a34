"""``tracegate check`` and ``explain --payload`` as a user runs them (real processes): ``check``
with no argument reads ``./policies``; a missing or empty policy directory is a clear error for
check and serve; ``explain --payload`` tells the forge and the event from the payload."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.dev.standins import free_port

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "policies"
PAYLOADS = ROOT / "examples" / "webhooks"


def tracegate(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRACEGATE_AUTHZ_LISTEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def test_check_with_no_argument_checks_policies_in_the_working_directory(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "policies")
    code, out, _ = tracegate("check", cwd=tmp_path)
    assert (code, out.splitlines()[0]) == (
        0,
        "ok: 4 file(s), 2 issuer(s), 3 service account(s), 5 rule(s), 3 webhook(s)",
    )
    helped = tracegate("check", "--help")[1]
    assert "check [-h] [--strict]" in helped and "default: ./policies" in helped

    # Not there: the message says how to name it for check (not serve's --policies).
    shutil.rmtree(tmp_path / "policies")
    code, out, err = tracegate("check", cwd=tmp_path)
    assert code == 1
    assert out.splitlines() == [
        "policies: not a directory (with no PATH, check reads ./policies); name the policy folder: tracegate check PATH"
    ]
    assert "--policies" not in out + err
    code, out, _ = tracegate("check", "--strict", "nowhere", cwd=tmp_path)
    assert (code, out) == (1, "nowhere: not a directory; name the policy folder: tracegate check PATH\n")
    claims = str(ROOT / "examples/claims/payments-main.json")
    code, out, _ = tracegate("explain", "nowhere", "--claims", claims, cwd=tmp_path)
    assert (code, out) == (1, "nowhere: not a directory; name the policy folder: tracegate explain PATH\n")


def test_an_empty_policy_directory_is_an_error_for_check_and_serve(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "README.md").write_text("policies go here\n")
    (tmp_path / "policies" / ".hidden").mkdir()
    (tmp_path / "policies" / ".hidden" / "old.yaml").write_text("issuers: {}\n")  # hidden: not read
    code, out, _ = tracegate("check", cwd=tmp_path)
    assert (code, out) == (1, "policies:1: no *.yaml files here; add at least one policy file\n")
    ports = ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    code, out, err = tracegate("serve", "--policies", "policies", *ports, "--grpc-listen", "off", cwd=tmp_path)
    # serve: one start-up line, exit 2 like every start-up error (configuration), naming the fix.
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "tracegate: TRACEGATE_POLICIES=policies: the policy did not load, 1 problem(s): [1] policies:1: no *.yaml "
        "files here; add at least one policy file — `tracegate check policies` lists each"
    ]


def test_explain_payload_tells_the_forge_and_the_event_from_the_payload(tmp_path: Path) -> None:
    policies = str(EXAMPLES)
    code, out, err = tracegate("explain", policies, "--payload", str(PAYLOADS / "gitlab-pipeline.json"))
    assert code == 0, out + err
    assert out.startswith("gitlab Pipeline Hook for project 4242 (payments/api)")
    assert "(root) 'pipeline Build and test'" in out
    code, out, _ = tracegate("explain", policies, "--payload", str(PAYLOADS / "gitlab-job.json"))
    assert (code, out.splitlines()[0]) == (
        0,
        "gitlab Job Hook for project 4242 (payments/api) (the token is not checked by explain)",
    )
    assert "'job unit-tests'" in out
    code, out, _ = tracegate("explain", policies, "--payload", str(PAYLOADS / "gitea-workflow-job.json"))
    assert (code, out.splitlines()[0]) == (
        0,
        "gitea workflow_job for repository 'payments/api' (signatures are not checked by explain)",
    )
    assert "'job test'" in out
    code, out, _ = tracegate("explain", policies, "--payload", str(PAYLOADS / "gitea-push.json"))
    assert code == 0
    assert "marker (push): services payments-api, payments-worker" in out
    # What is given still wins: Forgejo sends Gitea's shape, and no forgejo entry names payments/api.
    code, out, _ = tracegate(
        "explain", policies, "--payload", str(PAYLOADS / "gitea-workflow-job.json"), "--source", "forgejo"
    )
    assert (code, out.splitlines()[0]) == (
        1,
        "forgejo workflow_job for repository 'payments/api' (signatures are not checked by explain)",
    )

    # Nothing to tell it by: a usage error naming what would have.
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"hello": "world"}')
    code, out, err = tracegate("explain", policies, "--payload", str(unknown))
    assert (code, out) == (2, "")
    assert err.startswith(
        f"tracegate: {unknown}: cannot tell the forge from the payload (a GitLab one carries object_kind"
    )
    assert err.rstrip().endswith("pass --source and --event")

    helped = " ".join(tracegate("explain", "--help")[1].split())
    assert "detected from it (GitLab's object_kind; Gitea's and Forgejo's shape)" in helped
    assert "say forgejo for a source: forgejo entry" in helped


def test_dev_hands_its_tracegate_the_secret_stores_and_aws_settings_only() -> None:
    """A dev rule file may use {aws_secret:}/{vault:} references or an aws issuer, as under
    serve: dev's runtime gets the stores' and AWS's settings from the caller's environment,
    and nothing else (its own settings are its flags)."""
    from proxy.dev.loop import store_environment

    given = {
        "VAULT_ADDR": "http://127.0.0.1:8200",
        "VAULT_TOKEN": "s.x",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
        "TRACEGATE_SECRET_REFRESH_SECONDS": "30",
        "TRACEGATE_VAULT_AUTH": "token",
        "TRACEGATE_UPSTREAM": "https://elsewhere.example.com",
        "LS_TOKEN": "not-for-dev",
        "HOME": "/root",
    }
    assert store_environment(given) == {
        k: given[k]
        for k in (
            "VAULT_ADDR",
            "VAULT_TOKEN",
            "AWS_REGION",
            "AWS_ENDPOINT_URL",
            "TRACEGATE_SECRET_REFRESH_SECONDS",
            "TRACEGATE_VAULT_AUTH",
        )
    }
