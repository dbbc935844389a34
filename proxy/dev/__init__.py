"""Dev: ``tracegate demo`` and ``tracegate dev`` — the whole product on one machine.

The demo (``demo``), the dev loop (``loop``), its state directory (``state``), its backends
(``backends``: the dev account of each profile, and what its sink checks), its webhook side
(``forges``: a GitLab and a Gitea entry, the bundled payloads in ``payloads/`` and the curl lines
that send them), what its sinks print of a trace (``spans``), and the stand-ins for tracegate's
peers (``standins``: an OIDC issuer that signs what it is asked, an OTLP sink).
Never imported by the request path: only ``cli`` imports this wing.

May import: run and everything below it.
"""
