"""Warnings for a policy that loads but binds weakly (``tracegate check``; ``--strict``
makes them fail the check).

* An allow rule that binds on mutable paths only. Project and repository paths are
  renamed, transferred and re-used, and since GitLab 18.2.2 a fork's merge-request
  pipeline carries the *fork's* ``project_*`` claims; an id never changes hands. GitLab
  recommends binding on ``project_id``/``namespace_id``, GitHub and Forgejo on
  ``repository_id``/``repository_owner_id`` (or the immutable ``sub``).
* A deny rule that matches a path case-sensitively. GitLab and GitHub resolve paths
  without regard to case, so ``*/forks/*`` would miss ``Payments/Forks/api``; write
  ``{match: …, case: insensitive}``.
* An allow rule that gives a service account with ``stamp:``. The gateway door
  (``TRACEGATE_AUTHZ_LISTEN``) refuses such an account (``stamp-needs-proxy``): the
  gateway forwards the client's body as it came, so only the proxy can stamp it. Whether
  the gateway door is in use is a setting of ``tracegate serve``, which the policy files do
  not hold and ``tracegate check`` is not given, so this is a warning that says so
  (:func:`gateway_refusals` words it as an error for a caller that knows).
"""

from __future__ import annotations

import re

from proxy.errors import PolicyProblem
from proxy.policy.model import Policy, Rule
from proxy.policy.webhooks import warnings as webhook_warnings

#: Claims that never change for a project/repository, its owner, or where a job ran.
ID_CLAIMS = frozenset(
    {"project_id", "namespace_id", "job_project_id", "job_namespace_id", "repository_id", "repository_owner_id"}
)
#: Claims holding a path or name that can be renamed, transferred or re-used.
PATH_CLAIMS = frozenset(
    {
        "project_path",
        "namespace_path",
        "job_project_path",
        "job_namespace_path",
        "repository",
        "repository_owner",
        "sub",
    }
)
#: GitHub's immutable subject, bound at least on the owner id: ``repo:owner@123/name@456:…``
#: (repositories created or renamed after 2026-07-15, or opted in).
_IMMUTABLE_SUB = re.compile(r"^repo:[^/:*]+@\d+/")


def _binds_on_id(rule: Rule) -> bool:
    for claim, matcher in rule.when:
        if claim in ID_CLAIMS and not matcher.matches_everything:
            return True
        if claim == "sub" and all(_IMMUTABLE_SUB.match(p) for p in matcher.patterns):
            return True
    return False


def _gateway_refusal(policy: Policy, rule: Rule, *, known: bool) -> PolicyProblem | None:
    account = policy.service_accounts.get(rule.service_account or "")
    if rule.effect != "allow" or account is None or not account.stamp:
        return None
    if known:
        lead = "error: with the gateway door in use (TRACEGATE_AUTHZ_LISTEN)"
    else:
        lead = "note: if this policy serves the gateway door (TRACEGATE_AUTHZ_LISTEN; say so with --gateway yes|no)"
    return PolicyProblem(
        rule.where.file,
        rule.where.line,
        f"{lead}, allow rule {rule.name!r} gives service account {account.name!r} ({account.where}), which has "
        "stamp:; the door refuses its checks 403 stamp-needs-proxy, as the gateway would forward the client's "
        "identity attributes unstamped: send its clients to tracegate's own OTLP port, or drop its stamp:",
    )


def gateway_refusals(policy: Policy, *, known: bool = True) -> list[PolicyProblem]:
    """Every allow rule whose service account stamps: with the gateway door in use (``known``)
    each is a rule that can only ever be refused (``stamp-needs-proxy``), an ``error``; when
    ``tracegate check`` was not told, a ``note`` (not a warning: ``--strict`` would otherwise
    fail every stamping policy served only by tracegate's own ports)."""
    return [p for rule in policy.rules if (p := _gateway_refusal(policy, rule, known=known)) is not None]


def warnings(policy: Policy) -> list[PolicyProblem]:
    """Every weak binding, as ``file:line: warning: …`` problems (webhook entries' too)."""
    out = webhook_warnings(policy.webhooks)
    for rule in policy.rules:
        where = rule.where
        paths = [claim for claim, _ in rule.when if claim in PATH_CLAIMS]
        if rule.effect == "allow" and paths and not _binds_on_id(rule):
            out.append(
                PolicyProblem(
                    where.file,
                    where.line,
                    f"warning: allow rule {rule.name!r} binds only on mutable paths ({', '.join(paths)}); "
                    "paths are renamed and re-used (and a GitLab fork's pipeline carries the fork's project_*): "
                    "add project_id/namespace_id (GitLab) or repository_id/repository_owner_id (GitHub, Forgejo)",
                )
            )
        if rule.effect == "deny":
            for claim, matcher in rule.when:
                cased = [p for p in matcher.patterns if p != p.swapcase()]
                if claim in PATH_CLAIMS and cased and not matcher.case_insensitive:
                    out.append(
                        PolicyProblem(
                            where.file,
                            where.line,
                            f"warning: deny rule {rule.name!r} matches {claim} case-sensitively; "
                            f"{cased[0].swapcase()!r} is the same path to the forge and would not match: "
                            f"write {claim}: {{match: {cased[0]!r}, case: insensitive}}",
                        )
                    )
    return out
