"""The engine core: lookup, retrieve, store, and the key-level calls adapters use.

Adapters translate an engine's pages, blocks and caches into these calls; the
core decides what is stored, where, and whether a hit is real. The API is
synchronous (engines call it from their own threads) and hands I/O to the
runtime's loop. Nothing here raises into an engine for a missing, slow or
corrupt object: those are misses, logged and counted."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Sequence

import anyio
import numpy as np
import structlog

from streamkv.config import StreamKVConfig
from streamkv.errors import ConfigError
from streamkv.format import FormatError, encode_chunk
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
        self.telemetry = telemetry if telemetry is not None else Telemetry.from_config(config)
        self.store.telemetry = self.telemetry
        self.telemetry.attach(self)
        self._closed = False

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

    # -- key-level objects (adapters with their own page hashes) ---------------
    # Writes copy the caller's memory once, straight into the buffer that goes to the store
    # (a caller's page layout is re-ordered into layer sections by that same copy), and store
    # sections raw unless lz4 pays. Reads verify every section of an object before any of its
    # bytes reach the caller's memory; from the local tiers they read the store's own mapping
    # of the object (no copy). A missing, corrupt or foreign object is a miss, never an error.

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
        return sum(await self._write_objects(items))

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
            results = self.runtime.call(self.telemetry.bind(self._write_objects, rec.context if rec else None),
                                        list(zip(keys, sources)))
        except BaseException:
            if rec is not None:
                rec.done("error")
            raise
        if rec is not None:
            written = sum(results)
            rec.done("stored" if written else "skipped", {"streamkv.chunks_written": written})
        return results

    async def _write_objects(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Encode and put every item; True where the store took it.

        Objects are encoded in waves, each wave split over a few worker lanes (one thread hop per
        lane, not per object: on small pages the hop costs more than the encode), and put while
        the next wave encodes. At most two waves of encoded objects exist at a time."""
        from streamkv.format import header_size

        results = [False] * len(items)
        todo: list[tuple[int, str, np.ndarray]] = []
        for i, (key, source) in enumerate(items):
            try:
                todo.append((i, key, self._as_sections(source, writable=False)))
            except (TypeError, ValueError) as exc:
                self._count("store_rejected")
                log.error("chunk payload rejected", key=key, error=str(exc))
        size = header_size(self.layout.num_layers) + self.layout.chunk_bytes
        lanes = max(1, self.limits.codec)
        wave = max(lanes, min(32, _WAVE_BYTES // size))
        room = anyio.Semaphore(2 * wave)
        codec = self.limits.limiter("codec")
        # Puts at once: more concurrent writes into the page cache only contend in the kernel.
        putting = anyio.CapacityLimiter(max(2, lanes))

        async def put(i: int, key: str, buf: np.ndarray, obj: Any) -> None:
            try:
                async with putting:
                    results[i] = bool(await self.store.put(key, obj))
            except Exception as exc:  # one bad object is one miss later, not a failed batch
                self._count("store_errors")
                log.error("chunk write failed; not stored", key=key, error=repr(exc))
            finally:
                self._recycle_buffer(buf, obj)
                room.release()

        async def encode(jobs: list[tuple[int, str, np.ndarray, np.ndarray]], out: list[Any]) -> None:
            out.extend(await anyio.to_thread.run_sync(self._encode_many, jobs, limiter=codec))

        async with anyio.create_task_group() as tg:
            for w in range(0, len(todo), wave):
                batch = todo[w : w + wave]
                for _ in batch:
                    await room.acquire()
                jobs = [(i, key, sections, self._object_buffer(size)) for i, key, sections in batch]
                done: list[Any] = []
                async with anyio.create_task_group() as lane_group:
                    for k in range(min(lanes, len(jobs))):
                        lane_group.start_soon(encode, jobs[k::lanes], done)
                for i, key, obj, buf in done:
                    if isinstance(obj, BaseException):
                        self._count("store_errors")
                        log.error("chunk encode failed; not stored", key=key, error=repr(obj))
                        room.release()
                        continue
                    tg.start_soon(put, i, key, buf, obj)
        self._count("stored_chunks", sum(results))
        return results

    def _encode_many(self, jobs: list[tuple[int, str, np.ndarray, np.ndarray]]) -> list[tuple[int, str, Any, Any]]:
        """One lane's share of a wave, on a worker thread: (index, key, object or error, buffer)."""
        out: list[tuple[int, str, Any, Any]] = []
        for i, key, sections, buf in jobs:
            try:
                out.append((i, key, self._encode_object(buf, sections), buf))
            except Exception as exc:
                out.append((i, key, exc, buf))
        return out

    def _as_sections(self, buf: Any, writable: bool) -> np.ndarray:
        """``buf`` as an array indexed by layer, ``[l]`` holding that layer's section bytes."""
        L, n = self.layout.num_layers, self.layout.section_bytes
        if isinstance(buf, np.ndarray) and buf.ndim >= 2 and buf.shape[0] == L:
            arr = buf
        else:
            try:
                arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
            except TypeError as exc:
                raise ValueError(f"not a contiguous buffer or a layer-first array ({exc})") from None
            if arr.nbytes != L * n:
                raise ValueError(f"payload of {arr.nbytes} bytes; layout says {L * n}")
            arr = arr.reshape(L, n)
        if arr.nbytes != L * n:
            raise ValueError(f"{arr.nbytes} bytes in {L} layers; layout says {L * n}")
        if writable and not arr.flags.writeable:
            raise ValueError("destination is read-only")
        return arr

    def _encode_object(self, buf: np.ndarray, sections: np.ndarray) -> Any:
        """Copy ``sections`` into ``buf`` after the header room and finish the object there
        (raw sections); where lz4 pays, a new compressed object instead. On a worker thread."""
        import xxhash

        from streamkv.format import header_size

        L, n = self.layout.num_layers, self.layout.section_bytes
        body = buf[header_size(L):]
        np.copyto(body.view(sections.dtype).reshape(sections.shape), sections)
        layers = body.reshape(L, n)
        if self._worth_compressing(layers):
            return encode_chunk(self.namespace, self.layout, list(layers), compression=self.config.compression)
        self._pack_raw_header(buf, [xxhash.xxh3_64_intdigest(layers[l]) for l in range(L)])
        return buf

    def _worth_compressing(self, layers: np.ndarray) -> bool:
        """``compression``: off → no; lz4 → yes; auto → when lz4 saves ``MIN_SAVING`` on a probe
        of a few slices across the layers (one probe per object, not one per section: KV of one
        page compresses alike in every layer, and probing each section cost more than the copy)."""
        import lz4.block

        from streamkv.format import MIN_SAVING

        mode = self.config.compression
        if mode == "off" or layers.shape[1] < 1024:
            return False
        if mode == "lz4":
            return True
        L = layers.shape[0]
        size = min(layers.shape[1], 8192)
        picks = sorted({0, L // 3, (2 * L) // 3, L - 1})
        packed = sum(len(lz4.block.compress(layers[l, :size], store_size=False)) for l in picks)
        return packed <= (1 - MIN_SAVING) * size * len(picks)

    def _pack_raw_header(self, out: np.ndarray, checksums: list[int]) -> None:
        """The header ``format.encode_chunk`` writes for raw sections, packed in place.
        (Byte-for-byte equal to encode_chunk(compression="off"); tests/test_engine.py checks.)"""
        import xxhash

        from streamkv import format as fmt

        layout, L, n = self.layout, self.layout.num_layers, self.layout.section_bytes
        hsize = fmt.header_size(L)
        fmt._FIXED.pack_into(out, 0, fmt.MAGIC, fmt.FORMAT_VERSION, 0, hsize, L, layout.chunk_size,
                             layout.chunk_size, self.namespace.digest, layout.num_kv_heads, layout.head_size,
                             fmt._DTYPE_CODES[layout.dtype], int(layout.mla))
        pos, offset = fmt._FIXED.size, hsize
        for checksum in checksums:
            fmt._ENTRY.pack_into(out, pos, offset, n, n, checksum, fmt.CODEC_RAW)
            pos += fmt._ENTRY.size
            offset += n
        fmt._TAIL.pack_into(out, pos, xxhash.xxh3_64_intdigest(memoryview(out)[:pos]))

    def _object_buffer(self, size: int) -> np.ndarray:
        """A buffer for one encoded object: a recycled one when there is one (loop thread only)."""
        free = self.__dict__.get("_free_buffers")
        if free:
            for i, b in enumerate(free):
                if b.nbytes == size:
                    return free.pop(i)
        return np.empty(size, dtype=np.uint8)

    def _recycle_buffer(self, buf: np.ndarray, obj: Any) -> None:
        """Keep ``buf`` for the next object when the store is done with it once ``put`` returns:
        one memory or disk tier (or write_back, which puts into the first tier only); those copy
        or write the bytes. With write_through to more tiers the lower puts run later, holding it."""
        from streamkv.store.disk import DiskStore
        from streamkv.store.memory import MemoryStore

        if obj is not buf:
            return
        tiers = getattr(self.store, "tiers", None)
        if not tiers or not (len(tiers) == 1 or getattr(self.store, "write_policy", "") == "write_back"):
            return
        if type(tiers[0]) not in (MemoryStore, DiskStore):
            return
        free = self.__dict__.setdefault("_free_buffers", [])
        if sum(b.nbytes for b in free) + buf.nbytes <= _RECYCLE_BYTES:
            free.append(buf)

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
        ok = await self._read_objects(keys, out, prefix=False)
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
        ok = self.runtime.call(self.telemetry.bind(self._read_objects, rec.context if rec else None),
                               keys, list(dests), prefix)
        if rec is not None:
            _record_read(rec, ok, self.layout.chunk_size)
        return ok

    async def _read_objects(self, keys: list[str], dests: list[Any], prefix: bool) -> list[bool]:
        """Fetch every object concurrently; verify and copy them on a few worker "lanes" that
        take objects as they arrive (a thread hop per object costs more than verifying it)."""
        n = len(keys)
        targets: list[np.ndarray | None] = [None] * n
        for i, dest in enumerate(dests):
            try:
                targets[i] = self._as_sections(dest, writable=True)
            except (TypeError, ValueError) as exc:
                self._count("retrieve_rejected")
                log.error("chunk destination rejected", key=keys[i], error=str(exc))
        gate = _ReadGate(n, prefix, lanes=self.limits.codec)
        mapped = self._mapped_reads()
        codec = self.limits.limiter("codec")

        async def lane() -> None:
            await anyio.to_thread.run_sync(gate.drain, self._verified_sections, self._copy_sections, limiter=codec)

        async def fetch(i: int, tg: Any) -> None:
            box = None
            try:
                if targets[i] is not None and not gate.hopeless(i):
                    box = await self._fetch_object(keys[i], mapped)
            except Exception as exc:  # never into the engine: a failed read is a miss
                self._count("retrieve_errors")
                log.error("chunk read failed; miss", key=keys[i], error=repr(exc))
                box = None
            if gate.put(i, box, targets[i]):
                tg.start_soon(lane)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(fetch, i, tg)
        for i, exc in gate.failures:
            if isinstance(exc, FormatError):
                self._chunk_corrupt(keys[i], exc)
            else:
                self._count("retrieve_errors")
                log.error("chunk read failed; miss", key=keys[i], error=repr(exc))
        return gate.results()

    def _mapped_reads(self) -> bool:
        """Read objects in place (ranged reads that are views of the tier's mapping or buffer)
        rather than whole: only where every tier is memory (its buffers are never reused) or a
        disk reading through mmap (its files are replaced by rename, never changed in place; not
        ``direct_reads``, whose views are of pooled buffers that other reads reuse), and objects
        are large. Measured on the development VM: a fresh buffer per object of several MiB costs
        more than reading into it (page faults, unmapping), and mapped cold reads of small files
        were slower than whole reads. A store read into caller buffers would replace both."""
        from streamkv.store.disk import DiskStore
        from streamkv.store.memory import MemoryStore

        tiers = getattr(self.store, "tiers", None)
        return bool(tiers) and self.layout.chunk_bytes >= _MAPPED_READ_BYTES and all(
            isinstance(t, MemoryStore) or (isinstance(t, DiskStore) and _mapping_disk(t)) for t in tiers
        )

    async def _fetch_object(self, key: str, mapped: bool) -> list[Any] | None:
        """``[the object's bytes]`` (from offset 0; maybe longer than the object), or None: a miss.

        ``mapped``: a ranged read of the header, whose view slices the tier's own mapping of the
        file or its buffer: that whole mapping is the object, read in place with no copy (the
        disk tier has started reading the file ahead). Otherwise, or where the view is not such
        a slice, a whole-object get. Bytes that are not the object's fail verification."""
        from streamkv.format import header_size

        if mapped:
            hsize = header_size(self.layout.num_layers)
            parts = await self.store.get_ranges(key, [(0, hsize)])
            if parts is None:
                return None
            whole = getattr(parts[0], "obj", None)  # a memoryview's exporter: what it slices
            if whole is not None:
                try:  # the same memory from offset 0 (compared by address: reading it here would
                    # wait for the disk on the loop; the lane that verifies it waits instead)
                    view = memoryview(whole).cast("B")
                    if len(view) >= hsize and _address(view) == _address(parts[0]):
                        return [view]
                except (TypeError, ValueError):
                    pass
        obj = await self.store.get(key)
        return None if obj is None else [obj]

    def _verified_sections(self, data: Any) -> Any:
        """Every section of the object in ``data`` checked against its checksum: a
        ``(layers, section_bytes)`` view where the object is raw and in order (one copy out),
        else a list of per-layer buffers."""
        from streamkv.format import CODEC_RAW, LayoutMismatch, Truncated, decode_section, parse_header

        view = memoryview(data).cast("B")
        header = parse_header(view, self.namespace, self.layout)
        if len(view) < header.total_len:
            raise Truncated(f"object is {len(view)} bytes, header says {header.total_len}")
        if header.num_tokens != self.layout.chunk_size:
            raise LayoutMismatch(f"a partial chunk of {header.num_tokens} tokens")
        n = self.layout.section_bytes
        raws = []
        in_order = True
        expect = header.size
        for layer, sec in enumerate(header.sections):
            if sec.raw_len != n:
                raise LayoutMismatch(f"layer {layer}: {sec.raw_len} bytes, layout says {n}")
            raws.append(decode_section(header, layer, view[sec.offset : sec.offset + sec.stored_len]))
            in_order = in_order and sec.codec == CODEC_RAW and sec.offset == expect
            expect = sec.offset + sec.stored_len
        if in_order:
            return np.frombuffer(view[header.size : header.size + len(raws) * n], dtype=np.uint8).reshape(len(raws), n)
        return raws

    @staticmethod
    def _copy_sections(sections: Any, targets: np.ndarray) -> None:
        if isinstance(sections, np.ndarray):  # the whole body in one (re-ordering) copy
            np.copyto(targets, sections.view(targets.dtype).reshape(targets.shape))
            return
        for layer, raw in enumerate(sections):
            t = targets[layer]
            np.copyto(t, np.frombuffer(raw, dtype=t.dtype).reshape(t.shape))

    def _chunk_corrupt(self, key: str, exc: Exception) -> None:
        self._count("retrieve_corrupt")
        log.warning("chunk unusable; miss", key=key, error=type(exc).__name__, why=str(exc))

    # -- control ---------------------------------------------------------------
    def flush(self) -> None:
        """Wait until background writes (lower tiers) have finished."""
        self.runtime.call(self.store.flush)

    def clear(self, namespace_only: bool = True) -> int:
        return self.runtime.call(self.store.clear, self.namespace.id if namespace_only else None)

    def stats(self) -> dict[str, Any]:
        return {"engine": dict(self.counters), "store": self.store.stats()}

    def close(self) -> None:
        """Finish background writes and stop the loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
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


# Encoded-object buffers an engine keeps for reuse (when its store copies what it is given).
_RECYCLE_BYTES = 320 << 20
# Objects at least this large are read in place from local tiers (see _mapped_reads).
_MAPPED_READ_BYTES = 4 << 20
# Bytes of objects one write wave encodes (two waves are in memory at most: one being put).
_WAVE_BYTES = 64 << 20


def _record_read(rec: Any, hits: list[bool], chunk_size: int) -> None:
    found = sum(hits)
    rec.done("hit" if found == len(hits) and found else "partial" if found else "miss",
             {"streamkv.hit_tokens": found * chunk_size},
             hit_tokens=found * chunk_size, miss_tokens=(len(hits) - found) * chunk_size)


def _mapping_disk(tier: Any) -> bool:
    return bool(getattr(tier, "mmap_reads", False)) and not getattr(tier, "direct_reads", True)


def _address(buf: Any) -> int:
    """Where a buffer's bytes start (without reading them)."""
    return int(np.frombuffer(buf, dtype=np.uint8, count=1).ctypes.data)


class _ReadGate:
    """What ``read_chunks_into``'s worker lanes share: objects waiting to be verified, and with
    ``prefix`` the rule that an object is copied only once every object before it verified
    (so nothing after a miss reaches the caller's memory). Thread-safe; the loop puts objects
    in and learns whether to start another lane, lanes drain until nothing is waiting."""

    def __init__(self, n: int, prefix: bool, lanes: int) -> None:
        self.n = n
        self.prefix = prefix
        self.lanes = max(1, lanes)
        self.lock = threading.Lock()
        self.waiting: deque[tuple[int, list[Any], np.ndarray]] = deque()
        self.running = 0
        self.verified = [False] * n
        self.copied = [False] * n
        self.front = 0  # objects [0, front) all verified
        self.broken = n  # prefix: the first object that missed
        self.parked: dict[int, tuple[Any, np.ndarray]] = {}  # verified, waiting for earlier ones
        self.failures: list[tuple[int, Exception]] = []

    def hopeless(self, i: int) -> bool:
        """An earlier object already missed: with ``prefix`` this one cannot count."""
        return self.prefix and i > self.broken

    def put(self, i: int, box: list[Any] | None, targets: np.ndarray | None) -> bool:
        """Hand over object ``i`` (None: a miss). True: the caller starts another lane."""
        with self.lock:
            if box is None or targets is None:
                self._miss(i)
                return False
            self.waiting.append((i, box, targets))
            if self.running < self.lanes:
                self.running += 1
                return True
            return False

    def drain(self, verify: Any, copy: Any) -> None:
        """One lane (a worker thread): verify waiting objects, copy those allowed, until none waits."""
        while True:
            with self.lock:
                if not self.waiting:
                    self.running -= 1
                    return
                i, box, targets = self.waiting.popleft()
            try:
                allowed = self._verified(i, verify(box.pop()), targets)
            except Exception as exc:  # FormatError: corrupt or foreign; anything else: a bug, still a miss
                self._failed(i, exc)
                continue
            while allowed:
                j, sections, dest = allowed.pop(0)
                try:
                    copy(sections, dest)
                    self.copied[j] = True
                except Exception as exc:
                    self._failed(j, exc)
                del sections

    def _failed(self, i: int, exc: Exception) -> None:
        with self.lock:
            self.failures.append((i, exc))
            self._miss(i)

    def _verified(self, i: int, sections: Any, targets: np.ndarray) -> list[tuple[int, Any, np.ndarray]]:
        """Object ``i`` verified: the objects that may be copied now (``i`` and any it unblocked)."""
        if not self.prefix:
            return [(i, sections, targets)]
        with self.lock:
            if i > self.broken:
                return []
            self.verified[i] = True
            self.parked[i] = (sections, targets)
            while self.front < self.n and self.verified[self.front]:
                self.front += 1
            ready = [j for j in self.parked if j < self.front]
            return [(j, *self.parked.pop(j)) for j in sorted(ready)]

    def _miss(self, i: int) -> None:  # under the lock
        if self.prefix and i < self.broken:
            self.broken = i
            for j in [j for j in self.parked if j > i]:
                del self.parked[j]

    def results(self) -> list[bool]:
        if not self.prefix:
            return list(self.copied)
        ok = [False] * self.n
        for i in range(self.n):
            if not self.copied[i]:
                break
            ok[i] = True
        return ok
