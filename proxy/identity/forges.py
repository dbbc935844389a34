"""One shape for the CI facts that GitLab, GitHub Actions and Forgejo Actions ID tokens
name differently — and for what a generic OIDC issuer's tokens carry instead.

| Fact | GitLab CI | GitHub Actions | Forgejo Actions | generic OIDC |
|---|---|---|---|---|
| repository path | ``project_path`` | ``repository`` | ``repository`` | — |
| its immutable id | ``project_id`` | ``repository_id`` | ``repository_id`` | — |
| owner path | ``namespace_path`` | ``repository_owner`` | ``repository_owner`` | — |
| its id | ``namespace_id`` | ``repository_owner_id`` | ``repository_owner_id`` | — |
| ref | ``ref`` (``main``) | ``ref`` (``refs/heads/main``) | ``ref`` (``refs/heads/main``) | — |
| pipeline run | ``pipeline_id`` | ``run_id`` (+ ``run_attempt``) | ``run_id`` | — |
| job | ``job_id`` | ``check_run_id`` (newer tokens) | — | — |
| who | ``user_login`` | ``actor`` | ``actor`` | ``client_id``, ``azp``, ``cid`` |
| its id | ``user_id`` | ``actor_id`` | ``actor_id`` | — |
| workflow file | — | ``job_workflow_ref`` | ``workflow_ref`` | — |

:data:`FACT_CLAIMS` is this table as data; :func:`ci_facts` (the deployment endpoint, the
traceparent) and :func:`audit_identity` (every decision's audit line, docs/audit.md) both
read it, so a new forge is one more column here. The values come from verified claims
only. Which forge is decided by the claims' shape and the issuer (:func:`forge_of`):
``project_path`` is GitLab's, an issuer ending in ``/api/actions`` is Forgejo's,
``repository`` otherwise is GitHub's (github.com or Enterprise Server); anything else is a
generic OIDC issuer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from proxy.policy.matchers import claim_text

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"

_ACTIONS: Mapping[str, tuple[str, ...]] = {
    "repository": ("repository",),
    "repository_id": ("repository_id",),
    "owner": ("repository_owner",),
    "owner_id": ("repository_owner_id",),
    "ref": ("ref",),
    "run_id": ("run_id",),
    "job_id": ("check_run_id",),
    "actor": ("actor",),
    "actor_id": ("actor_id",),
    "workflow": ("job_workflow_ref", "workflow_ref"),
}

#: Which claims carry each fact, per forge (the table above): the first one present wins.
#: A fact a forge's tokens do not carry has no claims (an empty tuple, or no entry).
FACT_CLAIMS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "gitlab": {
        "repository": ("project_path",),
        "repository_id": ("project_id",),
        "owner": ("namespace_path",),
        "owner_id": ("namespace_id",),
        "ref": ("ref",),
        "run_id": ("pipeline_id",),
        "job_id": ("job_id",),
        "actor": ("user_login",),
        "actor_id": ("user_id",),
    },
    "github": _ACTIONS,
    "forgejo": {**_ACTIONS, "job_id": ()},
    # Client-credentials tokens: the client is who sends (RFC 9068 client_id, OIDC azp, Okta cid).
    "oidc": {"actor": ("client_id", "azp", "cid")},
}

#: The audit line's identity fields (:data:`proxy.observe.audit.AUDITED_CLAIMS`) and the
#: fact each is filled from, whatever the forge calls it; ``forge`` is :func:`forge_of`,
#: ``sub`` and ``jti`` are the standard claims of every issuer. The field names are the
#: audit line's since before GitHub and Forgejo tokens were audited (GitLab's claims').
AUDIT_FACTS: tuple[tuple[str, str], ...] = (
    ("project_path", "repository"),
    ("project_id", "repository_id"),
    ("namespace_id", "owner_id"),
    ("pipeline_id", "run_id"),
    ("job_id", "job_id"),
    ("ref", "ref"),
    ("user_login", "actor"),
    ("user_id", "actor_id"),
)


def forge_of(issuer_url: str, claims: Mapping[str, Any]) -> str:
    """``gitlab``, ``github``, ``forgejo``, or ``oidc`` (any other issuer): by the claims'
    shape, and for Actions tokens by the issuer (Forgejo's ends in ``/api/actions``)."""
    if claims.get("project_path"):
        return "gitlab"
    if claims.get("repository"):
        return "forgejo" if issuer_url.endswith("/api/actions") else "github"
    return "oidc"


def _first(claims: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = claims.get(name)
        if value is not None:
            return value
    return None


def audit_identity(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The identity fields of a verified token's audit lines, by field name: the forge, then
    each :data:`AUDIT_FACTS` field from the claim its forge names it by, then ``sub`` and
    ``jti``. Values are the claims as signed (a list stays a list): the audit log bounds
    and escapes them, and names a non-scalar by its type. The forge is read from ``iss``,
    which verification has already matched to a configured issuer exactly."""
    issuer = claims.get("iss")
    forge = forge_of(issuer if isinstance(issuer, str) else "", claims)
    names = FACT_CLAIMS[forge]
    fields: dict[str, Any] = {"forge": forge}
    for name, fact in AUDIT_FACTS:
        fields[name] = _first(claims, names.get(fact, ()))
    fields["sub"] = claims.get("sub")
    fields["jti"] = claims.get("jti")
    return fields


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
    forge = forge_of(issuer_url, claims)
    names = FACT_CLAIMS[forge]

    def fact(name: str) -> str | None:
        return _text(claims, *names.get(name, ()))

    if forge == "gitlab":
        project = fact("repository") or ""
        job = fact("job_id") or ""
        return CiFacts(
            provider="gitlab",
            repository=project,
            owner=fact("owner") or "",
            repository_url=f"{issuer_url}/{project}",
            ref_name=fact("ref") or "",
            ref_type=_text(claims, "ref_type") or "branch",
            revision=_text(claims, "sha"),
            run_id=fact("run_id") or "",
            job_key=job,
            actor=fact("actor"),
            environment=_text(claims, "environment"),
            extra={
                k: v
                for k, v in (
                    ("cicd.pipeline.run.id", fact("run_id")),
                    ("tracegate.job.id", job),
                    ("tracegate.project_path", project),
                )
                if v
            },
        )
    repository = fact("repository")
    if forge == "oidc" or not repository:
        return None
    if forge == "forgejo":
        web = issuer_url.removesuffix("/api/actions")
    elif issuer_url == GITHUB_ISSUER:
        web = "https://github.com"
    else:  # GitHub Enterprise Server: https://HOSTNAME/_services/token
        web = str(URL(issuer_url).origin())
    run_id = fact("run_id") or ""
    job_key = fact("job_id") or f"{run_id}-{_text(claims, 'run_attempt') or 1}-{_text(claims, 'jti')}"
    return CiFacts(
        provider=forge,
        repository=repository,
        owner=fact("owner") or repository.split("/", 1)[0],
        repository_url=f"{web}/{repository}",
        ref_name=_short_ref(fact("ref") or ""),
        ref_type=_text(claims, "ref_type") or "branch",
        revision=_text(claims, "sha"),
        run_id=run_id,
        job_key=job_key,
        actor=fact("actor"),
        environment=_text(claims, "environment"),
        extra={
            k: v
            for k, v in (
                ("cicd.pipeline.run.id", run_id),
                ("tracegate.job.id", fact("job_id")),
                ("tracegate.workflow_ref", fact("workflow")),
                ("tracegate.repository.id", fact("repository_id")),
            )
            if v
        },
    )
