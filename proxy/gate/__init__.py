"""The gate: identify → decide, once, for every door, and the running state it reads.

``admission`` is the one path every door takes (token → verified identity → decision →
audit line and metrics); ``runtime`` holds what a running tracegate serves: the policy,
the issuers' keys, the forwarder and the metrics, swapped whole on reload.

May import: upstream, identity, policy, settings, observe and the leaves. Never a door.
"""
