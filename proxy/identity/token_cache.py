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
is never returned at or after that time, and an insertion drops every entry whose expiry
is more than :data:`BUCKET_SECONDS` past (keys are filed by expiry in buckets of that
width), so no memory is held for long by tokens nobody can use any more.

At ``maxsize`` an insertion drops the oldest entry not used since the last *rotation*:
entries go into ``young``; when ``young`` holds half of ``maxsize`` and ``old`` is empty,
``young`` becomes ``old``; a hit in ``old`` moves the entry back to ``young``; room is made
by dropping ``old``'s oldest key. So an entry used at least once in every ``maxsize / 2``
insertions is never dropped — least-recently-used, approximately, without an ordered dict
(whose links the collector also walks) or a move per hit.

The orders (of ``young``, of ``old``, and the expiry buckets) are kept as the keys' bytes in
``bytearray`` s, not as lists of key objects: a list of 100,000 keys is a container the
collector walks, ~5 ms per list at 100,000 here; a bytearray holds no references at all.
(And not as dict iteration order: dropping a dict's first key over and over is not O(1) —
the iteration skips the holes left in front.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

#: Width (seconds) of the expiry buckets: an expired entry is dropped at most this long
#: after its expiry by the next insertion (a lookup never returns it after its expiry).
BUCKET_SECONDS = 30.0
#: Key length: hex SHA-256 digests.
KEY_LENGTH = 64


class ExpiringCache:
    """``str`` keys (hex SHA-256 digests, :data:`KEY_LENGTH` ASCII characters) to tuples of
    atoms whose first item is their expiry time."""

    def __init__(self, maxsize: int, clock: Callable[[], float]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._half = max(1, maxsize // 2)
        self._clock = clock
        self._young: dict[str, tuple[Any, ...]] = {}
        self._old: dict[str, tuple[Any, ...]] = {}
        #: Keys in the order they entered ``young`` (some since gone), and ``old``'s
        #: from ``_next_out`` on (every key still in ``old`` is there).
        self._young_order = bytearray()
        self._old_order = bytearray()
        self._next_out = 0
        #: Expiry bucket (expiry // BUCKET_SECONDS) → the keys stored with an expiry in it.
        self._buckets: dict[int, bytearray] = {}
        self._bucketed = 0
        self._earliest = math.inf

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, key: str) -> tuple[Any, ...] | None:
        """The live entry for ``key``, or None."""
        entry = self._young.get(key)
        if entry is None:
            entry = self._old.pop(key, None)
            if entry is None:
                return None
            self._enter_young(key, entry)  # used since the rotation: it stays through the next
        if not self._clock() < entry[0]:
            del self._young[key]
            return None
        return entry

    def put(self, key: str, entry: tuple[Any, ...]) -> None:
        """Remember ``entry`` (its first item: when it expires). An entry already expired is
        not stored (and replaces nothing it would have to outlive)."""
        if len(key) != KEY_LENGTH or not key.isascii():
            raise ValueError("keys are hex SHA-256 digests")
        now = self._clock()
        self._expire(now)
        self._old.pop(key, None)
        expires = float(entry[0])
        if not now < expires:
            self._young.pop(key, None)
            return
        if key in self._young:
            self._young[key] = entry
        else:
            if len(self._young) >= self._half and not self._old:
                self._rotate()
            while len(self) >= self.maxsize:
                self._drop_oldest()
            self._enter_young(key, entry)
        self._file(key, expires)
        if self._bucketed > 2 * len(self) + 16:  # replaced and dropped entries' keys
            self._buckets, self._bucketed, self._earliest = {}, 0, math.inf
            for k, e in self._items():
                self._file(k, float(e[0]))

    def _enter_young(self, key: str, entry: tuple[Any, ...]) -> None:
        self._young[key] = entry
        self._young_order += key.encode("ascii")
        if len(self._young_order) > KEY_LENGTH * (2 * len(self._young) + 16):  # keys since gone
            self._young_order = bytearray("".join(self._young).encode("ascii"))

    def _file(self, key: str, expires: float) -> None:
        bucket = int(expires // BUCKET_SECONDS)
        keys = self._buckets.get(bucket)
        if keys is None:
            keys = self._buckets[bucket] = bytearray()
        keys += key.encode("ascii")
        self._bucketed += 1
        self._earliest = min(self._earliest, bucket)

    def _rotate(self) -> None:
        self._old, self._young = self._young, {}
        self._old_order, self._young_order, self._next_out = self._young_order, bytearray(), 0

    def _drop_oldest(self) -> None:
        if not self._old:
            self._rotate()
        old, order = self._old, self._old_order
        while self._next_out < len(order):  # every key still in old is in order[next_out:]
            key = order[self._next_out : self._next_out + KEY_LENGTH].decode("ascii")
            self._next_out += KEY_LENGTH
            if old.pop(key, None) is not None:
                break
        else:  # not reached while that holds; make room all the same
            old.popitem()
        if not old:
            self._old_order, self._next_out = bytearray(), 0

    def _expire(self, now: float) -> None:
        """Drop the entries of every bucket wholly in the past."""
        limit = now // BUCKET_SECONDS
        if not self._earliest < limit:
            return
        for bucket in [b for b in self._buckets if b < limit]:
            keys = self._buckets.pop(bucket)
            self._bucketed -= len(keys) // KEY_LENGTH
            for start in range(0, len(keys), KEY_LENGTH):
                key = keys[start : start + KEY_LENGTH].decode("ascii")
                for generation in (self._young, self._old):
                    entry = generation.get(key)
                    if entry is not None and not now < entry[0]:
                        del generation[key]
        self._earliest = min(self._buckets, default=math.inf)

    def _items(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        yield from self._young.items()
        yield from self._old.items()

    def values(self) -> list[tuple[Any, ...]]:
        """Every entry held, expired or not (for tests and inspection)."""
        return [entry for _, entry in self._items()]
