"""The control API: inspect and steer what the tiers hold.

The same async functions serve the daemon (on its own ``TieredStore``) and an
engine in process (``InProcessControl`` wraps them for the engine's loop).
They work on whole chunk objects by key and never need a layout: compress
reads the layout from each object's own verified header."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Sequence

import anyio
import structlog

from streamkv.errors import ConfigError
from streamkv.format import FormatError, decode_chunk, encode_chunk, parse_header, CODEC_LZ4
from streamkv.keys import prefix_hits
from streamkv.store.base import Store, check_key
from streamkv.store.memory import MemoryStore
from streamkv.store.tiered import TieredStore

log = structlog.get_logger(__name__)
HEALTH_TIMEOUT_S = 2.0
_PROBE_KEY = "streamkvhealth/probe"


def _tier(store: TieredStore, name: str) -> Store:
    for tier in store.tiers:
        if tier.name == name:
            return tier
    raise ConfigError("tier", name, f"not configured; tiers are {[t.name for t in store.tiers]}")


def _memory(store: TieredStore) -> MemoryStore:
    tier = _tier(store, "memory")
    assert isinstance(tier, MemoryStore)
    return tier


def _checked(keys: Sequence[str]) -> list[str]:
    return [check_key(k) for k in keys]


async def lookup(store: TieredStore, keys: Sequence[str]) -> dict[str, Any]:
    """Hit length (leading chunks held somewhere) and the tiers that hold each chunk."""
    tiers = await store.where(_checked(keys))
    return {"hit_chunks": prefix_hits([bool(t) for t in tiers]), "tiers": tiers}


async def list_keys(store: TieredStore, namespace: str | None = None, prefix: str | None = None) -> list[str]:
    keys = await store.list_keys(namespace)
    return [k for k in keys if prefix is None or k.startswith(prefix)]


async def pin(store: TieredStore, keys: Sequence[str]) -> int:
    """Pin chunks in the memory tier, bringing them up from lower tiers first; returns how many."""
    memory = _memory(store)
    pinned = 0
    for key in _checked(keys):
        if not await memory.exists(key):
            data = await store.get(key)
            if data is None or not await memory.put(key, data):
                log.warning("pin: chunk not held or does not fit in memory", key=key)
                continue
        pinned += int(memory.pin(key))
    return pinned


async def unpin(store: TieredStore, keys: Sequence[str]) -> int:
    memory = _memory(store)
    return sum(int(memory.unpin(k)) for k in _checked(keys))


async def clear(store: TieredStore, namespace: str | None = None, prefix: str | None = None) -> int:
    """Delete every chunk, or one namespace's, or those whose key starts with ``prefix``."""
    if prefix is None:
        return await store.clear(namespace)
    doomed = await list_keys(store, namespace, prefix)
    return sum(await store.delete_many(doomed))


async def move(store: TieredStore, keys: Sequence[str], tier: str) -> int:
    """Put chunks into ``tier``; a demotion also drops the copies in faster tiers.

    Promotion keeps the lower copies (tiers are caches of each other); returns
    how many chunks now sit in ``tier`` because of this call."""
    target = _tier(store, tier)
    rank = store.tiers.index(target)
    moved = 0
    for key in _checked(keys):
        holders = [t for t in store.tiers if await t.exists(key)]
        if not holders:
            continue
        if target not in holders:
            data = await holders[0].get(key)
            if data is None or not await target.put(key, bytes(data)):
                continue
        for upper in store.tiers[:rank]:
            if upper in holders:
                if isinstance(upper, MemoryStore) and upper.is_pinned(key):
                    continue  # a pinned chunk stays in memory until unpinned
                await upper.delete(key)
        moved += 1
    return moved


async def drain(store: TieredStore) -> int:
    """Copy every object that only a faster tier holds into the next tier down (write-back
    shutdown); returns how many were written."""
    written = 0
    for upper, lower in zip(store.tiers, store.tiers[1:]):
        keys = await upper.list_keys()
        present = await lower.exists_many(keys)
        for key, there in zip(keys, present):
            if there:
                continue
            data = await upper.get(key)
            if data is not None and await lower.put(key, bytes(data)):
                written += 1
    return written


