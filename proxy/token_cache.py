"""The verified-token cache: bounded, nothing kept past its expiry — and next to nothing in
it for the cycle collector to walk.

CPython's cycle collector walks every *tracked* container on each full collection. A tuple
whose items are all atoms (str, bytes, int, float, or tuples of those) is untracked the
first time a collection looks at it and never walked again; a dict of claims, a dataclass
instance or cachetools' per-entry nodes stay tracked for as long as they live. With
100,000 cached identities the previous cache (cachetools' ``TLRUCache`` of ``Identity``
dataclasses holding a claims dict and a decision memo) held five tracked objects per
identity, and a full collection took ~300 ms (``bench/trim.py``). Here each entry is one
such tuple; they are held by two plain dicts with ``str`` keys (a collection visits only
the values of such a dict, and stops tracking the dict itself once all its values are
untracked) and one heap list.

Values are tuples whose **first item is the time they expire** (the clock's units): a value
is never returned at or after that time, and expired entries leave in order of expiry (a
heap of ``(expires, key)`` tuples, pruned on every insertion), so no memory is held for
tokens nobody can use any more.

At ``maxsize`` an insertion drops the oldest entry not used since the last *rotation*:
entries go into ``young``; when ``young`` holds half of ``maxsize`` and ``old`` is empty,
``young`` becomes ``old`` (and its keys, oldest first, a list); a hit in ``old`` moves the
entry back to ``young``; room is made by dropping the next key of that list still in
``old``. So an entry used at least once in every ``maxsize / 2`` insertions is never
dropped — least-recently-used, approximately, without an ordered dict (whose links the
collector also walks) or a move per hit. (Dropping a dict's first key over and over is
not O(1) — the iteration skips the holes left in front — hence the list.)
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any

#: The heap is rebuilt from the live entries when it holds this many times as many items
#: (entries dropped for room, or replaced, leave their heap items behind).
_HEAP_SLACK = 2


class ExpiringCache:
    """``str`` keys (hex digests) to tuples of atoms whose first item is their expiry time."""

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._half = max(1, maxsize // 2)
        self._clock = clock
        self._young: dict[str, tuple[Any, ...]] = {}
        self._old: dict[str, tuple[Any, ...]] = {}
        self._old_order: list[str] = []
        self._next_out = 0
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, key: str) -> tuple[Any, ...] | None:
        """The live entry for ``key``, or None."""
        entry = self._young.get(key)
        if entry is None:
            entry = self._old.pop(key, None)
            if entry is None:
                return None
            self._young[key] = entry  # used since the rotation: it stays through the next
        if not self._clock() < entry[0]:
            del self._young[key]
            return None
        return entry

    def put(self, key: str, entry: tuple[Any, ...]) -> None:
        """Remember ``entry`` (its first item: when it expires). An entry already expired is
        not stored (and replaces nothing it would have to outlive)."""
        now = self._clock()
        self._expire(now)
        self._old.pop(key, None)
        expires = entry[0]
        if not now < expires:
            self._young.pop(key, None)
            return
        if key not in self._young:
            if len(self._young) >= self._half and not self._old:
                self._rotate()
            while len(self) >= self.maxsize:
                self._drop_oldest()
        self._young[key] = entry
        heapq.heappush(self._expiries, (float(expires), key))
        if len(self._expiries) > _HEAP_SLACK * len(self) + 16:
            self._expiries = [(float(e[0]), k) for k, e in self._items()]
            heapq.heapify(self._expiries)

    def _rotate(self) -> None:
        self._old, self._young = self._young, {}
        self._old_order, self._next_out = list(self._old), 0

    def _drop_oldest(self) -> None:
        if not self._old:
            self._rotate()
        old, order = self._old, self._old_order
        while True:  # every key still in old is in order[next_out:]
            key = order[self._next_out]
            self._next_out += 1
            if old.pop(key, None) is not None:
                break
        if not old:
            self._old_order, self._next_out = [], 0

    def _expire(self, now: float) -> None:
        heap = self._expiries
        while heap and not now < heap[0][0]:
            _, key = heapq.heappop(heap)
            for generation in (self._young, self._old):
                entry = generation.get(key)
                if entry is not None and not now < entry[0]:
                    del generation[key]

    def _items(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        yield from self._young.items()
        yield from self._old.items()

    def values(self) -> list[tuple[Any, ...]]:
        """Every entry held, expired or not (for tests and inspection)."""
        return [entry for _, entry in self._items()]
