"""Run: assembling and running a tracegate process.

The listeners, signal handling and drain (``server``), reload on file changes
(``watch``), short full garbage collections (``gcfreeze``) and the container's health
check (``healthcheck``: ``python -m proxy.run.healthcheck``).

May import every wing below it: ci, doors, gate, upstream, identity, policy, settings,
observe. Never dev or cli.
"""
