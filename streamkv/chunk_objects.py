"""Whole chunk objects by key, straight between a caller's memory and the store.

Adapters with their own page hashes (SGLang's storage backend) move whole objects, not
layer streams. Writes copy the caller's memory once, straight into the buffer that goes
to the store (a caller's page layout is re-ordered into layer sections by that same
copy), and store sections raw unless lz4 pays. Reads verify every section of an object
before any of its bytes reach the caller's memory; from the local tiers they read the
store's own mapping of the object (no copy). A missing, corrupt or foreign object is a
miss, never an error. The engine wraps these calls with its runtime and telemetry."""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import anyio
import lz4.block
import numpy as np
import xxhash
import structlog

from streamkv.format import (
    CODEC_RAW,
    MIN_SAVING,
    FormatError,
    LayoutMismatch,
    Truncated,
    decode_section,
    encode_chunk,
    header_size,
    parse_header,
    seal_raw_chunk,
)
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.read_gate import ReadGate
from streamkv.store.base import Store
from streamkv.store import disk
from streamkv.store.direct_io import aligned_empty
from streamkv.store.disk import DiskStore
from streamkv.store.in_place import reads_in_place, whole_object
from streamkv.store.limits import Limits
from streamkv.store.memory import MemoryStore

log = structlog.get_logger(__name__)

# Encoded-object buffers an engine keeps for reuse (when its store copies what it is given).
_RECYCLE_BYTES = 320 << 20
# Bytes of objects one write wave encodes (two waves are in memory at most: one being put).
_WAVE_BYTES = 64 << 20
# Cold local reads of objects this large get more lanes than CPUs (ChunkObjects._read_lanes).
COLD_LANES_BYTES = 4 << 20
# compression "auto": once this many probes in a row found lz4 not worth it, probe only one
# object in PROBE_EVERY (the rest are stored raw) until a probe finds it worth it again.
PROBE_STREAK = 8
PROBE_EVERY = 16


