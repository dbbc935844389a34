"""Binding on immutable ids: numbers compare as decimal text, ``case: insensitive`` for
paths, ``tracegate check --strict`` warnings, and the ``stamp:`` section's load checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.errors import PolicyLoadError
from proxy.policy import decide, load_policy
from proxy.policy.stamps import DEFAULT_STAMP

HEAD = """\
issuers:
  gitlab:
    issuer: https://gitlab.example.com
    audiences: [tracegate]
service_accounts:
  ci:
    access_token: {env: LS_KEY}
"""


def write(tmp_path: Path, rules: str, head: str = HEAD) -> Path:
    root = tmp_path / "p"
    root.mkdir(exist_ok=True)
    (root / "a.yaml").write_text(head + textwrap.dedent(rules))
    return root


def test_ids_compare_as_decimal_strings_whether_claim_or_policy_is_a_number(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """\
            rules:
              - {name: by-id, issuer: gitlab, when: {project_id: 4242, namespace_id: ["72", 73]}, service_account: ci}
            """,
        ),
        environ={"LS_KEY": "k"},
    )
    for project_id, namespace_id in (("4242", "72"), (4242, 73), ("4242", 73)):
        claims = {"project_id": project_id, "namespace_id": namespace_id}
        assert decide(policy, "gitlab", claims, "traces").allowed
    for claims in ({"project_id": "04242", "namespace_id": "72"}, {"project_id": 4242.0, "namespace_id": "72"}):
        assert not decide(policy, "gitlab", claims, "traces").allowed


def test_case_insensitive_path_match(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            """\
            rules:
              - name: no-forks
                issuer: gitlab
                effect: deny
                when: {project_path: {match: ["*/forks/*", "*/Scratch"], case: insensitive}}
              - {name: strict, issuer: gitlab, effect: deny, when: {project_path: "*/forks/*"}}
              - {name: all, issuer: gitlab, when: {project_id: 1}, service_account: ci}
            """,
        ),
        environ={"LS_KEY": "k"},
    )
    for path in ("payments/forks/api", "Payments/FORKS/api", "x/scratch", "X/SCRATCH"):
        decision = decide(policy, "gitlab", {"project_id": "1", "project_path": path}, None)
        assert decision.rule is not None and decision.rule.name == "no-forks", path
    assert decide(policy, "gitlab", {"project_id": "1", "project_path": "payments/api"}, None).allowed


def test_match_option_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as info:
        load_policy(
            write(
                tmp_path,
                """\
                rules:
                  - {name: a, issuer: gitlab, when: {project_path: {match: "x/*", case: upper}}, service_account: ci}
                  - {name: b, issuer: gitlab, when: {project_path: {case: insensitive}}, service_account: ci}
                  - {name: c, issuer: gitlab, when: {project_path: {match: "x", regex: true}}, service_account: ci}
                """,
            ),
            environ={"LS_KEY": "k"},
        )
    text = "\n".join(str(p) for p in info.value.problems)
    assert "rule 'a'.when.project_path.case must be sensitive or insensitive" in text
    assert "rule 'b'.when.project_path is missing 'match'" in text
    assert "unknown key 'regex' in rule 'c'.when.project_path; allowed: match, case" in text


def test_check_strict_warns_on_mutable_bindings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write(
        tmp_path,
        """\
        rules:
          - {name: forks, issuer: gitlab, effect: deny, when: {project_path: "*/forks/*"}}
          - name: forks-ci
            issuer: gitlab
            effect: deny
            when: {project_path: {match: "*/forks/*", case: insensitive}}
          - {name: numbers, issuer: gitlab, effect: deny, when: {project_path: "123/*"}}
          - {name: by-path, issuer: gitlab, when: {project_path: "payments/*"}, service_account: ci}
          - {name: by-id, issuer: gitlab, when: {project_path: "payments/*", project_id: 4}, service_account: ci}
          - {name: gh-sub, issuer: gitlab, when: {sub: "repo:octo@1/api@2:*"}, service_account: ci}
          - {name: gh-old-sub, issuer: gitlab, when: {sub: "repo:octo/api:*"}, service_account: ci}
        """,
    )
    assert main(["check", str(root)], environ={}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok: ")
    warned = [line.split(": warning: ")[1].split(" ", 3)[2] for line in lines[1:]]
    assert warned == ["'forks'", "'by-path'", "'gh-old-sub'"]
    assert f"{root}/a.yaml:9: warning: deny rule 'forks' matches project_path case-sensitively" in lines[1]
    assert "case: insensitive" in lines[1]
    assert "binds only on mutable paths (project_path)" in lines[2]
    assert main(["check", "--strict", str(root)], environ={}) == 1
    root_dir = Path(__file__).parent.parent
    assert main(["check", "--strict", str(root_dir / "policies")], environ={}) == 0
    assert main(["check", "--strict", str(root_dir / "examples" / "policies")], environ={}) == 0
    assert main(["check", "--strict", str(root_dir / "examples" / "issuers")], environ={}) == 0


def test_stamp_section(tmp_path: Path) -> None:
    head = HEAD.replace("    access_token: {env: LS_KEY}\n", "    access_token: {env: LS_KEY}\n    stamp: STAMP\n")
    rules = "rules:\n  - {name: r, issuer: gitlab, when: {project_id: 1}, service_account: ci}\n"

    def load(stamp: str) -> object:
        return load_policy(write(tmp_path, rules, head.replace("STAMP", stamp)), environ={"LS_KEY": "k"})

    assert load("default").service_accounts["ci"].stamp == DEFAULT_STAMP  # type: ignore[attr-defined]
    custom = load("{gitlab.project.id: project_id, cicd.pipeline.run.id: [pipeline_id, run_id]}")
    assert custom.service_accounts["ci"].stamp == (  # type: ignore[attr-defined]
        ("gitlab.project.id", ("project_id",)),
        ("cicd.pipeline.run.id", ("pipeline_id", "run_id")),
    )
    for bad, message in (
        ("everything", "stamp must be 'default' or a mapping"),
        ("{}", "stamp must be 'default' or a mapping"),
        ("{'bad key': sha}", "'bad key' is not an attribute key"),
        ("{vcs.ref.head.revision: [sha, 3]}", "stamp.vcs.ref.head.revision must name a claim"),
    ):
        with pytest.raises(PolicyLoadError) as info:
            load(bad)
        assert message in str(info.value), bad
        assert "service account 'ci'" in str(info.value)


def test_explain_shows_what_would_be_stamped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = HEAD.replace("    access_token: {env: LS_KEY}\n", "    access_token: {env: LS_KEY}\n    stamp: default\n")
    root = write(
        tmp_path, "rules:\n  - {name: r, issuer: gitlab, when: {project_id: 4242}, service_account: ci}\n", head
    )
    claims = tmp_path / "claims.json"
    claims.write_text(
        '{"iss": "https://gitlab.example.com", "aud": "tracegate", "project_id": 4242, "pipeline_id": "99"}'
    )
    assert main(["explain", str(root), "--claims", str(claims)], environ={}) == 0
    out = capsys.readouterr().out
    assert "  stamps cicd.pipeline.run.id = '99'" in out
    assert "  stamps tracegate.repository.id = '4242'" in out
    assert "  stamps vcs.ref.head.revision: removed (no claim)" in out
