"""The engine core: lookup, retrieve, store, and the key-level calls adapters use.

Adapters translate an engine's pages, blocks and caches into these calls; the
core decides what is stored, where, and whether a hit is real. The API is
synchronous (engines call it from their own threads) and hands I/O to the
runtime's loop. Nothing here raises into an engine for a missing, slow or
corrupt object: those are misses, logged and counted."""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from typing import Any, Sequence

import numpy as np
import structlog

from streamkv.chunk_objects import ChunkObjects
from streamkv.config import StreamKVConfig
from streamkv.errors import ConfigError
from streamkv.keys import Namespace, chunk_keys, external_key, prefix_hits
from streamkv.layout import KVLayout
from streamkv.logs import configure_logging
from streamkv.pipeline.handle import RetrieveHandle
from streamkv.pipeline.producer import LayerwiseProducer
from streamkv.pipeline.saver import LayerSource, save_request
from streamkv.pipeline.sink import HostKVSink, LayerSink
from streamkv.runtime import Runtime
from streamkv.store.base import Store
from streamkv.store.limits import Limits
from streamkv.store.tiers import build_tiers
from streamkv.store.tiered import TieredStore
from streamkv.telemetry import Telemetry, op_recorder, retrieve_recorder

log = structlog.get_logger(__name__)


