"""What a ``webhooks:`` entry pins, and what its sender may still choose: GitLab entries bind
ids or a path (never both), ``instance:`` pins the forge, and ``tracegate check`` warns
about entries whose sender chooses the project id or the instance their traces are keyed on."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.ci.gitlab_routes import candidates
from proxy.ci.pipeline import instance_of, link_on
from proxy.policy import load_policy
from proxy.policy.webhooks import normal_instance, pinned_instance, warnings
from tests.test_policy import ENV, HEAD, problems, write

GL = "{name: g, source: gitlab, project_id: 4242, secret: [{env: LS_PAY}], service_account: payments-ci}"
GL_PATH = "{name: p, source: gitlab, repository: 'pay/*', secret: [{env: LS_PAY}], service_account: payments-ci}"
GITEA = (
    "{name: h, source: gitea, repository: a/b, secret: [{env: LS_PAY}], service_account: payments-ci, "
    "services: [s], events: [push, workflow_run]}"
)


def test_a_gitlab_entry_binds_ids_or_a_path_not_both(tmp_path: Path) -> None:
    both = GL.replace("project_id: 4242", "project_id: 4242, repository: 'payments/*'")
    found = problems(tmp_path, HEAD, f"webhooks:\n  - {both}\n")
    assert any(
        "01.yaml:2: webhook 'g': project_id and repository in one entry" in p and "split the entry" in p for p in found
    ), found


def test_an_entry_that_binds_ids_never_matches_by_path(tmp_path: Path) -> None:
    """Whatever built the entries: the path fallback only considers path-only entries."""
    policy = load_policy(write(tmp_path, HEAD, f"webhooks:\n  - {GL}\n  - {GL_PATH}\n"), environ=ENV)
    by_id, by_path = policy.webhooks
    assert candidates(policy.webhooks, "4242", "pay/api") == [by_id]
    assert candidates(policy.webhooks, "9999", "pay/api") == [by_path]
    assert candidates(policy.webhooks, "9999", "payments/api") == []
    from dataclasses import replace

    both = replace(by_id, repository=by_path.repository)  # as if loaded with both keys
    assert candidates([both], "9999", "pay/api") == []


@pytest.mark.parametrize(
    ("written", "pinned"),
    [
        ("https://GitLab.Example.com/", "https://gitlab.example.com"),
        ("https://example.com:443/gitlab/", "https://example.com/gitlab"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://gitea.internal:3000", "http://gitea.internal:3000"),
    ],
)
def test_instance_is_pinned_in_the_spelling_of_the_forges_urls(tmp_path: Path, written: str, pinned: str) -> None:
    entry = GL.replace("project_id: 4242", f"project_id: 4242, instance: '{written}'")
    [hook] = load_policy(write(tmp_path, HEAD, f"webhooks:\n  - {entry}\n"), environ=ENV).webhooks
    assert pinned_instance(hook) == pinned == instance_of(written)


@pytest.mark.parametrize(
    "written",
    [
        "gitlab.example.com",
        "ftp://gitlab.example.com",
        "https://user:pw@gitlab.example.com",
        "https://gitlab.example.com/?x=1",
        "https://gitlab.example.com/#top",
        "https://gitlab.example.com:99999",
        "https://gitlab.exämple.com",
        "https://gitlab.example.com\\@evil.example",
    ],
)
def test_a_bad_instance_is_a_load_error_that_says_what_to_write(tmp_path: Path, written: str) -> None:
    entry = GL.replace("project_id: 4242", f"project_id: 4242, instance: '{written}'")
    found = problems(tmp_path, HEAD, f"webhooks:\n  - {entry}\n")
    assert any("01.yaml:2: webhook 'g'.instance" in p and "base URL, http(s)://HOST" in p for p in found), found
    assert normal_instance(written) is None


def test_check_warns_about_entries_whose_sender_chooses_the_trace(tmp_path: Path) -> None:
    pinned = GL.replace("project_id: 4242", "project_id: 4242, instance: https://gitlab.example.com")
    markers_only = GITEA.replace("name: h", "name: m").replace(", workflow_run", "").replace("a/b", "c/d")
    root = write(tmp_path, HEAD, f"webhooks:\n  - {pinned}\n  - {GL_PATH}\n  - {GITEA}\n  - {markers_only}\n")
    found = [str(p) for p in warnings(load_policy(root, environ=ENV).webhooks)]
    assert len(found) == 3, found
    assert "01.yaml:3: warning: webhook 'p' names GitLab projects by path only" in found[0]
    assert "pin project_id" in found[0]
    assert "01.yaml:3: warning: webhook 'p' draws CI traces without instance:" in found[1]
    assert "01.yaml:4: warning: webhook 'h' draws CI traces without instance:" in found[2]


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://gitlab.example.com/payments/api", True),
        ("https://GITLAB.example.com:443/payments/api/-/jobs/1", True),
        ("https://gitlab.example.com", True),
        ("https://gitlab.example.com.evil.example/payments/api", False),
        ("https://evil.example/payments/api", False),
        ("https://gitlab.example.com@evil.example/payments/api", False),
        ("https://evil.example\\@gitlab.example.com/payments/api", False),
        ("http://gitlab.example.com/payments/api", False),
        ("javascript:alert(1)//gitlab.example.com", False),
        ("", False),
        (None, False),
    ],
)
def test_links_are_kept_only_on_the_instance(url: str | None, kept: bool) -> None:
    assert link_on(url, "https://gitlab.example.com") == (url if kept else None)


def test_links_on_a_sub_path_instance() -> None:
    assert link_on("https://example.com/gitlab/payments/api", "https://example.com/gitlab")
    assert link_on("https://example.com/gitlab-evil/x", "https://example.com/gitlab") is None
    assert link_on("https://example.com/other", "https://example.com/gitlab") is None
