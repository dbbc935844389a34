"""``tracegate explain --payload`` for CI events: which entry a GitLab pipeline/job hook or a
GitHub/Gitea/Forgejo workflow_run/workflow_job would match, and the spans it would produce
(with the entry's ``trace_ids:``).

The same functions as the doors (:mod:`.gitlab`, :mod:`.actions`, :mod:`.gitlab_routes`'s
matching) so what explain prints is what serving does; only the token or signature is not
checked (explain has no secrets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.ci import actions, github, gitlab
from proxy.ci.gitea import repository_name
from proxy.ci.gitlab_routes import candidates
from proxy.ci.payload import Skip
from proxy.ci.pipeline import CiSpan, describe
from proxy.policy.model import Policy
from proxy.policy.webhooks import pinned_instance, trace_ids_of

#: ``--event`` spellings for GitLab: the X-Gitlab-Event value or the ``events:`` name.
GITLAB_EVENTS = {"pipeline": "Pipeline Hook", "job": "Job Hook"} | {v: v for v in ("Pipeline Hook", "Job Hook")}


def is_ci(source: str, event: str) -> bool:
    return source == "gitlab" or actions.listed_as(event) is not None


def explain(policy: Policy, payload: dict[str, Any], event: str, source: str, out: Callable[[str], None]) -> int:
    """Print the decision and the spans; 0 when spans would be sent, 1 otherwise."""
    if source == "gitlab":
        kind = {"pipeline": "Pipeline Hook", "build": "Job Hook"}.get(str(payload.get("object_kind")), "")
        header = GITLAB_EVENTS.get(event) or (kind if event == "push" else event)  # push: the CLI's default
        project_id, path = gitlab.project_of(payload)
        out(f"gitlab {header or event} for project {project_id} ({path}) (the token is not checked by explain)")
        hooks = candidates(policy.webhooks, project_id, path)
        if not hooks:
            out("refused (unknown-project): no webhooks entry names it → 401, answered as a wrong token")
            return 1
        hook = hooks[0]
        instance = pinned_instance(hook) or gitlab.instance_for(payload, None)
        listed = gitlab.EVENTS.get(header)
        if listed is None or listed not in hook.events:
            drawn: Any = Skip("event-not-listed")
        elif instance is None:
            drawn = Skip("no-instance-url")
        else:
            drawn = gitlab.spans_for(header, payload, instance, with_jobs="job" not in hook.events)
        spans: list[CiSpan] = [] if isinstance(drawn, Skip) else drawn.spans
        reason = drawn.reason if isinstance(drawn, Skip) else ""
    else:
        payload = actions.with_repository(payload)  # Forgejo's run/job events name it inside run
        repository = repository_name(payload)
        out(f"{source} {event} for repository {repository!r} (signatures are not checked by explain)")
        if source == github.SOURCE:  # by repository.id first, as the door matches
            hooks = github.candidates(policy.webhooks, github.repository_of(payload)[0], repository)
        else:
            hooks = [
                h
                for h in policy.webhooks
                if h.source == source and repository is not None and h.repository.match_text(repository)
            ]
        if not hooks:
            out("refused (unknown-repository): no webhooks entry names it → 401, answered as a wrong signature")
            return 1
        hook = hooks[0]
        one = (
            actions.spans_for(event, payload, pinned_instance(hook), source=source, scheme=trace_ids_of(hook))
            if actions.listed_as(event) in hook.events
            else Skip("event-not-listed")
        )
        spans = [] if isinstance(one, Skip) else [one]
        reason = one.reason if isinstance(one, Skip) else ""
    out(f"  entry {hook.name!r} at {hook.where}; secrets: {', '.join(str(r) for r in hook.secret_refs)}")
    if not spans:
        out(f"no spans ({reason}) → 202, nothing sent")
        return 1
    run = spans[0].run
    out(f"  trace {run.trace_id} (instance {run.instance}, project {run.project_id}, pipeline {run.pipeline_id})")
    for span in (s for top in spans for s in (top, *top.inner)):
        out(f"  {describe(span)}")
    out(
        f"→ 202; {len(spans)} span(s) as service.name {hook.service_name!r} "
        f"via service account {hook.service_account!r}"
    )
    return 0
