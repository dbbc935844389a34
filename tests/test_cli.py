"""``tracegate check`` and ``tracegate explain`` on policy repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "policies"


def test_check_accepts_the_example_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLES)], environ={}) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_check_reports_each_problem_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(
        "issuers:\n  g:\n    issuer: https://g.example\n    audiences: [t]\n"
        "service_accounts:\n  s:\n    access_token: inline-secret-123\n"
        "rules:\n  - {name: r, issuer: x, when: {ref: main}, service_account: s}\n"
    )
    assert main(["check", str(tmp_path)], environ={}) == 1
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == f"{tmp_path}/a.yaml:7: service account 's'.access_token is written inline; "
        "secrets are references: {env: NAME} or {file: /path}"
    )
    assert out[1].startswith(f"{tmp_path}/a.yaml:9: rule 'r' names unknown issuer 'x'")
    assert "inline-secret-123" not in "\n".join(out)


def test_explain_allowed_and_denied(capsys: pytest.CaptureFixture[str]) -> None:
    claims = ROOT / "examples/claims/payments-main.json"
    assert main(["explain", str(EXAMPLES), "--claims", str(claims), "--signal", "logs"], environ={}) == 0
    out = capsys.readouterr().out
    assert "allowed (rule-allowed): rule 'payments-protected'" in out
    assert "service account 'payments-ci'" in out
    assert "{env: LS_TOKEN_PAYMENTS}" in out
    fork = ROOT / "examples/claims/payments-fork.json"
    assert main(["explain", str(EXAMPLES), "--claims", str(fork)], environ={}) == 1
    assert "denied (rule-denied) by rule 'no-forks'" in capsys.readouterr().out


def test_explain_unknown_issuer_and_no_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = tmp_path / "c.json"
    claims.write_text(json.dumps({"iss": "https://elsewhere.example", "project_path": "x/y"}))
    assert main(["explain", str(EXAMPLES), "--claims", str(claims)], environ={}) == 1
    assert "denied (unknown-issuer)" in capsys.readouterr().out
    claims.write_text(json.dumps({"iss": "https://gitlab.example.com", "aud": "tracegate", "project_path": "x/y"}))
    assert main(["explain", str(EXAMPLES), "--claims", str(claims)], environ={}) == 1
    assert "denied (no-rule-matched)" in capsys.readouterr().out


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--listen", "nope"], environ={}) == 2
    assert "--listen='nope': expected HOST:PORT" in capsys.readouterr().err
    loopback = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--grpc-listen", "off"]
    assert main(["serve", *loopback], environ={"TRACEGATE_UPSTREAM": "http://ingest.example.com"}) == 2
    assert "TRACEGATE_UPSTREAM" in capsys.readouterr().err


def test_explain_webhook_payloads(capsys: pytest.CaptureFixture[str]) -> None:
    push = ROOT / "examples/webhooks/gitea-push.json"
    assert main(["explain", str(EXAMPLES), "--payload", str(push), "--event", "push"], environ={}) == 0
    out = capsys.readouterr().out
    assert "marker (push): services payments-api, payments-worker get service.version=0a1b2c3d" in out
    assert main(["explain", str(EXAMPLES), "--payload", str(push), "--event", "issues"], environ={}) == 1
    assert "no marker (event-not-listed)" in capsys.readouterr().out
    assert main(["explain", str(EXAMPLES), "--payload", str(push), "--source", "forgejo"], environ={}) == 1
    assert "refused (unknown-repository)" in capsys.readouterr().out


def test_explain_ci_payloads_shows_the_spans(capsys: pytest.CaptureFixture[str]) -> None:
    policies = str(ROOT / "examples/policies")
    pipeline = ROOT / "examples/webhooks/gitlab-pipeline.json"
    assert main(["explain", policies, "--payload", str(pipeline), "--source", "gitlab"], environ={}) == 0
    out = capsys.readouterr().out
    assert "entry 'payments-api-pipelines'" in out
    assert "(root) 'pipeline Build and test': 2026-11-21T08:00:00+00:00 + 400.0s, result failure" in out
    assert "1 span(s) as service.name 'ci/payments-api' via service account 'payments-ci'" in out
    job = ROOT / "examples/webhooks/gitlab-job.json"
    assert main(["explain", policies, "--payload", str(job), "--source", "gitlab", "--event", "job"], environ={}) == 0
    assert "'job unit-tests'" in capsys.readouterr().out
    assert main(["explain", policies, "--payload", str(job), "--source", "gitlab", "--event", "Push Hook"]) == 1
    assert "no spans (event-not-listed)" in capsys.readouterr().out
    run = ROOT / "examples/webhooks/gitea-workflow-run.json"
    assert main(["explain", policies, "--payload", str(run), "--event", "workflow_run"], environ={}) == 0
    assert "(root) 'workflow CI'" in capsys.readouterr().out
    assert main(["explain", policies, "--payload", str(pipeline), "--source", "gitea", "--event", "workflow_job"]) == 1
    assert "refused (unknown-repository)" in capsys.readouterr().out


def test_check_reports_a_broken_issuer_or_account_once_not_on_every_rule_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text(
        "issuers:\n  g:\n    issuer: http://gitlab.example.com\n    audiences: [t]\n"  # http: not loopback
        "service_accounts:\n  s:\n    access_token: {env: ''}\n"
        "rules:\n"
        "  - {name: r1, issuer: g, when: {ref: main}, service_account: s}\n"
        "  - {name: r2, issuer: g, when: {ref: dev}, service_account: s}\n"
        "  - {name: r3, issuer: typo, when: {ref: x}, service_account: ghost}\n"
    )
    assert main(["check", str(tmp_path)], environ={}) == 1
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if ":3: issuer 'g'.issuer" in line]) == 1
    assert len([line for line in out if ":7: service account 's'.access_token" in line]) == 1
    assert not [line for line in out if "unknown issuer 'g'" in line or "unknown service account 's'" in line]
    # A name that is defined nowhere is still reported where it is used.
    assert any(":11: rule 'r3' names unknown issuer 'typo'" in line for line in out)
    assert any(":11: rule 'r3' names unknown service account 'ghost'" in line for line in out)
    assert len(out) == 4


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    with pytest.raises(SystemExit) as exited:
        main(["--version"], environ={})
    assert exited.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"tracegate {version}\n"
