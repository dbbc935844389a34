"""The policy loader and evaluator: each load error names file, line and fix; decisions
carry the documented order and reasons. Policies are written inline as YAML."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.errors import PolicyLoadError
from proxy.policy import decide, load_policy

HEAD = """\
issuers:
  gitlab:
    issuer: https://gitlab.example.com
    audiences: [tracegate]
service_accounts:
  payments-ci:
    access_token: {env: LS_PAY}
  docs-ci:
    access_token: {file: SECRET_FILE}
    signals: [traces]
"""
ENV = {"LS_PAY": "pay-key-123"}


def write(tmp_path: Path, *files: str) -> Path:
    root = tmp_path / "p"
    root.mkdir(exist_ok=True)
    secret = tmp_path / "docs-secret"
    secret.write_text("docs-key-456\n")
    for i, text in enumerate(files):
        (root / f"{i:02d}.yaml").write_text(textwrap.dedent(text).replace("SECRET_FILE", str(secret)))
    return root


def problems(tmp_path: Path, *files: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyLoadError) as info:
        load_policy(write(tmp_path, *files), environ=ENV if environ is None else environ)
    return [str(p) for p in info.value.problems]


def test_example_policies_load_for_check() -> None:
    policy = load_policy(Path(__file__).parent.parent / "examples" / "policies", environ={}, resolve_secrets=False)
    assert set(policy.issuers) == {"gitlab-com", "gitlab-self"}
    assert all(a.access_token is None for a in policy.service_accounts.values())


def test_loads_and_resolves_secrets(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            HEAD,
            """\
        rules:
          - name: pay
            issuer: gitlab
            when: {project_path: "payments/*"}
            service_account: payments-ci
        """,
        ),
        environ=ENV,
    )
    token = policy.service_accounts["payments-ci"].access_token
    assert token is not None and token.reveal() == "pay-key-123"
    assert "pay-key-123" not in repr(policy)
    docs = policy.service_accounts["docs-ci"].access_token
    assert docs is not None and docs.reveal() == "docs-key-456"


@pytest.mark.parametrize(
    ("extra", "env", "expected"),
    [
        (
            "rules:\n  - {name: r, issuer: nope, when: {project_path: a/b}, service_account: payments-ci}\n",
            ENV,
            "01.yaml:2: rule 'r' names unknown issuer 'nope'; define it under issuers:",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, when: {project_path: a/b}, service_account: ghost}\n",
            ENV,
            "01.yaml:2: rule 'r' names unknown service account 'ghost'",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, when: {project_path: '*'}, service_account: payments-ci}\n",
            ENV,
            "01.yaml:2: rule 'r': a bare '*' on project_path matches every project; narrow it or add allow_any: true",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, service_account: payments-ci}\n",
            ENV,
            "01.yaml:2: rule 'r' has no 'when' and so matches every token of its issuer",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, when: {ref: main}, service_account: payments-ci, colour: red}\n",
            ENV,
            "01.yaml:2: unknown key 'colour' in rule 'r'; allowed:",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, when: {ref: main}}\n",
            ENV,
            "01.yaml:2: rule 'r' allows but names no service_account",
        ),
        (
            "rules:\n  - {name: r, issuer: gitlab, effect: maybe, when: {ref: main}}\n",
            ENV,
            "01.yaml:2: rule 'r': effect must be allow or deny",
        ),
        ("rules: {name: r}\n", ENV, "01.yaml:1: rules must be a list of rules"),
        ("", {}, "00.yaml:7: service account 'payments-ci'.access_token: environment variable LS_PAY is not set"),
        ("", {"LS_PAY": ""}, "00.yaml:7: service account 'payments-ci'.access_token: {env: LS_PAY} is empty"),
        (
            "",
            {"LS_PAY": "a\nb"},
            "00.yaml:7: service account 'payments-ci'.access_token: {env: LS_PAY} holds a line break",
        ),
        (
            "service_accounts:\n  x:\n    access_token: ls-inline-secret-value\n",
            ENV,
            "01.yaml:3: service account 'x'.access_token is written inline; secrets are references",
        ),
        (
            "service_accounts:\n  x:\n    access_token: {vault: a}\n",
            ENV,
            "01.yaml:3: service account 'x'.access_token must be exactly one of {env: NAME} or {file: /path}",
        ),
        (
            "service_accounts:\n  x:\n    access_token: {file: relative/path}\n",
            ENV,
            "01.yaml:3: service account 'x'.access_token: {file: relative/path} must be an absolute path",
        ),
        (
            "service_accounts:\n  x:\n    access_token: {env: LS_PAY}\n    signals: [profiles]\n",
            ENV,
            "01.yaml:4: service account 'x': unknown signal 'profiles'",
        ),
        (
            "service_accounts:\n  payments-ci:\n    access_token: {env: LS_PAY}\n",
            ENV,
            "01.yaml:2: service account 'payments-ci' is also defined at",
        ),
        (
            "issuers:\n  other:\n    issuer: http://gitlab.example.org\n    audiences: [x]\n",
            ENV,
            "01.yaml:3: issuer 'other'.issuer: 'http://gitlab.example.org' must use https",
        ),
        (
            "issuers:\n  other:\n    issuer: https://gitlab.example.org\n    audiences: [x]\n    algorithms: [HS256]\n",
            ENV,
            "01.yaml:5: issuer 'other': algorithm 'HS256' is not allowed",
        ),
        (
            "issuers:\n  other:\n    issuer: https://gitlab.example.org\n",
            ENV,
            "01.yaml:2: issuer 'other' is missing 'audiences'",
        ),
        (
            "issuers:\n  other:\n    issuer: https://gitlab.example.com\n    audiences: [x]\n",
            ENV,
            "issuer 'other' has the same URL as 'gitlab'; merge them",
        ),
        ("colour: red\n", ENV, "01.yaml:1: unknown key 'colour' in a policy file; allowed: issuers"),
        ("rules: [\n", ENV, "01.yaml:2: invalid YAML"),
        ("a: &x 1\nb: *x\n", ENV, "01.yaml:2: YAML aliases (*name) are not supported"),
        ("rules: []\nrules: []\n", ENV, "01.yaml:2: duplicate key 'rules' (first at line 1); keep one"),
        ("- just\n- a list\n", ENV, "01.yaml:1: a policy file must be a mapping"),
        ("issuers: !!python/object:os.system {}\n", ENV, "01.yaml:1: invalid YAML"),
    ],
)
def test_load_errors_name_file_line_and_fix(tmp_path: Path, extra: str, env: dict[str, str], expected: str) -> None:
    found = problems(tmp_path, HEAD, extra, environ=env)
    assert any(expected in p for p in found), found
    assert all("ls-inline-secret-value" not in p for p in found)


def test_rule_names_unique_across_files(tmp_path: Path) -> None:
    rule = "rules:\n  - {name: same, issuer: gitlab, when: {ref: main}, service_account: payments-ci}\n"
    found = problems(tmp_path, HEAD, rule, rule)
    assert any("02.yaml:2: rule 'same' is also defined at" in p and "01.yaml:2" in p for p in found)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        HEAD,
        """\
        rules:
          - {name: a, issuer: nope, when: {ref: main}, service_account: payments-ci}
          - {name: b, issuer: gitlab, when: {ref: main}, service_account: ghost}
        """,
    )
    assert len(found) == 2


def test_missing_secret_file(tmp_path: Path) -> None:
    root = write(tmp_path, HEAD)
    (tmp_path / "docs-secret").unlink()
    with pytest.raises(PolicyLoadError) as info:
        load_policy(root, environ=ENV)
    assert "00.yaml:9: service account 'docs-ci'.access_token: secret file" in str(info.value)


def test_check_mode_needs_no_secrets(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, HEAD), environ={}, resolve_secrets=False)
    assert set(policy.service_accounts) == {"payments-ci", "docs-ci"}


RULES = """\
rules:
  - name: pay-main
    issuer: gitlab
    when: {project_path: "payments/*", ref_protected: true}
    service_account: payments-ci
  - name: platform-groups
    issuer: gitlab
    when: {groups_direct: ["platform/*", sre]}
    service_account: docs-ci
  - name: deny-late
    issuer: gitlab
    effect: deny
    when: {user_login: mallory}
