"""``StreamKVStorage``: streamkv as an SGLang HiCache storage backend (L3).

SGLang loads it with ``--hicache-storage-backend dynamic`` and calls it from
its prefetch and backup threads. Every SGLang page is one streamkv object,
named by SGLang's page hash inside this rank's namespace (namespace.py), in
streamkv's layer-major chunk format (page_codec.py), stored in the configured
tiers (memory → disk → S3).

Misconfiguration raises at start-up (construction, ``register_mem_pool_host``),
so a bad flag fails the launch with the key named. After that nothing raises
into SGLang's threads: a failing tier, a corrupt object or a bug in a batch
becomes ``False`` / ``None`` / a shorter hit, logged and counted.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import structlog
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

from streamkv.engine import StreamKVEngine
from streamkv.errors import ConfigError
from streamkv.keys import prefix_hits
from streamkv.layout import DTYPE_SIZES, dtype_name
from streamkv.store.base import Store

from .counters import BackendCounters
from .extra_config import AdapterSettings, parse_extra_config
from .namespace import is_writer, model_identity, namespace_for
from .page_codec import PageCodec, layout_for
from .presence import PresenceCache

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _never_raise(default: Callable[..., Any]) -> Callable[[F], F]:
    """Wrap an SGLang-facing method: any exception becomes ``default(*args)``, logged and counted."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(self: StreamKVStorage, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                self.counters.add(f"errors.{fn.__name__}")
                log.error("storage call failed; reported as a miss", call=fn.__name__, error=repr(exc))
                return default(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return wrap


def _n_false(keys: Sequence[str], *_: Any, **__: Any) -> list[bool]:
    return [False] * len(keys)


def _n_none(keys: Sequence[str], *_: Any, **__: Any) -> list[None]:
    return [None] * len(keys)


class StreamKVStorage(HiCacheStorage):
    """SGLang HiCache L3 backed by streamkv's tiered chunk store; one object per SGLang page."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None,
                 *, tiers: Optional[Sequence[Store]] = None) -> None:
        self.storage_config = storage_config
        self.settings: AdapterSettings = parse_extra_config(storage_config.extra_config)
        self.writer = is_writer(storage_config)
        self.counters = BackendCounters()
        self.engine: StreamKVEngine | None = None
        self.codec: PageCodec | None = None
        self.presence: PresenceCache | None = None
        self._tiers = tiers  # tests and benchmarks may hand in ready tiers
        log.info(
            "streamkv storage backend created",
            model=storage_config.model_name,
            tp=f"{storage_config.tp_rank}/{storage_config.tp_size}",
            pp_rank=storage_config.pp_rank,
            mla=storage_config.is_mla_model,
            writer=self.writer,
            tiers=list(self.settings.config.tiers or ()),
        )

    # ---- set-up (may raise: this is where misconfiguration is reported) ----

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Bind to SGLang's host pool: its geometry fixes the layout and thus the namespace."""
        super().register_mem_pool_host(mem_pool_host)
        codec = PageCodec(mem_pool_host)
        pool_dtype = dtype_name(mem_pool_host.dtype)
        kv_dtype = self.settings.kv_dtype or pool_dtype
        if self.settings.kv_dtype is None and pool_dtype == "uint8":
            raise ConfigError("kv_dtype", None, "the host pool stores KV as raw bytes (fp8 KV); "
                              "set kv_dtype in extra_config to SGLang's --kv-cache-dtype")
        if DTYPE_SIZES[kv_dtype] != DTYPE_SIZES[pool_dtype]:
            raise ConfigError("kv_dtype", kv_dtype, f"element size differs from the host pool's {pool_dtype}")
        layout = layout_for(codec.geo, kv_dtype)
        model = model_identity(self.storage_config.model_name, self.settings.model_fingerprint)
        namespace = namespace_for(self.storage_config, layout, model, self.settings.namespace_extra)
        config = self.settings.config.replace(chunk_size=codec.geo.page_size)
        if self.engine is not None:
            self.engine.close()
        self.engine = StreamKVEngine(config, layout, namespace, tiers=self._tiers_for(config))
        self.presence = PresenceCache(self.engine.object_key, self.settings.exists_cache_ttl_s)
        self.codec = codec
        self.counters.page_bytes = codec.page_bytes
        log.info("streamkv storage bound to host pool", namespace=namespace.id, layout=layout.describe(),
                 host_layout=codec.geo.layout, page_bytes=codec.page_bytes)

    def _tiers_for(self, config: Any) -> Optional[Sequence[Store]]:
        """Tiers handed in, or the shared ``streamkv serve`` daemon with ``mode: daemon``
        (so that SGLang's TP ranks, separate processes, share one cache); None: in-process."""
        if self._tiers is not None:
            return self._tiers
        if config.mode == "daemon":
            from streamkv.client import DaemonStore

            return [DaemonStore.from_config(config)]
        return None

    def _ready(self) -> tuple[StreamKVEngine, PageCodec]:
        if self.engine is None or self.codec is None:
            raise RuntimeError("no host pool registered (register_mem_pool_host was not called)")
        return self.engine, self.codec

    @property
    def _presence(self) -> PresenceCache:
        assert self.presence is not None
        return self.presence

    # ---- engine calls: one per batch; the engine fetches/encodes and stores the pages
    # concurrently and copies them straight between the host pool and its objects ----

    def _read(self, keys: Sequence[str], targets: Sequence[Any]) -> list[bool]:
        """Load pages into ``targets`` (layer-first views); the leading run of hits is True."""
        engine, _ = self._ready()
        ok = engine.read_chunks_into(self._presence.store_keys(keys), targets, prefix=True)
        hits = sum(ok)
        self._presence.mark_present(keys[:hits])
        self._presence.forget(keys[hits:])
        self.counters.add("pages_read", hits)
        self.counters.add("pages_missed", len(keys) - hits)
        return ok

    def _write(self, keys: Sequence[str], sources: Sequence[Any]) -> list[bool]:
        """Store the pages not stored yet; per page, True when it is (now) stored."""
        engine, _ = self._ready()
        store_keys = self._presence.store_keys(keys)
        stored = engine.exists_now(store_keys)  # no hop onto the loop where tiers can answer here
        unknown = [i for i, s in enumerate(stored) if s is None]
        if unknown:  # a tier that cannot answer here (S3, the daemon): ask the engine
            for i, have in zip(unknown, engine.exists_many([store_keys[i] for i in unknown])):
                stored[i] = have
        todo = [i for i, have in enumerate(stored) if not have]
        self.counters.add("pages_already_stored", len(keys) - len(todo))
        results = [True] * len(keys)
        if todo:
            written = engine.write_chunks_from([store_keys[i] for i in todo], [sources[i] for i in todo])
            for i, ok in zip(todo, written):
                results[i] = ok
            n_ok = sum(written)
            self.counters.add("pages_written", n_ok)
            if n_ok < len(todo):
                self.counters.add("pages_write_failed", len(todo) - n_ok)
                log.warning("some pages were not stored", requested=len(todo), written=n_ok)
        self._presence.mark_present(k for k, ok in zip(keys, results) if ok)
        return results

    # ---- existence ----

    @_never_raise(lambda key: False)
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    @_never_raise(lambda keys, extra_info=None: 0)
    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        engine, _ = self._ready()
        if not keys:
            return 0
        known = self._presence.leading_present(keys)
        hits = known
        if known < len(keys):
            rest = self._presence.store_keys(keys[known:])
            here = engine.exists_now(rest, prefix=True)  # on this thread, from the tiers' indexes
            local = prefix_hits(here)
            hits += local
            self.counters.add("exists_answered_locally", local)
            if local < len(here) and here[local] is None:  # a tier that cannot answer here may hold it
                hits += engine.exists_prefix(rest[local:])
            self._presence.mark_present(keys[known:hits])
        self.counters.add("exists_queries")
        self.counters.add("exists_answered_from_cache", known)
        self.counters.add("exists_hit_pages", hits)
        return hits

    # ---- zero-copy path (extra_config "interface_v1": 1) ----

    @_never_raise(_n_false)
    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        _, codec = self._ready()
        if not keys:
            return []
        t0 = time.perf_counter()
        ok = self._read(keys, codec.page_views(host_indices, len(keys)))
        self.counters.sample("prefetch", sum(ok), time.perf_counter() - t0)
        return ok

    @_never_raise(_n_false)
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        _, codec = self._ready()
        if not keys:
            return []
        if not self.writer:
            self.counters.add("pages_skipped_not_writer", len(keys))
            return [True] * len(keys)
        t0 = time.perf_counter()
        ok = self._write(keys, codec.page_views(host_indices, len(keys)))  # copied out before it returns
        self.counters.sample("backup", len(keys), time.perf_counter() - t0)
        return ok

    # ---- generic path: flat page tensors ----

    @_never_raise(lambda key, *a, **k: None)
    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    @_never_raise(_n_none)
    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        _, codec = self._ready()
        if not keys:
            return []
        t0 = time.perf_counter()
        targets = [
            target_locations[i] if target_locations is not None and target_locations[i] is not None
            else self.mem_pool_host.get_dummy_flat_data_page()
            for i in range(len(keys))
        ]
        ok = self._read(keys, [codec.flat_view(t) for t in targets])
        self.counters.sample("prefetch", sum(ok), time.perf_counter() - t0)
        return [t if hit else None for t, hit in zip(targets, ok)]

    @_never_raise(lambda key, *a, **k: False)
    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    @_never_raise(lambda keys, *a, **k: False)
    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        _, codec = self._ready()
        if not keys:
            return True
        if values is None or len(values) != len(keys):
            raise ValueError(f"batch_set: {len(keys)} keys but {0 if values is None else len(values)} values")
        if not self.writer:
            self.counters.add("pages_skipped_not_writer", len(keys))
            return True
        t0 = time.perf_counter()
        ok = all(self._write(keys, [codec.flat_view(v) for v in values]))
        self.counters.sample("backup", len(keys), time.perf_counter() - t0)
        return ok

    # ---- multi-pool interface: the KV pool only ----

    @_never_raise(lambda keys, *a, **k: PoolTransferResult.empty())
    def batch_exists_v2(self, keys: List[str], pool_transfers: Optional[List[PoolTransfer]] = None,
                        extra_info: Optional[HiCacheStorageExtraInfo] = None) -> PoolTransferResult:
        """KV pages only: a request that needs another pool (Mamba, SWA, indexer) gets no hit."""
        if any(t.name != PoolName.KV for t in pool_transfers or []):
            self.counters.add("v2_unsupported_pool")
            return PoolTransferResult.empty()
        hits = self.batch_exists(keys, extra_info)
        return PoolTransferResult(hits, {PoolName.KV: hits} if hits else {}, list(range(1, hits + 1)))

    def _v2(self, transfers: List[PoolTransfer], op: Callable[..., List[bool]],
            extra_info: Optional[HiCacheStorageExtraInfo]) -> dict[str, List[bool]]:
        results: dict[str, List[bool]] = {}
        for t in transfers:
            keys = t.keys or []
            if t.name != PoolName.KV or t.host_indices is None:
                self.counters.add("v2_unsupported_pool")
                results[t.name] = [False] * len(keys)
            else:
                results[t.name] = op(keys, t.host_indices, extra_info)
        return results

    def batch_get_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> dict[str, List[bool]]:
        return self._v2(transfers, self.batch_get_v1, extra_info)

    def batch_set_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> dict[str, List[bool]]:
        return self._v2(transfers, self.batch_set_v1, extra_info)

    # ---- control ----

    @_never_raise(lambda: False)
    def clear(self) -> bool:
        """Delete this rank's namespace (not other models' or ranks' pages)."""
        engine, _ = self._ready()
        self._presence.clear()
        removed = engine.clear(namespace_only=True)
        log.info("streamkv namespace cleared", objects=removed)
        return True

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics for the batches since the last call."""
        return self.counters.drain_storage_metrics()

    def stats(self) -> dict[str, Any]:
        """Adapter counters and the engine's/tiers' stats."""
        out: dict[str, Any] = {"sglang": self.counters.snapshot()}
        if self.engine is not None:
            out.update(self.engine.stats())
        return out

    def flush(self) -> None:
        """Wait until background writes to lower tiers (disk, S3) have finished."""
        if self.engine is not None:
            self.engine.flush()

    def close(self) -> None:
        """Finish background writes and stop; SGLang calls this on detach."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