def _recompress(obj: Any) -> bytearray | None:
    """The object re-encoded with lz4 where it pays, or None when nothing would shrink."""
    header = parse_header(obj)
    if all(s.codec == CODEC_LZ4 for s in header.sections):
        return None
    _, sections = decode_chunk(obj)
    digest = SimpleNamespace(digest=header.namespace_digest)
    new = encode_chunk(digest, header.layout, sections, header.num_tokens, compression="lz4")  # type: ignore[arg-type]
    return new if len(new) < len(memoryview(obj).cast("B")) else None


async def compress(store: TieredStore, namespace: str | None = None,
                   keys: Sequence[str] | None = None) -> dict[str, int]:
    """Re-encode stored chunks with lz4 where that saves bytes, tier by tier."""
    out = {"examined": 0, "recompressed": 0, "corrupt": 0, "bytes_before": 0, "bytes_after": 0}
    todo = _checked(keys) if keys is not None else await store.list_keys(namespace)
    for tier in store.tiers:
        for key in todo:
            obj = await tier.get(key)
            if obj is None:
                continue
            out["examined"] += 1
            try:
                new = await anyio.to_thread.run_sync(_recompress, obj)
            except FormatError as exc:
                out["corrupt"] += 1
                log.warning("compress: chunk unusable; left alone", key=key, tier=tier.name, error=str(exc))
                continue
            if new is not None and await tier.put(key, new):
                out["recompressed"] += 1
                out["bytes_before"] += len(memoryview(obj).cast("B"))
                out["bytes_after"] += len(new)
    return out


async def health(store: TieredStore) -> dict[str, Any]:
    """Each tier answers a probe within a bounded time, and its breaker (if any) is closed."""
    tiers = []
    for tier in store.tiers:
        entry: dict[str, Any] = {"tier": tier.name, "ok": True}
        start = time.perf_counter()
        try:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                await tier.exists(_PROBE_KEY)
        except Exception as exc:
            entry.update(ok=False, error=repr(exc))
        entry["probe_ms"] = round((time.perf_counter() - start) * 1e3, 3)
        breaker = getattr(tier, "breaker", None) or getattr(tier, "circuit", None)
        if breaker is not None and hasattr(breaker, "state"):
            entry["circuit"] = str(getattr(breaker.state, "value", breaker.state))
            entry["ok"] = entry["ok"] and entry["circuit"] != "open"
        tiers.append(entry)
    return {"ok": all(t["ok"] for t in tiers), "tiers": tiers}


def stats(store: TieredStore) -> dict[str, Any]:
    """Per-tier usage and counters, plus the overall hit rate."""
    s = store.stats()
    lookups = s.get("hits", 0) + s.get("misses", 0)
    s["hit_rate"] = round(s.get("hits", 0) / lookups, 4) if lookups else None
    return s


class InProcessControl:
    """The control API for an in-process engine, called from the engine's threads."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def _call(self, fn: Any, *args: Any) -> Any:
        return self.engine.runtime.call(fn, self.engine.store, *args)

    def lookup(self, keys: Sequence[str]) -> dict[str, Any]:
        return self._call(lookup, list(keys))

    def pin(self, keys: Sequence[str]) -> int:
        return self._call(pin, list(keys))

    def unpin(self, keys: Sequence[str]) -> int:
        return self._call(unpin, list(keys))

    def clear(self, namespace: str | None = None, prefix: str | None = None) -> int:
        return self._call(clear, namespace, prefix)

    def move(self, keys: Sequence[str], tier: str) -> int:
        return self._call(move, list(keys), tier)

    def compress(self, namespace: str | None = None, keys: Sequence[str] | None = None) -> dict[str, int]:
        return self._call(compress, namespace, None if keys is None else list(keys))

    def health(self) -> dict[str, Any]:
        return self._call(health)

    def stats(self) -> dict[str, Any]:
        return stats(self.engine.store)
