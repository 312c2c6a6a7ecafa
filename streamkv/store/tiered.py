"""Tiers composed: fastest first, promote on hit, write through or back.

Reads ask the fastest tier first and stop at the first that has the object;
a hit in a lower tier is copied up in the background (``promote``). Writes:
``write_through`` puts into the first tier at once and into the others in the
background; ``write_back`` puts into the first tier only and demotes an object
to the next tier when the upper one evicts it. Background work runs in a task
group the owner passes in (nursery passing), so ``flush`` can wait for it and
closing the owner finishes it; a failing background write is logged and
counted, never raised."""

from __future__ import annotations

from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import anyio
import structlog
from anyio.abc import TaskGroup

from streamkv.errors import ConfigError
from streamkv.store.base import Buffer, ByteRange, Store
from streamkv.telemetry import Telemetry

log = structlog.get_logger(__name__)
WRITE_POLICIES = ("write_through", "write_back")


class TieredStore(Store):
    name = "tiered"
    telemetry: Telemetry = Telemetry.disabled()  # the engine sets its own: streamkv.tier.* spans

    def __init__(self, tiers: Sequence[Store], *, write_policy: str = "write_through",
                 promote: bool = True, background: TaskGroup | None = None) -> None:
        super().__init__()
        if not tiers:
            raise ConfigError("tiers", list(tiers), "at least one tier is required")
        if write_policy not in WRITE_POLICIES:
            raise ConfigError("write_policy", write_policy, f"one of {WRITE_POLICIES}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self.promote = promote
        self.background = background
        self._pending = 0
        self._moving: dict[str, bytes] = {}  # objects evicted from one tier, not yet in the next
        self._idle = anyio.Event()
        self._idle.set()
        if write_policy == "write_back":
            for upper, lower in zip(self.tiers, self.tiers[1:]):
                if hasattr(upper, "on_evict"):
                    upper.on_evict = self._demoter(lower)

    # -- background work -------------------------------------------------------
    def _spawn(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn`` in the background task group (inline-scheduled if there is none)."""
        if self.background is None:
            raise RuntimeError("no background task group")
        self._pending += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        self.background.start_soon(self._guarded, what, fn, *args)

    async def _guarded(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception as exc:  # a background write must never take the group down
            self.counters.errors += 1
            log.warning("background tier work failed", what=what, error=repr(exc))
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def _later(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Background when there is a task group, else now (but still never raising)."""
        if self.background is not None:
            self._spawn(what, fn, *args)
        else:
            self._pending += 1
            if self._idle.is_set():
                self._idle = anyio.Event()
            await self._guarded(what, fn, *args)

    async def flush(self) -> None:
        """Wait until every background write and promotion has finished."""
        while self._pending:
            await self._idle.wait()

    def _demoter(self, lower: Store) -> Callable[[str, memoryview], None]:
        def demote(key: str, data: memoryview) -> None:
            if self.background is None:
                log.warning("write_back eviction without a background group; object dropped", key=key)
                return
            copy = bytes(data)
            self._moving[key] = copy  # stays readable while it travels down
            self._spawn("demote", self._demote, lower, key, copy)
        return demote

    async def _demote(self, lower: Store, key: str, data: bytes) -> None:
        try:
            await lower.put(key, data)
        finally:
            if self._moving.get(key) is data:
                del self._moving[key]

    # -- reads -----------------------------------------------------------------
    async def get(self, key: str) -> Buffer | None:
        span = self.telemetry.tier_span("get", key)
        for i, tier in enumerate(self.tiers):
            data = await tier.get(key)
            if data is not None:
                self.counters.hits += 1
                if span is not None:
                    self.telemetry.end_tier_span(span, tier.name, memoryview(data).nbytes, "hit")
                if self.promote and i > 0:
                    await self._later("promote", self._promote_bytes, key, bytes(data), i)
                return data
        moving = self._moving.get(key)
        if moving is not None:
            self.counters.hits += 1
            self.telemetry.end_tier_span(span, "moving", len(moving), "hit")
            return moving
        self.counters.misses += 1
        self.telemetry.end_tier_span(span, None, 0, "miss")
        return None

    def reader_now(self, key: str) -> Callable[[], Buffer | None] | None:
        """The fastest tier's reader. A hit below the first tier is promoted as ``get`` does:
        the reading thread copies the bytes and has the loop start the background put (one
        short blocking call into the loop, for that object's first read only)."""
        for i, tier in enumerate(self.tiers):
            if i > 0 and tier.exists_now(key) is None:
                return None  # a tier this process cannot answer for (S3, the daemon) comes first
            read = tier.reader_now(key)
            if read is None:
                continue
            self.counters.hits += 1
            if i == 0 or not self.promote:
                return read
            if self.background is None:
                return None  # nowhere to promote in the background: get promotes inline
            return partial(self._read_and_promote, read, key, i)
        return None

    def _fastest_holding(self, key: str) -> Store | None:
        """The fastest tier that, as far as this process can tell, holds ``key``."""
        return next((tier for tier in self.tiers if tier.exists_now(key)), None)

    def cold_now(self, key: str) -> bool:
        """Whether the fastest tier that holds ``key`` would read it from a device."""
        tier = self._fastest_holding(key)
        return tier is not None and tier.cold_now(key)

    def warm_now(self, key: str) -> bool:
        """Whether the fastest tier that holds ``key`` holds it in memory."""
        tier = self._fastest_holding(key)
        return tier is not None and tier.warm_now(key)

    def _read_and_promote(self, read: Callable[[], Buffer | None], key: str, source: int) -> Buffer | None:
        data = read()
        if data is not None:
            anyio.from_thread.run_sync(self._spawn, "promote", self._promote_bytes, key, bytes(data), source)
        return data

    async def get_ranges(self, key: str, ranges: Sequence[ByteRange]) -> list[Buffer] | None:
        return (await self.get_ranges_many([(key, ranges)]))[0]

    async def get_ranges_many(self, requests: Sequence[tuple[str, Sequence[ByteRange]]]) -> list[list[Buffer] | None]:
        """Each tier in turn is asked, all at once, for the objects the tiers above lacked."""
        spans = [self.telemetry.tier_span("get", key) for key, _ in requests]
        out: list[list[Buffer] | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        for t, tier in enumerate(self.tiers):
            if not todo:
                break
            found = await tier.get_ranges_many([requests[i] for i in todo])
            for i, parts in zip(todo, found):
                if parts is not None:
                    out[i] = parts
                    self._ranges_hit(spans[i], tier.name, requests[i])
                    if self.promote and t > 0 and self.background is not None:
                        self._spawn("promote", self._promote_from, requests[i][0], t)
            todo = [i for i in todo if out[i] is None]
        for i in todo:
            key, ranges = requests[i]
            moving = self._moving.get(key)
            if moving is not None and all(0 <= off and off + n <= len(moving) for off, n in ranges):
                view = memoryview(moving)
                out[i] = [view[off : off + n] for off, n in ranges]
                self._ranges_hit(spans[i], "moving", requests[i])
            else:
                self.counters.misses += 1
                self.telemetry.end_tier_span(spans[i], None, 0, "miss")
        return out

    def _ranges_hit(self, span: Any, where: str, request: tuple[str, Sequence[ByteRange]]) -> None:
        self.counters.hits += 1
        self.telemetry.end_tier_span(span, where, sum(n for _, n in request[1]), "hit")

    async def prefetch(self, requests: Sequence[tuple[str, ByteRange]]) -> None:
        """Pass each hint to the fastest tier that holds its object, keeping the order."""
        todo = list(requests)
        for tier in self.tiers:
            if not todo:
                return
            keys = list(dict.fromkeys(key for key, _ in todo))
            held = dict(zip(keys, await tier.exists_many(keys)))
            if tier.prefetches():
                await tier.prefetch([r for r in todo if held[r[0]]])
            todo = [r for r in todo if not held[r[0]]]

    def prefetches(self) -> bool:
        return any(t.prefetches() for t in self.tiers)

    async def _promote_from(self, key: str, source: int) -> None:
        if await self.tiers[source - 1].exists(key):
            return
        data = await self.tiers[source].get(key)
        if data is not None:
            await self._promote_bytes(key, data, source)

    async def _promote_bytes(self, key: str, data: Buffer, source: int) -> None:
        for tier in self.tiers[:source]:
            await tier.put(key, data)

    async def exists(self, key: str) -> bool:
        return (await self.exists_many([key]))[0]

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Ask each tier only about the keys the faster tiers lacked."""
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        for tier in self.tiers:
            if not todo:
                break
            flags = await tier.exists_many([keys[i] for i in todo])
            for i, flag in zip(todo, flags):
                found[i] = flag
            todo = [i for i in todo if not found[i]]
        for i in todo:
            found[i] = keys[i] in self._moving
        return found

    def count_read_in_place(self, key: str, nbytes: int) -> None:
        tier = self._fastest_holding(key)  # the tier the ranged read came from
        if tier is not None:
            tier.count_read_in_place(key, nbytes)

    def exists_now(self, key: str) -> bool | None:
        """Held by some tier (or between two, being demoted) as far as this process can tell;
        None where a tier that cannot answer here may hold it."""
        unknown = False
        for tier in self.tiers:
            held = tier.exists_now(key)
            if held:
                return True
            unknown = unknown or held is None
        if key in self._moving:
            return True
        return None if unknown else False

    async def where(self, keys: Sequence[str]) -> list[list[str]]:
        """For each key, the names of the tiers that hold it."""
        per_tier = [await t.exists_many(keys) for t in self.tiers]
        return [[t.name for t, flags in zip(self.tiers, per_tier) if flags[i]] for i in range(len(keys))]

    async def list_keys(self, namespace: str | None = None) -> list[str]:
        seen: dict[str, None] = {}
        for tier in self.tiers:
            for key in await tier.list_keys(namespace):
                seen[key] = None
        return list(seen)

    # -- writes ----------------------------------------------------------------
    async def put(self, key: str, data: Buffer) -> bool:
        span = self.telemetry.tier_span("put", key)
        first = await self.tiers[0].put(key, data)
        if span is not None:
            self.telemetry.end_tier_span(span, self.tiers[0].name, memoryview(data).nbytes,
                                         "stored" if first else "refused")
        if self.write_policy == "write_through" and len(self.tiers) > 1:
            # callers hand over ``data``: it is never mutated after put
            await self._later("write_through", self._put_lower, key, data)
            return True
        self.counters.puts += int(first)
        return first

    async def _put_lower(self, key: str, data: Buffer) -> None:
        for tier in self.tiers[1:]:
            span = self.telemetry.tier_span("put", key)
            stored = await tier.put(key, data)
            if span is not None:
                self.telemetry.end_tier_span(span, tier.name, memoryview(data).nbytes,
                                             "stored" if stored else "refused")
        self.counters.puts += 1

    async def delete(self, key: str) -> bool:
        results = [await t.delete(key) for t in self.tiers]
        return any(results)

    async def aclose(self) -> None:
        await self.flush()
        for tier in self.tiers:
            await tier.aclose()

    def stats(self) -> dict:
        return {**super().stats(), "pending": self._pending, "tiers": [t.stats() for t in self.tiers]}
