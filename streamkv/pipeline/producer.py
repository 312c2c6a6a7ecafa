"""The producer of a layer-wise retrieve, running on the runtime's loop.

First it reads and verifies every chunk's header (one small ranged read per
chunk, asked together; tiers that read ahead are first told of every chunk's header
and layer 0 together, for objects not already in memory): the hit is the run of
chunks with valid headers. Then it fetches layer by layer, each layer's sections
from all chunks concurrently, at most ``max_inflight`` layers ahead of the
consumer (backpressure: a layer's slot frees when the consumer has waited for it).
Checksums are verified and sections copied into the sink on worker threads. A
missing or corrupt section cuts the valid prefix at its chunk; it is logged and
counted, never raised.

Where the tiers return views of whole objects (memory, disk through mmap:
``store/in_place.py``), each chunk's sections are sliced from the memory its
header read returned, with no further call into the store: per layer, no thread
hop, open or mapping per section (at 2048 tokens of SmolLM2 that was 240 of each,
~50 ms of CPU on two cores beside the forward)."""

from __future__ import annotations

from typing import Sequence

import anyio
import structlog

from streamkv.format import FormatError, NamespaceMismatch, decode_section, header_size, parse_header, ChunkHeader
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.pipeline.handle import RetrieveHandle
from streamkv.pipeline.sink import LayerSink
from streamkv.store.base import Store, gather
from streamkv.store.in_place import reads_in_place, whole_object
from streamkv.store.limits import Limits
from streamkv.telemetry.scope import suppress_tier_spans

log = structlog.get_logger(__name__)