"""


@pytest.fixture
def policy(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_policy(
        write(
            tmp_path,
            HEAD,
            RULES,
            """\
        rules:
          - name: pay-catch-all-later
            issuer: gitlab
            when: {project_path: "payments/api"}
            service_account: docs-ci
        """,
        ),
        environ=ENV,
    )


@pytest.mark.parametrize(
    ("claims", "signal", "allowed", "reason", "rule"),
    [
        ({"project_path": "payments/api", "ref_protected": "true"}, "logs", True, "rule-allowed", "pay-main"),
        ({"project_path": "payments/a/b", "ref_protected": "true"}, "logs", True, "rule-allowed", "pay-main"),
        (
            {"project_path": "payments/api", "ref_protected": "false"},
            "traces",
            True,
            "rule-allowed",
            "pay-catch-all-later",
        ),
        (
            {"project_path": "payments/api", "ref_protected": "false"},
            "logs",
            False,
            "signal-not-allowed",
            "pay-catch-all-later",
        ),
        ({"project_path": "payments/api"}, "logs", False, "signal-not-allowed", "pay-catch-all-later"),
        ({"project_path": "paymentsX/api", "ref_protected": "true"}, "traces", False, "no-rule-matched", None),
        (
            {"project_path": "payments/api", "ref_protected": "true", "user_login": "mallory"},
            "traces",
            False,
            "rule-denied",
            "deny-late",
        ),
        ({"groups_direct": ["web", "platform/sre"]}, "traces", True, "rule-allowed", "platform-groups"),
        ({"groups_direct": ["sre"]}, "traces", True, "rule-allowed", "platform-groups"),
        ({"groups_direct": ["web"]}, "traces", False, "no-rule-matched", None),
        ({"groups_direct": {"nested": "platform/x"}}, "traces", False, "no-rule-matched", None),
        ({}, "traces", False, "no-rule-matched", None),
    ],
)
def test_decisions(policy, claims, signal, allowed, reason, rule) -> None:  # type: ignore[no-untyped-def]
    decision = decide(policy, "gitlab", claims, signal)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert (decision.rule.name if decision.rule else None) == rule


def test_unknown_issuer_is_denied(policy) -> None:  # type: ignore[no-untyped-def]
    assert decide(policy, "elsewhere", {"project_path": "payments/api"}, "traces").reason == "unknown-issuer"


def test_yaml_booleans_compare_as_gitlab_strings(policy) -> None:  # type: ignore[no-untyped-def]
    assert (
        decide(policy, "gitlab", {"project_path": "payments/x", "ref_protected": True}, "logs").rule.name == "pay-main"
    )


GL = "{name: g, source: gitlab, project_id: 4242, secret: [{env: LS_PAY}], service_account: payments-ci}"
HOOK = "{name: h, source: gitea, repository: a/b, secret: [{env: LS_PAY}], service_account: payments-ci, services: [s]}"


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        (HOOK.replace("gitea", "gitlab-ce"), "01.yaml:2: webhook 'h': source must be gitea, forgejo or gitlab"),
        (HOOK.replace("a/b", "'*'"), "01.yaml:2: webhook 'h': a bare '*' repository lets any repository send; name it"),
        (
            HOOK.replace("services:", "events: [issues], services:"),
            "01.yaml:2: webhook 'h': unknown event 'issues' for gitea; use push, tag, release, workflow_run",
        ),
        (HOOK.replace("{env: LS_PAY}", "inline-hook-secret"), "01.yaml:2: webhook 'h'.secret is written inline"),
        (HOOK.replace("LS_PAY", "NOPE"), "01.yaml:2: webhook 'h'.secret: environment variable NOPE is not set"),
        (HOOK.replace("payments-ci", "ghost"), "01.yaml:2: webhook 'h' names unknown service account 'ghost'"),
        (HOOK.replace(", services: [s]", ""), "01.yaml:2: webhook 'h' is missing 'services'"),
        (GL.replace("4242", "abc"), "01.yaml:2: webhook 'g'.project_id must hold positive project ids"),
        (GL.replace("project_id: 4242, ", ""), "01.yaml:2: webhook 'g' is missing project_id (preferred"),
        (GL.replace("secret:", "events: [pipeline, push], secret:"), "webhook 'g': unknown event 'push' for gitlab"),
        (HOOK.replace("a/b,", "a/b, project_id: 1,"), "01.yaml:2: webhook 'h': project_id is for source: gitlab"),
    ],
)
def test_webhook_load_errors(tmp_path: Path, hook: str, expected: str) -> None:
    found = problems(tmp_path, HEAD, f"webhooks:\n  - {hook}\n")
    assert any(expected in p for p in found), found
    assert all("inline-hook-secret" not in p for p in found)


def test_gitlab_webhook_entries_load_with_ci_defaults(tmp_path: Path) -> None:
    from proxy.policy import load_policy

    by_path_entry = GL.replace("name: g", "name: p").replace("project_id: 4242", "repository: 'pay/*'")
    root = write(tmp_path, HEAD, f"webhooks:\n  - {GL}\n  - {by_path_entry}\n")
    by_id, by_path = load_policy(root, environ=ENV).webhooks
    assert (by_id.source, by_id.project_ids, by_id.events, by_id.service_name) == (
        "gitlab",
        frozenset({"4242"}),
        frozenset({"pipeline", "job"}),
        "ci/g",
    )
    assert by_path.project_ids == frozenset() and by_path.repository.match_text("pay/api")


def test_a_webhook_account_must_allow_traces(tmp_path: Path) -> None:
    own = "service_accounts:\n  m:\n    access_token: {env: LS_PAY}\n    signals: [metrics]\n"
    found = problems(tmp_path, HEAD, own + f"webhooks:\n  - {GL.replace('payments-ci', 'm')}\n")
    assert any("01.yaml:6: webhook 'g' sends its markers (trace spans) as service account 'm'" in p for p in found), (
        found
    )


def test_check_says_that_the_gateway_door_refuses_a_stamping_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 18 (9): the gateway door refuses an account with stamp: (stamp-needs-proxy).
    Told the door is in use (``--gateway yes`` or TRACEGATE_AUTHZ_LISTEN set), ``tracegate
    check`` fails naming the rule that reaches such an account; told it is not, it says
    nothing; not told, it prints a note, which ``--strict`` does not count."""
    from proxy.cli import main

    head = HEAD.replace("    access_token: {env: LS_PAY}\n", "    access_token: {env: LS_PAY}\n    stamp: default\n")
    rules = """\
    rules:
      - {name: forks, issuer: gitlab, effect: deny, when: {project_id: 7}}
      - {name: docs, issuer: gitlab, when: {project_id: 8}, service_account: docs-ci}
      - {name: pay, issuer: gitlab, when: {project_id: 9}, service_account: payments-ci}
    """
    root = write(tmp_path, head, rules)
    assert main(["check", "--strict", str(root)], environ={}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok: ")
    assert len(lines) == 2, lines  # a deny rule, and a rule for an account without stamp:, say nothing
    assert lines[1].startswith(f"{root}/01.yaml:4: note: if this policy serves the gateway door")
    assert f"'pay' gives service account 'payments-ci' ({root}/00.yaml:6), which has stamp:" in lines[1]
    assert "stamp-needs-proxy" in lines[1]
    for argv, environ in ((["--gateway", "yes"], {}), ([], {"TRACEGATE_AUTHZ_LISTEN": "127.0.0.1:9191"})):
        assert main(["check", *argv, str(root)], environ=environ) == 1
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and lines[1].startswith(f"{root}/01.yaml:4: error: with the gateway door in use")
    assert main(["check", "--gateway", "no", "--strict", str(root)], environ={"TRACEGATE_AUTHZ_LISTEN": "x"}) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []

    from proxy.policy.lint import gateway_refusals

    assert gateway_refusals(load_policy(write(tmp_path, HEAD, rules), environ={}, resolve_secrets=False)) == []
