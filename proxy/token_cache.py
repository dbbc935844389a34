"""The verified-token cache: bounded, least recently used out first, nothing kept past its
expiry — and nothing in it for the cycle collector to walk.

CPython's cycle collector walks every *tracked* container on each full collection. A tuple
whose items are all atoms (str, bytes, int, float, or tuples of those) is untracked the
first time a young collection looks at it and never walked again; a dict of claims, a
dataclass instance or cachetools' per-entry nodes stay tracked for as long as they live.
With 100,000 cached identities the previous cache (cachetools' ``TLRUCache`` of ``Identity``
dataclasses holding a claims dict and a decision memo) held five tracked objects per
identity, and a full collection took ~330 ms (``bench/trim.py``). Here each entry is one
such tuple of atoms; the containers that hold them are a fixed few (an ``OrderedDict``,
whose order links are C structs, not objects, and a heap list), whatever the size.

Values are tuples whose **first item is the time they expire** (the clock's units): a value
is never returned at or after that time. Expired entries leave in order of expiry (a heap
of ``(expires, key)`` tuples, pruned on every insertion), so memory is not held by tokens
nobody can use any more; at ``maxsize`` an insertion drops the least recently used entry.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

#: The heap is rebuilt from the live entries when it holds this many times as many items
#: (entries dropped as least recently used, or replaced, leave their heap items behind).
_HEAP_SLACK = 2


class ExpiringCache:
    """``bytes`` keys (digests) to tuples of atoms whose first item is their expiry time."""

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[Any, ...]] = OrderedDict()
        self._expiries: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[Any, ...] | None:
        """The live entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._clock() < entry[0]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: tuple[Any, ...]) -> None:
        """Remember ``entry`` (its first item: when it expires). An entry already expired is
        not stored (and replaces nothing it would have to outlive)."""
        now = self._clock()
        self._expire(now)
        expires = entry[0]
        if not now < expires:
            self._entries.pop(key, None)
            return
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.maxsize:
            entries.popitem(last=False)
        entries[key] = entry
        heapq.heappush(self._expiries, (float(expires), key))
        if len(self._expiries) > _HEAP_SLACK * len(entries) + 16:
            self._expiries = [(float(e[0]), k) for k, e in entries.items()]
            heapq.heapify(self._expiries)

    def _expire(self, now: float) -> None:
        heap, entries = self._expiries, self._entries
        while heap and not now < heap[0][0]:
            _, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and not now < entry[0]:
                del entries[key]

    def values(self) -> Iterator[tuple[Any, ...]]:
        """Every entry held, expired or not (for tests and inspection)."""
        return iter(list(self._entries.values()))