class StreamKVEngine:
    """One model's view of the cache: its layout, its namespace, the tiers."""

    def __init__(self, config: StreamKVConfig, layout: KVLayout, namespace: Namespace,
                 tiers: Sequence[Store] | None = None, telemetry: Telemetry | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise ConfigError("layout", layout, "expected a streamkv.layout.KVLayout")
        if namespace.layout != layout:
            raise ConfigError("namespace.layout", namespace.layout.describe(), f"differs from {layout.describe()}")
        if layout.chunk_size != config.chunk_size:
            raise ConfigError("chunk_size", layout.chunk_size, f"layout and config ({config.chunk_size}) disagree")
        configure_logging(config.log_format, config.log_level, force=False)
        self.config = config
        self.layout = layout
        self.namespace = namespace
        self.limits = Limits(disk_io=config.disk_io_threads, s3_requests=config.s3_max_concurrency,
                             codec=config.codec_threads)
        if tiers is not None:
            built = list(tiers)
        elif config.mode == "daemon":
            from streamkv.client import DaemonStore  # the tiers live in `streamkv serve`

            built = [DaemonStore.from_config(config)]
        else:
            built = build_tiers(config, self.limits)
        self.runtime = Runtime()
        try:  # a remote tier that cannot work is a clear error now, not misses later
            for tier in built:
                if hasattr(tier, "check"):
                    self.runtime.call(tier.check)
        except BaseException:
            self.runtime.close()
            raise
        self.store = TieredStore(built, write_policy=config.write_policy, promote=config.promote_on_hit,
                                 background=self.runtime.background)
        self.counters: dict[str, int] = {}
        self.objects = ChunkObjects(self.store, layout, namespace, self.limits, config.compression, self.counters)
        self.telemetry = telemetry if telemetry is not None else Telemetry.from_config(config)
        self.store.telemetry = self.telemetry
        self.telemetry.attach(self)
        self._closed = False
        self._retrieving: weakref.WeakSet[RetrieveHandle] = weakref.WeakSet()  # producers still running

    # -- keys ----------------------------------------------------------------
    def keys(self, tokens: Any) -> list[str]:
        """Store keys of the full chunks of ``tokens`` (a partial tail has none)."""
        return chunk_keys(tokens, self.layout.chunk_size, self.namespace)

    def object_key(self, name: str) -> str:
        """Store key for an object named by the engine's own hash (SGLang page hashes)."""
        return external_key(self.namespace, name)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- lookup ----------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """Tokens of the longest stored prefix made of full chunks."""
        keys = self.keys(tokens)
        hits = self.exists_prefix(keys)
        self._count("lookups")
        return hits * self.layout.chunk_size

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        rec = op_recorder(self.telemetry, "lookup", "streamkv.lookup", namespace=self.namespace.id,
                          chunks=len(keys))
        found = self.runtime.call(self.store.exists_many, list(keys))
        if rec is not None:  # every lookup path (lookup, exists_prefix, adapters' batch exists) comes here
            hits = prefix_hits(found) * self.layout.chunk_size
            rec.done("hit" if hits else "miss", {"streamkv.present": sum(found), "streamkv.hit_tokens": hits})
        return found

    def exists_now(self, keys: Sequence[str], prefix: bool = False) -> list[bool | None]:
        """Per key, presence answered on the caller's thread from the in-process tiers' own
        state, with no hop onto the loop: True, False (stored nowhere), or None (a tier that
        cannot answer here, S3 or the daemon, may hold it: ask ``exists_many``). ``prefix``:
        stop after the first answer that is not True. Not traced: callers on a hot path
        (SGLang's ``batch_exists``) count these answers themselves."""
        out: list[bool | None] = []
        for key in keys:
            out.append(self.store.exists_now(key))
            if prefix and not out[-1]:
                break
        return out

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """Number of leading keys that some tier holds."""
        return prefix_hits(self.exists_many(keys))

    def where(self, keys: Sequence[str]) -> list[list[str]]:
        """For each key, the tiers that hold it (for the control API)."""
        return self.runtime.call(self.store.where, list(keys))

    # -- retrieve --------------------------------------------------------------
    def retrieve(self, tokens: Any, sink: LayerSink | None = None, max_tokens: int | None = None) -> RetrieveHandle:
        """Start streaming the stored prefix of ``tokens``, layer by layer.

        Returns at once; ``handle.hit_tokens`` blocks until the hit is known and
        ``handle.wait(layer)`` until that layer is in ``sink`` (a ``HostKVSink``
        by default, reachable as ``handle.sink``)."""
        keys = self.keys(tokens)
        if max_tokens is not None:
            keys = keys[: max(0, max_tokens) // self.layout.chunk_size]
        return self.retrieve_keys(keys, sink, prompt=tokens)

    def retrieve_keys(self, keys: Sequence[str], sink: LayerSink | None = None, prompt: Any = None) -> RetrieveHandle:
        """``retrieve`` for chunk keys an adapter already holds (vLLM's scheduler computes
        them per rank); ``prompt`` (the tokens, if known) only sizes the telemetry."""
        keys = list(keys)
        if prompt is None:
            prompt = range(len(keys) * self.layout.chunk_size)
        sink = sink if sink is not None else HostKVSink(self.layout)
        handle = RetrieveHandle(self.layout.num_layers, self.layout.chunk_size, len(keys))
        handle.sink = sink  # type: ignore[attr-defined]
        handle.trace = rec = retrieve_recorder(self.telemetry, handle, prompt, self.namespace.id, self.counters)
        producer = LayerwiseProducer(self.store, keys, self.layout, self.namespace, handle, sink,
                                     self.limits, self.config.max_inflight_layers, self.counters)
        handle._release = lambda layer: self.runtime.submit(producer.release, layer)
        self._retrieving.add(handle)
        handle.future = future = self.runtime.submit(self.telemetry.bind(producer.run, rec.context if rec else None))
        if rec is not None:
            future.add_done_callback(rec.producer_done)
        future.add_done_callback(lambda f: self._after_retrieve(f, handle))
        self._count("retrieves")
        return handle

    def _after_retrieve(self, future: Future[None], handle: RetrieveHandle) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._count("retrieve_errors")
            log.error("retrieve failed; treated as a miss", error=repr(future.exception()))
            handle.cancel()
        # break handle -> future -> callbacks -> handle, so a finished handle (and its
        # sink, often tens of MB) is freed by reference counting, not a later GC pass
        # (the handle drops its release hook, the other cycle, after the last layer)
        handle.future = None
        self._retrieving.discard(handle)

    # -- store -----------------------------------------------------------------
    def store_kv(self, tokens: Any, source: LayerSource) -> Future[int]:
        """Store the full chunks of ``tokens`` from ``source`` without blocking the caller.

        ``source(layer)`` returns that layer's planes (K, V as ``[T, H, D]``, or
        the MLA latent ``[T, D]``) as host arrays; it runs on a worker thread.
        The future resolves to the number of chunks written."""
        keys = self.keys(tokens)
        self._count("stores")
        if not keys:
            done: Future[int] = Future()
            done.set_result(0)
            return done
        rec = op_recorder(self.telemetry, "store", "streamkv.store", namespace=self.namespace.id,
                          chunks=len(keys))
        future = self.runtime.submit(self.telemetry.bind(self._store_guarded, rec.context if rec else None),
                                     keys, source)
        if rec is not None:
            future.add_done_callback(rec.done_future)
        return future

    async def _store_guarded(self, keys: list[str], source: LayerSource) -> int:
        try:
            return await save_request(self.store, keys, source, self.layout, self.namespace, self.limits,
                                      self.config.compression, self.counters)
        except Exception as exc:  # never into the engine: a dropped store is a future miss
            self._count("store_errors")
            log.error("store failed; nothing stored", error=repr(exc))
            return 0

    # -- key-level objects (adapters with their own page hashes): chunk_objects.py --

    def write_chunks(self, items: Sequence[tuple[str, Any]], wait: bool = False) -> Future[int] | int:
        """Encode and store whole chunk payloads (all layer sections, in layer order).

        Resolves to the number of chunks written (a payload of the wrong size is rejected and
        counted); payloads must stay unchanged until then. ``write_chunks_from`` is the same
        with per-key results and payloads in the caller's own layout."""
        rec = op_recorder(self.telemetry, "store", "streamkv.store", namespace=self.namespace.id,
                          chunks=len(items), api="chunks")
        future = self.runtime.submit(self.telemetry.bind(self._write_chunks, rec.context if rec else None),
                                     list(items))
        if rec is not None:
            future.add_done_callback(rec.done_future)
        return future.result() if wait else future

    async def _write_chunks(self, items: list[tuple[str, Any]]) -> int:
        return sum(await self.objects.write(items))

    def write_chunks_from(self, keys: Sequence[str], sources: Sequence[Any]) -> list[bool]:
        """Store one chunk object per key, its sections copied straight out of the caller's memory.

        ``sources[i]`` is a buffer of ``layout.chunk_bytes`` (the sections in layer order), or an
        array whose first axis is the layer: ``sources[i][l]`` holds layer ``l``'s section
        (``layout.section_bytes``, read in C order, any strides; e.g. a permuted view of an
        engine's host-pool page, so that re-ordering it is the one copy into the object). Blocks
        until every object is stored or has failed: the caller may reuse its memory on return.
        Per-key results; a source of the wrong size is False (rejected and counted)."""
        keys = list(keys)
        if len(sources) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(sources)} sources")
        rec = op_recorder(self.telemetry, "store", "streamkv.store", namespace=self.namespace.id,
                          chunks=len(keys), api="chunks")
        try:
            results = self.runtime.call(self.telemetry.bind(self.objects.write, rec.context if rec else None),
                                        list(zip(keys, sources)))
        except BaseException:
            if rec is not None:
                rec.done("error")
            raise
        if rec is not None:
            written = sum(results)
            rec.done("stored" if written else "skipped", {"streamkv.chunks_written": written})
        return results

    def read_chunks(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """Whole verified chunk payloads (uint8), or None for a missing or corrupt one."""
        rec = op_recorder(self.telemetry, "retrieve", "streamkv.retrieve", namespace=self.namespace.id,
                          chunks=len(keys), api="chunks")
        out = self.runtime.call(self.telemetry.bind(self._read_chunks, rec.context if rec else None), list(keys))
        if rec is not None:
            _record_read(rec, [x is not None for x in out], self.layout.chunk_size)
        return out

    async def _read_chunks(self, keys: list[str]) -> list[np.ndarray | None]:
        out = [np.empty(self.layout.chunk_bytes, dtype=np.uint8) for _ in keys]
        ok = await self.objects.read_into(keys, out, prefix=False)
        return [buf if hit else None for buf, hit in zip(out, ok)]

    def read_chunks_into(self, keys: Sequence[str], dests: Sequence[Any], prefix: bool = False) -> list[bool]:
        """Read, verify and copy chunk objects straight into the caller's memory.

        ``dests[i]`` takes the forms of ``write_chunks_from``'s sources, writable: a buffer of
        ``layout.chunk_bytes`` or a layer-first array (any strides, e.g. a permuted view of a
        host-pool page). An object is copied only after all its sections verified, so a missing,
        corrupt or foreign object leaves its destination untouched (False). With ``prefix``, the
        first miss ends the hit: later objects are neither copied nor reported (SGLang's
        ``batch_get`` contract). Objects are fetched and copied concurrently."""
        keys = list(keys)
        if len(dests) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        rec = op_recorder(self.telemetry, "retrieve", "streamkv.retrieve", namespace=self.namespace.id,
                          chunks=len(keys), api="chunks")
        ok = self.runtime.call(self.telemetry.bind(self.objects.read_into, rec.context if rec else None),
                               keys, list(dests), prefix)
        if rec is not None:
            _record_read(rec, ok, self.layout.chunk_size)
        return ok

    # -- control ---------------------------------------------------------------
    def flush(self) -> None:
        """Wait until background writes (lower tiers) have finished."""
        self.runtime.call(self.store.flush)

    def clear(self, namespace_only: bool = True) -> int:
        return self.runtime.call(self.store.clear, self.namespace.id if namespace_only else None)

    def stats(self) -> dict[str, Any]:
        return {"engine": dict(self.counters), "store": self.store.stats()}

    def close(self) -> None:
        """Finish background writes and stop the loop; safe to call twice. Retrieves still
        streaming are cancelled (their waiters get False): a consumer that stopped taking
        layers would otherwise hold its producer, and the loop, forever."""
        if self._closed:
            return
        self._closed = True
        for handle in list(self._retrieving):
            handle.cancel()
        try:
            self.runtime.call(self.store.aclose)
        finally:
            self.runtime.close()
            self.telemetry.detach(self)
            self.telemetry.force_flush()

    def __enter__(self) -> StreamKVEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_read(rec: Any, hits: list[bool], chunk_size: int) -> None:
    found = sum(hits)
    rec.done("hit" if found == len(hits) and found else "partial" if found else "miss",
             {"streamkv.hit_tokens": found * chunk_size},
             hit_tokens=found * chunk_size, miss_tokens=(len(hits) - found) * chunk_size)
