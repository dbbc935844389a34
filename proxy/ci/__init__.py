"""CI: forge events → deployment markers and pipeline traces, through a durable outbox.

The webhook doors (``routes`` for Gitea, Forgejo and deployments; ``gitlab_routes``;
``door``, what they share), payload readers per forge (``gitea``, ``gitlab``,
``actions``, ``payload``), the marker and pipeline-trace models (``marker``,
``pipeline``), the outbox and its stores (``outbox``, ``outbox_pg``, ``store``,
``ci_outbox``) and its sender (``sender``), signatures (``signatures``), ``tracegate
explain --payload`` for CI events (``explain_ci``) and ``GET /v1/traceparent``
(``traceparent``: a job's own span, from its verified claims).

May import: doors (the shared edge and body reading), gate and everything below.
Never run, dev or cli.
"""
