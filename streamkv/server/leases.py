"""Zero-copy reads: the daemon's memory tier lives in shared memory, and a get of
an object it holds hands the client the object's own bytes by (segment, offset).

``ShmMemoryStore`` is the memory tier with its buffers allocated from a
shared-memory pool; a buffer goes back to the pool only when Python drops the
last reference to it. A ``Lease`` holds references to the parts a client was
given, so an object evicted or replaced meanwhile keeps its bytes until the
client says it is done (``free`` ids ride on its next request). Leases of a
closed connection are kept for a grace period, and any lease expires after
``LEASE_MAX_AGE_S``: a reader never holds a section that long."""

from __future__ import annotations

import secrets
import time
from typing import Any

import numpy as np

from streamkv.server.shm import ShmPool
from streamkv.store.base import Buffer
from streamkv.store.memory import MemoryStore
from streamkv.store.tiered import TieredStore

LEASE_GRACE_S = 30.0
LEASE_MAX_AGE_S = 120.0
MAX_LEASES = 65536


class ShmMemoryStore(MemoryStore):
    """The memory tier, each object in the daemon's tier pool (plain memory if the pool is full)."""

    def __init__(self, capacity_bytes: int, pool: ShmPool) -> None:
        super().__init__(capacity_bytes, pinned=False)
        self.pool = pool
        self.fallbacks = 0

    def new_buffer(self, size: int) -> np.ndarray:
        arr = self.pool.array(size)
        if arr is None:  # fragmentation: still stored, served by copy instead of by reference
            self.fallbacks += 1
            return np.empty(size, dtype=np.uint8)
        return arr

    def held(self, key: str) -> memoryview | None:
        """The tier's own buffer of ``key`` (never written again: a put replaces the buffer)."""
        buf = self._objects.get(key)
        return None if buf is None else memoryview(buf)

    def stats(self) -> dict:
        return {**super().stats(), "shm_fallbacks": self.fallbacks}


class LeaseTable:
    """Parts handed out by reference, by lease id, until the client frees them."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[list[Any], float, int]] = {}  # id -> (parts, expires, owner)
        self.granted = 0
        self.expired = 0
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._live)

    def grant(self, parts: list[Any], owner: int) -> int | None:
        now = time.monotonic()
        if now >= self._next_sweep:  # at most once a second: a sweep walks every lease
            self._next_sweep = now + 1.0
            self.sweep()
        if len(self._live) >= MAX_LEASES:
            return None
        lease = secrets.randbits(62)
        self._live[lease] = (parts, time.monotonic() + LEASE_MAX_AGE_S, owner)
        self.granted += 1
        return lease

    def free(self, leases: list[Any]) -> None:
        for lease in leases:
            if isinstance(lease, int):
                self._live.pop(lease, None)

    def orphan(self, owner: int) -> None:
        """The owner's connection closed: keep its leases a grace period, then drop them."""
        deadline = time.monotonic() + LEASE_GRACE_S
        for lease, (parts, expires, who) in list(self._live.items()):
            if who == owner:
                self._live[lease] = (parts, min(expires, deadline), who)

    def sweep(self) -> None:
        now = time.monotonic()
        for lease in [k for k, (_, expires, _) in self._live.items() if expires < now]:
            del self._live[lease]
            self.expired += 1

    def clear(self) -> None:
        self._live.clear()

    def stats(self) -> dict:
        return {"live": len(self._live), "granted": self.granted, "expired": self.expired}


class DaemonTieredStore(TieredStore):
    """The daemon's tiers: ``put`` takes a borrowed view (a connection's staging area, reused
    as soon as the reply is sent) and copies it once, into the memory tier; a write-through
    to the lower tiers then reads the memory tier's own immutable buffer, not the view."""

    async def put(self, key: str, data: Buffer) -> bool:
        if self.write_policy != "write_through" or len(self.tiers) == 1:
            return await super().put(key, data)  # every tier has copied before put returns
        first = self.tiers[0]
        if isinstance(first, ShmMemoryStore) and await first.put(key, data):
            held = first.held(key)
            if held is not None:
                await self._later("write_through", self._put_lower, key, held)
                return True
        return await super().put(key, bytes(data))  # lower tiers write later: they need a copy

    async def adopt(self, key: str, buf: np.ndarray) -> bool:
        """Store ``buf``, a region of the tier pool a client encoded the object into, as the
        memory tier's own buffer (no copy); lower tiers get it as ``put`` does."""
        first = self.tiers[0]
        if not isinstance(first, ShmMemoryStore):
            return False
        span = self.telemetry.tier_span("put", key)
        stored = first.adopt(key, buf)
        if span is not None:
            self.telemetry.end_tier_span(span, first.name, buf.nbytes, "stored" if stored else "refused")
        if not stored:
            return False
        if self.write_policy == "write_through" and len(self.tiers) > 1:
            await self._later("write_through", self._put_lower, key, memoryview(buf))
        else:
            self.counters.puts += 1
        return True

