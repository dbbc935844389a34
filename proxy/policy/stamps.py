"""A service account's ``stamp:`` section: which resource attributes tracegate sets from
the verified token's claims (see :mod:`proxy.upstream.stamp` for how they are set).

``stamp: default`` is :data:`DEFAULT_STAMP`, following the OpenTelemetry CI/CD and VCS
semantic conventions where one fits and ``tracegate.*`` where none does. Each attribute
names one claim or a list of claims: the first the token carries gives the value, so one
set serves GitLab (``pipeline_id``, ``project_path``…) and GitHub/Forgejo Actions
(``run_id``, ``repository``…). A mapping replaces the default set whole.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.policy.checker import Checker
from proxy.policy.source import LDict, LList

#: attribute → claims, first present wins. GitLab claim first, then GitHub/Forgejo.
DEFAULT_STAMP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cicd.pipeline.name", ("workflow",)),
    ("cicd.pipeline.run.id", ("pipeline_id", "run_id")),
    ("cicd.pipeline.task.run.id", ("job_id", "check_run_id")),
    ("vcs.repository.name", ("project_path", "repository")),
    ("vcs.owner.name", ("namespace_path", "repository_owner")),
    ("vcs.ref.head.name", ("ref",)),
    ("vcs.ref.head.revision", ("sha",)),
    ("vcs.ref.head.type", ("ref_type",)),
    ("tracegate.repository.id", ("project_id", "repository_id")),
    ("tracegate.owner.id", ("namespace_id", "repository_owner_id")),
    ("tracegate.job.repository.id", ("job_project_id",)),
    ("tracegate.actor", ("user_login", "actor")),
    ("tracegate.token.issuer", ("iss",)),
)

#: An attribute key: printable, no spaces, at most 255 bytes (OTLP receivers accept more;
#: a policy that needs more is a mistake).
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_CLAIM = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def parse_stamp(check: Checker, value: Any, line: int, what: str) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """``default`` or a mapping ``attribute: claim`` / ``attribute: [claim, …]``."""
    if value == "default":
        return DEFAULT_STAMP
    if not isinstance(value, LDict) or not value:
        check.add(line, f"{what}.stamp must be 'default' or a mapping of attribute: claim (or [claims])")
        return None
    out: list[tuple[str, tuple[str, ...]]] = []
    for key, claims in value.items():
        where = value.line_of(key)
        if not _KEY.match(key):
            check.add(where, f"{what}.stamp: {key!r} is not an attribute key (printable, no spaces, ≤ 255)")
            continue
        names = list(claims) if isinstance(claims, LList) else [claims]
        if not names or not all(isinstance(n, str) and _CLAIM.match(n) for n in names):
            check.add(where, f"{what}.stamp.{key} must name a claim or a list of claims, e.g. pipeline_id")
            continue
        out.append((key, tuple(names)))
    return tuple(out) if len(out) == len(value) else None