class ChunkObjects:
    """Key-level writes and reads of whole chunk objects for one layout and namespace."""

    def __init__(self, store: Store, layout: KVLayout, namespace: Namespace, limits: Limits,
                 compression: str, counters: dict[str, int]) -> None:
        self.store = store
        self.layout = layout
        self.namespace = namespace
        self.limits = limits
        self.compression = compression
        self.counters = counters
        self._free_buffers: list[np.ndarray] = []  # encoded-object buffers to reuse (loop thread)
        # compression "auto": probes in a row that found lz4 not worth it, objects not probed since
        # (updated from the encoding lanes without a lock: a lost update only moves a probe)
        self._raw_streak = 0
        self._unprobed = 0
        self.probes = 0

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    async def write(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Encode and put every item; True where the store took it.

        Objects are encoded in waves, each wave split over a few worker lanes (one thread hop per
        lane, not per object: on small pages the hop costs more than the encode), and put while
        the next wave encodes. At most two waves of encoded objects exist at a time."""
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
        return _coalesced(arr)

    def _encode_object(self, buf: np.ndarray, sections: np.ndarray) -> Any:
        """Copy ``sections`` into ``buf`` after the header room and finish the object there
        (raw sections); where lz4 pays, a new compressed object instead. On a worker thread."""
        L, n = self.layout.num_layers, self.layout.section_bytes
        body = buf[header_size(L):]
        np.copyto(body.view(sections.dtype).reshape(sections.shape), sections)
        layers = body.reshape(L, n)
        if self._worth_compressing(layers):
            return encode_chunk(self.namespace, self.layout, list(layers), compression=self.compression)
        seal_raw_chunk(buf, self.namespace, self.layout)
        return buf

    def _worth_compressing(self, layers: np.ndarray) -> bool:
        """``compression``: off → no; lz4 → yes; auto → when lz4 saves ``MIN_SAVING`` on a probe
        of a few slices across the layers (one probe per object, not one per section: KV of one
        page compresses alike in every layer, and probing each section cost more than the copy).
        KV of one model compresses alike from page to page too: after ``PROBE_STREAK`` probes in
        a row said no, only one object in ``PROBE_EVERY`` is probed (on SmolLM2 pages the probe
        took ~10% of a put's CPU time, for nothing on bf16 KV)."""
        mode = self.compression
        if mode == "off" or layers.shape[1] < 1024:
            return False
        if mode == "lz4":
            return True
        if self._raw_streak >= PROBE_STREAK:
            self._unprobed += 1
            if self._unprobed < PROBE_EVERY:
                return False
        self._unprobed = 0
        self.probes += 1
        L = layers.shape[0]
        size = min(layers.shape[1], 8192)
        picks = sorted({0, L // 3, (2 * L) // 3, L - 1})
        packed = sum(len(lz4.block.compress(layers[l, :size], store_size=False)) for l in picks)
        worth = packed <= (1 - MIN_SAVING) * size * len(picks)
        self._raw_streak = 0 if worth else self._raw_streak + 1
        return worth

    def _object_buffer(self, size: int) -> np.ndarray:
        """A buffer for one encoded object: a recycled one when there is one (loop thread only)."""
        free = self._free_buffers
        if free:
            for i, b in enumerate(free):
                if b.nbytes == size:
                    return free.pop(i)
        if size >= 1 << 20:  # in huge pages: the disk tier writes it with O_DIRECT as it is
            return aligned_empty(size)
        return np.empty(size, dtype=np.uint8)

    def _recycle_buffer(self, buf: np.ndarray, obj: Any) -> None:
        """Keep ``buf`` for the next object when the store is done with it once ``put`` returns:
        one memory or disk tier (or write_back, which puts into the first tier only); those copy
        or write the bytes. With write_through to more tiers the lower puts run later, holding it."""
        if obj is not buf:
            return
        tiers = getattr(self.store, "tiers", None)
        if not tiers or not (len(tiers) == 1 or getattr(self.store, "write_policy", "") == "write_back"):
            return
        if type(tiers[0]) not in (MemoryStore, DiskStore):
            return
        free = self._free_buffers
        if sum(b.nbytes for b in free) + buf.nbytes <= _RECYCLE_BYTES:
            free.append(buf)

    async def read_into(self, keys: list[str], dests: list[Any], prefix: bool) -> list[bool]:
        """Objects in this host's tiers (memory, disk) are read, verified and copied on a few
        worker "lanes", one thread hop per lane: on 2 cores a hop through the loop per small
        object cost more than reading, verifying and copying it. No more lanes than usable
        CPUs: with ``prefix``, a lane descheduled while it holds the next object in order
        holds up every copy after it (4 lanes on 2 cores read SmolLM2 pages 2x slower than 2);
        except for large objects coming from the device (``_read_lanes``). Lanes take objects
        from one queue, in order.
        Others (S3, the daemon) are fetched concurrently and verified on lanes that take them
        as they arrive."""
        n = len(keys)
        targets: list[np.ndarray | None] = [None] * n
        for i, dest in enumerate(dests):
            try:
                targets[i] = self._as_sections(dest, writable=True)
            except (TypeError, ValueError) as exc:
                self._count("retrieve_rejected")
                log.error("chunk destination rejected", key=keys[i], error=str(exc))
        gate = ReadGate(n, prefix, lanes=self.limits.codec)
        mapped = self._mapped_reads()
        codec = self.limits.limiter("codec")
        readers = [self.store.reader_now(k) if targets[i] is not None else None for i, k in enumerate(keys)]
        local = [(i, reader, targets[i]) for i, reader in enumerate(readers) if reader is not None]

        async def lane() -> None:
            await anyio.to_thread.run_sync(gate.drain, self._verified_sections, self._copy_sections, limiter=codec)

        jobs = deque(local)

        async def reading_lane() -> None:
            await anyio.to_thread.run_sync(gate.read, jobs, self._verified_sections, self._copy_sections,
                                           limiter=codec)

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
            lanes = self._read_lanes(keys[local[0][0]] if local else None, len(local))
            for _ in range(lanes):
                tg.start_soon(reading_lane)
            for i in range(n):
                if readers[i] is None:
                    tg.start_soon(fetch, i, tg)
        for i, exc in gate.failures:
            if isinstance(exc, FormatError):
                self._chunk_corrupt(keys[i], exc)
            else:
                self._count("retrieve_errors")
                log.error("chunk read failed; miss", key=keys[i], error=repr(exc))
        return gate.results()

    def _read_lanes(self, first_key: str | None, objects: int) -> int:
        """Lanes for ``objects`` local reads: no more than usable CPUs, the lanes are busy
        verifying and copying. Objects of ``COLD_LANES_BYTES`` and more that would come from
        the device (asked of the first one: a batch is written, and goes cold, together) keep a
        lane waiting on each read: then twice as many, so that the device always has reads in
        flight (measured on the development VM, cold 8-34 MB SGLang pages, 2 CPUs: 4 lanes read
        0-22% faster than 2 in 11 of 12 paired runs; warm, 4 lanes were up to 17% slower, and
        cold 1.5 MB pages slower too)."""
        lanes = min(self.limits.codec, _usable_cpus())
        if first_key is not None and self.layout.chunk_bytes >= COLD_LANES_BYTES and self.store.cold_now(first_key):
            lanes = min(self.limits.codec, 2 * _usable_cpus())
        return min(lanes, objects)

    def _mapped_reads(self) -> bool:
        """Read objects in place (``store/in_place.py``) rather than whole: where every tier
        allows it and objects are large. Measured on the development VM: a fresh buffer per
        object of several MiB costs more than reading into it (page faults, unmapping), and
        mapped cold reads of small files were slower than whole reads. Only objects without a
        local reader come this way (``Store.reader_now``): in an all-local store, one between
        two tiers, or a lower-tier hit to promote where there is no background group."""
        return self.layout.chunk_bytes >= disk.MAPPED_WHOLE_BYTES and reads_in_place(self.store, every_tier=True)

    async def _fetch_object(self, key: str, mapped: bool) -> list[Any] | None:
        """``[the object's bytes]`` (from offset 0; maybe longer than the object), or None: a miss.

        ``mapped``: a ranged read of the header, whose view slices the tier's own mapping of the
        file or its buffer: that whole mapping is the object, read in place with no copy (the
        lane that verifies it waits for the disk, not the loop). Otherwise, or where the view is
        not such a slice, a whole-object get. Bytes that are not the object's fail verification."""
        if mapped:
            hsize = header_size(self.layout.num_layers)
            parts = await self.store.get_ranges(key, [(0, hsize)])
            if parts is None:
                return None
            whole = whole_object(parts[0], hsize)
            if whole is not None:
                return [whole]
        obj = await self.store.get(key)
        return None if obj is None else [obj]

    def _verified_sections(self, data: Any) -> Any:
        """Every section of the object in ``data`` checked against its checksum: a
        ``(layers, section_bytes)`` view where the object is raw and in order (one copy out),
        else a list of per-layer buffers."""
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
        for layer, (offset, stored_len, raw_len, checksum, codec) in enumerate(header.sections):
            if raw_len != n:
                raise LayoutMismatch(f"layer {layer}: {raw_len} bytes, layout says {n}")
            stored = view[offset : offset + stored_len]
            if codec == CODEC_RAW and len(stored) == n and xxhash.xxh3_64_intdigest(stored) == checksum:
                raws.append(stored)  # decode_section's checks, inline for the common case
            else:  # compressed, or not what the header says: decode_section decides (or raises why)
                raws.append(decode_section(header, layer, stored))
            in_order = in_order and codec == CODEC_RAW and offset == expect
            expect = offset + stored_len
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


def _coalesced(arr: np.ndarray) -> np.ndarray:
    """The same memory with adjacent per-layer axes merged wherever one steps exactly over the
    next (a host-pool page viewed layer-first, ``(layers, k/v, tokens, heads, head_dim)``,
    becomes ``(layers, k/v, tokens, heads * head_dim)``). numpy copies an array run by run of
    its last axis: measured 8x faster into SGLang's page_first pages once the runs are whole
    tokens' rows rather than one head each."""
    dims: list[list[int]] = []
    for size, stride in zip(arr.shape[1:], arr.strides[1:]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    shape = (arr.shape[0], *(d[0] for d in dims))
    if shape == arr.shape:
        return arr
    strides = (arr.strides[0], *(d[1] for d in dims))
    return np.lib.stride_tricks.as_strided(arr, shape, strides, writeable=arr.flags.writeable)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
