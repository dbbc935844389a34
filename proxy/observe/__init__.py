"""Observe: what tracegate says about itself.

The audit log (``audit``: one JSON line per decision), Prometheus metrics (``metrics``,
and ``multiproc`` for a pod of several workers) and operational logs (``logs``). A leaf
wing: it imports only the shared leaves (untrusted, errors).
"""
