"""Upstream: what leaves tracegate for the backend.

The forwarder (``forward``), the OTLP/HTTP pool and its connections (``pool``, ``conn``),
the gRPC upstream (``grpc``), which headers travel (``headers``), stamping verified
attributes into exports (``stamp``). Where each signal goes and with which credential
comes from the account's backend profile (:mod:`proxy.backends`).

May import: identity (stamping reads a verified identity), policy, settings, observe and
the leaves. Never gate or a door.
"""