class LayerwiseProducer:
    def __init__(self, store: Store, keys: Sequence[str], layout: KVLayout, namespace: Namespace,
                 handle: RetrieveHandle, sink: LayerSink, limits: Limits, max_inflight: int,
                 counters: dict[str, int]) -> None:
        self.store = store
        self.keys = list(keys)
        self.layout = layout
        self.namespace = namespace
        self.handle = handle
        self.sink = sink
        self.limits = limits
        self.counters = counters
        self.max_inflight = max_inflight
        self.slots = anyio.Semaphore(max_inflight)
        self.headers: list[ChunkHeader] = []
        self.objects: list[memoryview | None] = []  # whole objects read in place, per chunk
        self.hinted: list[bool] = []  # per chunk: read-ahead hints are worth giving (not in memory)

    async def release(self, layer: int) -> None:
        """Free a slot once the consumer has taken ``layer`` (scheduled onto the loop)."""
        if self.handle.trace is not None:
            self.handle.trace.layer_taken(layer)
        self.slots.release()

    def _failed(self, kind: str, chunk: int, layer: int, why: str) -> None:
        self.counters[f"retrieve_{kind}"] = self.counters.get(f"retrieve_{kind}", 0) + 1
        log.warning("chunk section unusable; hit cut short", kind=kind, chunk=chunk, layer=layer,
                    key=self.keys[chunk], why=why)
        self.handle.chunk_failed(chunk, layer)
        fail = getattr(self.sink, "fail_layer", None)  # device sinks release the layer's waiters
        if fail is not None:
            fail(layer, RuntimeError(why))

    async def run(self) -> None:
        try:
            await self._read_headers()
            await self._read_layers()
        except BaseException:
            self.handle.cancel()
            raise

    async def _read_headers(self) -> None:
        size = header_size(self.layout.num_layers)
        # hints only for objects not already in memory: hinting cached pages reads nothing and,
        # per layer, cost more CPU than slicing and verifying the layer (a warm SmolLM2 hit of 16
        # chunks: 150 -> 102 ms of CPU without them)
        prefetches = self.store.prefetches()
        self.hinted = [prefetches and not self.store.warm_now(k) for k in self.keys]
        if any(self.hinted):
            await self._hint_first_layer(size)
        raw = await self.store.get_ranges_many([(k, [(0, size)]) for k in self.keys])
        in_place = reads_in_place(self.store)
        hit = 0
        for i, parts in enumerate(raw):
            if parts is None:
                break
            try:
                header = parse_header(parts[0], self.namespace, self.layout)
            except FormatError as exc:
                self.counters["retrieve_corrupt"] = self.counters.get("retrieve_corrupt", 0) + 1
                log.warning("chunk header unusable; hit cut short", chunk=i, key=self.keys[i],
                            error=type(exc).__name__, why=str(exc))
                if not isinstance(exc, NamespaceMismatch):  # never delete another model's object
                    await self._drop(i)
                break
            if header.num_tokens != self.layout.chunk_size:
                break
            self.headers.append(header)
            self.objects.append(whole_object(parts[0], header.total_len) if in_place else None)
            hit += 1
        self.sink.begin(hit)
        self.handle.set_hit(hit)

    async def _hint_first_layer(self, size: int) -> None:
        """Ask for every chunk's header and layer 0 in one hint, before reading the headers:
        layer 0's reads then start with the headers' instead of after them (a raw chunk's layer
        0 follows its header; for a compressed one the hint covers less of it, no harm)."""
        await self._hint([(k, (0, size + self.layout.section_bytes)) for k, cold in zip(self.keys, self.hinted) if cold])

    async def _prefetch(self, first: int, last: int) -> None:
        """Tell the tiers which sections come next, layers ``first`` to ``last - 1``, in order."""
        order = [(self.keys[c], h.section_range(layer))
                 for layer in range(first, min(last, self.layout.num_layers))
                 for c, h in enumerate(self.headers) if self.hinted[c]]
        if order:
            await self._hint(order)

    async def _hint(self, requests: list[tuple[str, tuple[int, int]]]) -> None:
        try:
            await self.store.prefetch(requests)
        except Exception as exc:  # only a hint
            log.debug("prefetch failed", error=repr(exc))

    async def _read_layers(self) -> None:
        """Layer by layer, at most ``max_inflight`` ahead of the consumer. The tiers are told
        of a window of layers ahead (read-ahead hints), not all at once: the first layers'
        reads then do not queue behind the last ones' (a cold SmolLM2 hit of 16 chunks waited
        42-189 ms for its first layer with every section hinted at the start)."""
        if not self.headers:
            return
        suppress_tier_spans()  # chunks x layers section reads: the layer spans carry their timing
        hints = any(self.hinted[: len(self.headers)])
        window = self.max_inflight + 1  # hinted layers ahead of the one being read
        async with anyio.create_task_group() as tg:
            if hints:
                tg.start_soon(self._prefetch, 0, window)
            for layer in range(self.layout.num_layers):
                await self.slots.acquire()
                if self.handle.cancelled:
                    return
                if hints and layer + window < self.layout.num_layers:
                    tg.start_soon(self._prefetch, layer + window, layer + window + 1)
                tg.start_soon(self._read_layer, layer)

    async def _read_layer(self, layer: int) -> None:
        if self.handle.trace is not None:
            self.handle.trace.layer_fetch(layer)
        live = self.handle.live_chunks()
        if all(self.objects[c] is not None for c in range(live)):  # sliced in place: no task each
            stored = [self._slice_section(c, layer) for c in range(live)]
        else:
            stored = await gather([lambda c=c: self._fetch_section(c, layer) for c in range(live)])
        # one worker-thread hop per layer, not per section: on a small CPU the hops cost
        # more than the checksums
        failures = await anyio.to_thread.run_sync(self._deliver_layer, layer, stored,
                                                  limiter=self.limits.limiter("codec"))
        for kind, chunk, why in failures:
            self._failed(kind, chunk, layer, why)
            if kind == "corrupt":
                await self._drop(chunk)
        finish = getattr(self.sink, "finish_layer", None)  # device sinks record the layer's event
        if finish is not None:
            finish(layer)
        self.handle.layer_done(layer, live)

    async def _drop(self, chunk: int) -> None:
        """Delete an object that failed verification, so lookups stop reporting it as a hit."""
        try:
            await self.store.delete(self.keys[chunk])
        except Exception as exc:  # a failing tier: the next read is a miss anyway
            log.warning("could not delete a corrupt chunk", key=self.keys[chunk], error=repr(exc))

    def _slice_section(self, chunk: int, layer: int) -> memoryview:
        whole = self.objects[chunk]
        assert whole is not None
        off, n = self.headers[chunk].section_range(layer)
        self.store.count_read_in_place(self.keys[chunk], n)
        return whole[off : off + n]

    async def _fetch_section(self, chunk: int, layer: int) -> memoryview | None:
        if self.objects[chunk] is not None:
            return self._slice_section(chunk, layer)
        parts = await self.store.get_ranges(self.keys[chunk], [self.headers[chunk].section_range(layer)])
        return None if parts is None else parts[0]

    def _deliver_layer(self, layer: int, stored: list[memoryview | None]) -> list[tuple[str, int, str]]:
        """Verify and hand over one layer's sections; returns (kind, chunk, why) per failure."""
        failures = []
        for chunk, data in enumerate(stored):
            if data is None:
                failures.append(("missing", chunk, "section could not be read"))
                continue
            try:
                self.sink.write(layer, chunk, decode_section(self.headers[chunk], layer, data))
            except FormatError as exc:
                failures.append(("corrupt", chunk, f"{type(exc).__name__}: {exc}"))
        return failures
