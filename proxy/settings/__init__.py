"""Settings: the process's configuration and its value parsers, and TLS material.

``config`` (flags, then ``TRACEGATE_*`` variables, then defaults), ``values`` (one parser
per kind of value), ``tls`` (listener contexts, reloaded) and ``cpus`` (``--workers
auto``). A leaf wing: it imports only the shared leaves (errors, secrets, urls).
"""
