"""One shape for the CI facts that GitLab, GitHub Actions and Forgejo Actions ID tokens
name differently.

| Fact | GitLab CI | GitHub Actions | Forgejo Actions |
|---|---|---|---|
| repository path | ``project_path`` | ``repository`` | ``repository`` |
| its immutable id | ``project_id`` | ``repository_id`` | ``repository_id`` |
| owner path | ``namespace_path`` | ``repository_owner`` | ``repository_owner`` |
| its id | ``namespace_id`` | ``repository_owner_id`` | ``repository_owner_id`` |
| ref | ``ref`` (``main``) | ``ref`` (``refs/heads/main``) | ``ref`` (``refs/heads/main``) |
| pipeline run | ``pipeline_id`` | ``run_id`` (+ ``run_attempt``) | ``run_id`` |
| job | ``job_id`` | ``check_run_id`` (newer tokens) | — |
| who | ``user_login`` | ``actor`` | ``actor`` |
| workflow file | — | ``job_workflow_ref`` | ``workflow_ref`` |

Used by the deployment endpoint (and any door that needs a token's CI facts); the values
come from verified claims only. Which forge is decided by the claims' shape and the
issuer: ``project_path`` is GitLab's, an issuer ending in ``/api/actions`` is Forgejo's,
``repository`` otherwise is GitHub's (github.com or Enterprise Server).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from proxy.policy.matchers import claim_text

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


@dataclass(frozen=True)
class CiFacts:
    provider: str  # gitlab | github | forgejo
    repository: str  # owner/name (GitLab: the full project path)
    owner: str
    repository_url: str
    ref_name: str
    ref_type: str
    revision: str | None
    run_id: str
    #: Unique per job (per call for GitHub tokens without ``check_run_id``): the
    #: idempotency key of what the job reports.
    job_key: str
    actor: str | None
    environment: str | None
    #: Span attributes beyond the VCS conventions.
    extra: dict[str, str] = field(default_factory=dict)


def _text(claims: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        text = claim_text(claims.get(name))
        if text:
            return text
    return None


def _short_ref(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def ci_facts(issuer_url: str, claims: Mapping[str, Any]) -> CiFacts | None:
    """The CI facts of a verified token, or None when the token is not from a known CI
    (a generic OIDC client-credentials token, say)."""
    if claims.get("project_path"):
        project = _text(claims, "project_path") or ""
        job = _text(claims, "job_id") or ""
        return CiFacts(
            provider="gitlab",
            repository=project,
            owner=_text(claims, "namespace_path") or "",
            repository_url=f"{issuer_url}/{project}",
            ref_name=_text(claims, "ref") or "",
            ref_type=_text(claims, "ref_type") or "branch",
            revision=_text(claims, "sha"),
            run_id=_text(claims, "pipeline_id") or "",
            job_key=job,
            actor=_text(claims, "user_login"),
            environment=_text(claims, "environment"),
            extra={
                k: v
                for k, v in (
                    ("cicd.pipeline.run.id", _text(claims, "pipeline_id")),
                    ("tracegate.job.id", job),
                    ("tracegate.project_path", project),
                )
                if v
            },
        )
    repository = _text(claims, "repository")
    if not repository:
        return None
    forgejo = issuer_url.endswith("/api/actions")
    if forgejo:
        web = issuer_url.removesuffix("/api/actions")
    elif issuer_url == GITHUB_ISSUER:
        web = "https://github.com"
    else:  # GitHub Enterprise Server: https://HOSTNAME/_services/token
        web = str(URL(issuer_url).origin())
    run_id = _text(claims, "run_id") or ""
    job_key = _text(claims, "check_run_id") or f"{run_id}-{_text(claims, 'run_attempt') or 1}-{_text(claims, 'jti')}"
    workflow = _text(claims, "job_workflow_ref", "workflow_ref")
    return CiFacts(
        provider="forgejo" if forgejo else "github",
        repository=repository,
        owner=_text(claims, "repository_owner") or repository.split("/", 1)[0],
        repository_url=f"{web}/{repository}",
        ref_name=_short_ref(_text(claims, "ref") or ""),
        ref_type=_text(claims, "ref_type") or "branch",
        revision=_text(claims, "sha"),
        run_id=run_id,
        job_key=job_key,
        actor=_text(claims, "actor"),
        environment=_text(claims, "environment"),
        extra={
            k: v
            for k, v in (
                ("cicd.pipeline.run.id", run_id),
                ("tracegate.job.id", _text(claims, "check_run_id")),
                ("tracegate.workflow_ref", workflow),
                ("tracegate.repository.id", _text(claims, "repository_id")),
            )
            if v
        },
    )
