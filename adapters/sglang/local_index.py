"""``batch_exists`` on SGLang's thread, from the tiers' in-memory indexes.

SGLang asks ``batch_exists`` before every prefetch; through the engine each
question is a hop onto its event loop (~0.1-0.2 ms), where ``HiCacheFile`` does
a few ``stat`` calls. When every tier is in this process and keeps an index in
memory (the memory tier's object map, the disk tier's key index), the answer
is read here instead, read-only: a dict lookup per key, and for the disk tier
a ``stat`` of the object's file where its index lacks the key (another process
sharing the directory may have written it; the disk tier's own ``exists`` does
the same, and indexes the file when it is read). Objects in transit between
tiers (``write_back`` demotion) count as present, as the engine counts them.

Where some tier cannot answer here (S3, the daemon), a key no local tier holds
is "unknown" and the caller asks the engine. The indexes are private to
``streamkv.store``: this reads ``MemoryStore._objects``, ``DiskStore._index``
and ``TieredStore._moving`` without changing them, and falls back to the engine
(``complete`` False, nothing answered here) where those are not there.
A synchronous ``exists`` in the core would replace this module."""

from __future__ import annotations

import os
from typing import Any, Sequence

from streamkv.store.disk import DiskStore
from streamkv.store.memory import MemoryStore


class LocalIndex:
    """Read-only presence answers from the in-process tiers of one engine's store."""

    def __init__(self, store: Any) -> None:
        self._maps: list[Any] = []  # dict-like key -> object/size, one per tier that has one
        self._dirs: list[str] = []  # disk tiers' roots, for keys their index lacks
        tiers = list(getattr(store, "tiers", None) or ())
        complete = bool(tiers)
        for tier in tiers:
            if isinstance(tier, MemoryStore) and isinstance(getattr(tier, "_objects", None), dict):
                self._maps.append(tier._objects)
            elif isinstance(tier, DiskStore) and isinstance(getattr(tier, "_index", None), dict):
                self._maps.append(tier._index)
                self._dirs.append(str(tier.root))
            else:
                complete = False
        moving = getattr(store, "_moving", None)
        if isinstance(moving, dict):
            self._maps.append(moving)
        elif getattr(store, "write_policy", "write_through") != "write_through":
            complete = False
        #: every tier answered here: a key found nowhere is not stored
        self.complete = complete

    def _holds(self, key: str) -> bool:
        for m in self._maps:
            if key in m:
                return True
        for root in self._dirs:
            if os.path.exists(os.path.join(root, key)):
                return True
        return False

    def lookup(self, keys: Sequence[str]) -> list[bool | None]:
        """Per store key: True (held here), False (stored nowhere), None (ask the engine)."""
        absent: bool | None = False if self.complete else None
        return [True if self._holds(k) else absent for k in keys]

    def leading(self, keys: Sequence[str]) -> tuple[int, bool]:
        """(leading keys held here, whether that count is final). Not final: the key after them
        is unknown here (a tier that cannot answer here may hold it)."""
        n = 0
        for k in keys:
            if not self._holds(k):
                return n, self.complete
            n += 1
        return n, True
