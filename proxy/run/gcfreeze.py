"""Keep Python's full garbage collections short.

CPython's cycle collector walks every tracked container on a full (generation 2)
collection. The verified-token cache once held five such containers per identity (with
100,000 identities a full collection took 100–400 ms, the p99 of the benchmark); its
entries are now tuples of atoms the collector stops tracking (:mod:`proxy.identity.token_cache`),
but the process still holds some 50,000 long-lived containers of its own (modules,
functions, the policy, the key sets, the libraries') whose walk costs ~20 ms on this
machine, and none of them is ever part of a reference cycle that becomes garbage.

``gc.freeze()`` moves every object tracked so far into the permanent generation, which
collections skip: done every ``interval`` seconds, the modules, the policy, the key sets
and whatever else lives long leave the collector's work, and a full collection only
walks what was created since the last freeze. Frozen objects are still freed by reference
counting; only a *cycle* that became garbage after being frozen stays until it is thawed.
So every 10 minutes the permanent generation is thawed and collected once (one
full pause), bounding what cyclic garbage can accumulate.
"""

from __future__ import annotations

import asyncio
import gc

#: Seconds between thaws (one full collection of everything each time).
THAW_SECONDS = 600.0


async def freeze_periodically(interval: float, thaw_every: int | None = None) -> None:
    """Run until cancelled: ``gc.freeze()`` every ``interval`` seconds; every
    ``thaw_every``-th time (by default every THAW_SECONDS), ``gc.unfreeze()`` and a full
    ``gc.collect()`` first."""
    every = thaw_every if thaw_every is not None else max(1, round(THAW_SECONDS / interval))
    ticks = 0
    while True:
        await asyncio.sleep(interval)
        ticks += 1
        if ticks % every == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()
