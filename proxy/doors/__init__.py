"""Doors: everything that accepts a request from outside and answers it.

OTLP/HTTP (``ingest``, with its own connection ``ingest_conn`` and the listener's edge
``protocol``), OTLP/gRPC (``grpc_door``), the gateway's decision point (``authz``) and the
admin listener (``admin``). A door turns its wire format into one call of
:func:`proxy.gate.admission.admit` and one forward, then writes the answer.

May import: gate, upstream, identity, policy, settings, observe and the leaves. Never ci,
run, dev or cli (a door does not know who assembled it).
"""
