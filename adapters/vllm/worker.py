"""The worker half: moves KV between vLLM's paged cache and streamkv.

Why here: only the worker process holds the KV tensors. Loads stream chunk sections
layer by layer into the pages (``wait_for_layer_load`` waits for one layer) or, in
whole-request mode, in the background between scheduler steps. Saves copy each
layer's new full chunks out of the pages while the next layers compute; the step
ends (``wait_for_save``) only when every copy out of the pages is done, so no save
ever reads a block that a later preemption or finish has handed to someone else.
Encoding and tier writes then continue in the background from the copies.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from streamkv.engine import StreamKVEngine
from streamkv.layout import KVLayout
from streamkv.pipeline.handle import RetrieveHandle
from streamkv.pipeline.paged import gather_pages

from streamkv.adapters.vllm.cpu_threads import helper_cpus, pin_current_thread, pin_threads
from streamkv.adapters.vllm.metadata import LoadSpec, SaveSpec, StreamKVConnectorMetadata, StreamKVWorkerMetadata
from streamkv.adapters.vllm.paged_layout import (
    KVPacking,
    LayerPages,
    blocks_for_tokens,
    gather_blocks,
    layer_pages,
    slots_for_tokens,
)
from streamkv.adapters.vllm.promotion import PromoteAfterLoad
from streamkv.adapters.vllm.sink import PagedSink
from streamkv.adapters.vllm.stats import StepStats

log = structlog.get_logger(__name__)


@dataclass
class _Load:
    spec: LoadSpec
    sink: PagedSink
    handle: RetrieveHandle
    started: float
    next_layer: int = 0  # layers [0, next_layer) have been waited for
    ok: bool = True
    done: Future[None] | None = None  # whole-request loads: the background waiter


@dataclass
class _Save:
    spec: SaveSpec
    staging: torch.Tensor  # [chunks, layers, section bytes], or [layers, chunks, ...] if layer_major
    layer_major: bool = False  # page-order pages: a layer of all chunks is one copy
    copies: list[Future[None]] = field(default_factory=list)


class WorkerSide:
    """Loads and saves for one worker (one TP rank)."""

    def __init__(self, engine: StreamKVEngine, layer_names: tuple[str, ...], packing: KVPacking,
                 block_size: int, tp_rank: int, num_blocks: int | None = None, *,
                 promote_after_load: bool = False) -> None:
        self.engine = engine
        self.stats = StepStats()
        # Copy loaded objects up into the faster tiers once their load is over (the engine's
        # store is then built with promote_on_hit off): promotion.py says why.
        self.promote = PromoteAfterLoad(engine, self.stats, promote_after_load)
        self.layout: KVLayout = engine.layout
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.layer_names = layer_names
        self.packing = packing
        self.block_size = block_size
        self.tp_rank = tp_rank
        self.pages: list[LayerPages] = []
        self.num_blocks = num_blocks  # the scheduler's (manager) blocks
        self.kernel_ratio = 1  # kernel blocks per manager block (vLLM may split blocks for a backend)
        # Off the cores vLLM's OpenMP team is bound to (cpu_threads.py): on a CPU worker the
        # threads started from the main thread would otherwise share its single core.
        self.helper_cpus = helper_cpus()
        self._pin_engine_threads()
        pools = dict(initializer=pin_current_thread, initargs=(self.helper_cpus,))
        self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="streamkv-vllm-save", **pools)
        self._wait_pool = ThreadPoolExecutor(2, thread_name_prefix="streamkv-vllm-load", **pools)
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="streamkv-vllm-write", **pools)
        self._sync_loads: list[_Load] = []
        self._async_loads: dict[str, _Load] = {}
        self._saves: list[_Save] = []
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._saved_keys: set[str] = set()
        self._failed_keys: set[str] = set()
        self._pending: dict[str, Future[int]] = {}  # key -> write under way

    @property
    def promote_after_load(self) -> bool:
        return self.promote.enabled

    def _pin_engine_threads(self) -> None:
        """Move the engine's loop thread (and so every I/O and codec thread it starts)."""
        cpus = self.helper_cpus
        if not cpus:
            return

        async def pin() -> None:
            pin_current_thread(cpus)

        try:
            self.engine.runtime.call(pin)
            pin_threads(("AnyIO worker thread",), cpus)  # those the loop started already
        except Exception as exc:  # only placement: never a reason to fail
            log.warning("could not place streamkv's threads", error=repr(exc))
            return
        log.info("streamkv threads placed", cpus=sorted(cpus))

    # -- registration --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"register_kv_caches: no KV tensor for layers {missing[:3]}...")
        head = self.layout.head_size
        self.pages = [layer_pages(kv_caches[n], self.packing, head) for n in self.layer_names]
        kernel_blocks = self.pages[0].num_blocks
        if self.num_blocks and kernel_blocks != self.num_blocks:
            if kernel_blocks % self.num_blocks:
                raise ValueError(f"KV view has {kernel_blocks} blocks, the scheduler {self.num_blocks}")
            self.kernel_ratio = kernel_blocks // self.num_blocks
        log.info("KV caches registered", layers=len(self.pages), packing=self.packing,
                 block_size=self.pages[0].block_size, num_blocks=self.pages[0].num_blocks)

    def _kernel_blocks(self, block_ids: list[int]) -> list[int]:
        """Scheduler block ids -> the ids of the views' (kernel) blocks, in token order."""
        r = self.kernel_ratio
        return block_ids if r == 1 else [b * r + i for b in block_ids for i in range(r)]

    # -- loads -----------------------------------------------------------------------
    def _start(self, spec: LoadSpec) -> _Load:
        self._wait_pending_writes(spec.rank_keys[self.tp_rank])
        sink = PagedSink(self.layout, self.pages, self._kernel_blocks(spec.block_ids), spec.first_chunk,
                         spec.start, spec.end)
        handle = self.engine.retrieve_keys(spec.rank_keys[self.tp_rank], sink)
        return _Load(spec, sink, handle, time.perf_counter())

    def start_load_kv(self, meta: StreamKVConnectorMetadata) -> None:
        for spec in meta.loads:
            if not self.pages:
                self._fail_whole(spec, "KV caches not registered")
                continue
            load = self._start(spec)
            if spec.is_async:
                self._async_loads[spec.req_id] = load
                load.done = self._wait_pool.submit(self._wait_all, load)
            else:
                self._sync_loads.append(load)

    def _wait_layer(self, load: _Load, layer: int) -> None:
        while load.next_layer <= layer:
            if not load.handle.wait(load.next_layer):
                load.ok = False
            load.next_layer += 1

    def _wait_all(self, load: _Load) -> None:
        self._wait_layer(load, self.layout.num_layers - 1)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for load in self._sync_loads:
            self._wait_layer(load, layer)

    def _finish_load(self, load: _Load) -> None:
        """Account a finished load; blocks past its intact prefix become load errors."""
        load.sink.close()
        spec = load.spec
        C = self.layout.chunk_size
        # valid_tokens already ends before the first chunk that failed at any layer.
        valid_end = max(spec.start, min(spec.end, spec.first_chunk * C + load.handle.valid_tokens))
        if valid_end < spec.end:
            bad = blocks_for_tokens(spec.block_ids, self.block_size, valid_end, spec.end)
            # The block holding valid_end may hold intact tokens before it; vLLM recomputes
            # from the first invalid block, which is what a partial block needs.
            self._load_errors.update(bad)
            bad_keys = spec.rank_keys[0][(valid_end - spec.first_chunk * C) // C :]
            with self._lock:
                self._failed_keys.update(bad_keys)
            log.warning("KV load incomplete; vLLM recomputes", req_id=spec.req_id,
                        tokens=(spec.start, spec.end), valid_end=valid_end, blocks=len(bad))
        self.stats.record_load(valid_end - spec.start, load.sink.bytes_written,
                               time.perf_counter() - load.started)
        intact = max(0, -(-(valid_end - spec.first_chunk * C) // C))
        self.promote(spec.rank_keys[self.tp_rank][:intact])

    def _fail_whole(self, spec: LoadSpec, why: str) -> None:
        self._load_errors.update(blocks_for_tokens(spec.block_ids, self.block_size, spec.start, spec.end))
        log.warning("KV load not started; vLLM recomputes", req_id=spec.req_id, why=why)

    def finish_sync_loads(self) -> None:
        for load in self._sync_loads:
            self._wait_layer(load, self.layout.num_layers - 1)
            self._finish_load(load)
        self._sync_loads = []

    # -- saves -----------------------------------------------------------------------
    def save_kv_layer(self, layer_name: str, meta: StreamKVConnectorMetadata) -> None:
        layer = self.layer_index.get(layer_name)
        if layer is None or not meta.saves or not self.pages:
            return
        if not self._saves:
            lay = self.layout
            layer_major = self.pages[0].page_order
            self._saves = []
            for spec in meta.saves:
                n = len(spec.rank_keys[0])
                shape = (lay.num_layers, n, lay.section_bytes) if layer_major else (n, lay.num_layers, lay.section_bytes)
                self._saves.append(_Save(spec, torch.empty(shape, dtype=torch.uint8), layer_major=layer_major))
        for save in self._saves:
            save.copies.append(self._copy_pool.submit(self._copy_out, save, layer))

    def _copy_out(self, save: _Save, layer: int) -> None:
        """Gather one layer of a save's chunks out of the pages into its staging."""
        pages = self.pages[layer]
        C = self.layout.chunk_size
        bs = pages.block_size
        device = pages.segments[0].view.device
        block_ids = self._kernel_blocks(save.spec.block_ids)
        first = save.spec.first_chunk * C
        if save.layer_major:  # the chunks' sections are their pages, back to back
            n = len(save.spec.rank_keys[0]) * C
            gather_blocks(pages, block_ids[first // bs : (first + n) // bs], save.staging[layer].view(-1))
            return
        for i in range(save.staging.shape[0]):
            lo = first + i * C
            out = save.staging[i, layer]
            if device.type == "cpu":  # chunks are whole blocks: page-wise copies
                gather_blocks(pages, block_ids[lo // bs : (lo + C) // bs], out)
                continue
            slots = slots_for_tokens(block_ids, bs, lo, lo + C).to(device)
            out.copy_(gather_pages(list(pages.segments), slots, chunk_tokens=C))

    def wait_for_save(self) -> None:
        """Return once every copy out of the pages is done; writes go on in the background."""
        saves, self._saves = self._saves, []
        for save in saves:
            ok = True
            for fut in save.copies:
                try:
                    fut.result()
                except Exception as exc:  # a failed copy drops the save, never the step
                    ok = False
                    log.error("KV save copy failed; not stored", req_id=save.spec.req_id, error=repr(exc))
            if ok and len(save.copies) == self.layout.num_layers:
                self._submit_write(save)

    def _submit_write(self, save: _Save) -> None:
        """Hand a save's chunks to the store; they count as present from now on.

        The scheduler hears of them with this step's output, so the very next request
        with this prefix hits; a load of a key whose write is still under way waits for
        that write first (``_pending``), and a write that fails is reported as failed."""
        keys = save.spec.rank_keys[self.tp_rank]
        names = save.spec.rank_keys[0]
        staging = save.staging
        started = time.perf_counter()

        def pack_and_write() -> int:
            # Layer-major staging is re-packed per chunk here, off the step's critical path.
            chunk = (lambda i: staging[:, i].contiguous()) if save.layer_major else (lambda i: staging[i])
            items = [(keys[i], chunk(i).numpy()) for i in range(len(keys))]
            return int(self.engine.write_chunks(items, wait=True))

        try:
            future = self._write_pool.submit(pack_and_write)
        except Exception as exc:
            log.error("KV save not submitted", req_id=save.spec.req_id, error=repr(exc))
            return
        with self._lock:
            self._saved_keys.update(names)
            for key in keys:
                self._pending[key] = future

        def done(f: Future[int]) -> None:
            written = 0 if f.cancelled() or f.exception() is not None else int(f.result())
            with self._lock:
                for key in keys:
                    if self._pending.get(key) is f:
                        del self._pending[key]
                if written != len(keys):
                    self._failed_keys.update(names)
            self.stats.record_save(len(keys), staging.numel() if written == len(keys) else 0,
                                   time.perf_counter() - started)

        future.add_done_callback(done)

    def _wait_pending_writes(self, keys: list[str]) -> None:
        with self._lock:
            futures = {id(f): f for k in keys if (f := self._pending.get(k)) is not None}
        for f in futures.values():
            try:
                f.result(timeout=30)
            except Exception:  # the load then finds the object missing: a load error, not a crash
                pass

    # -- step boundary ---------------------------------------------------------------
    def handle_preemptions(self, meta: StreamKVConnectorMetadata) -> None:
        """Stop background loads into blocks that preemption freed."""
        for req_id in meta.preempted_req_ids:
            load = self._async_loads.pop(req_id, None)
            if load is not None:
                load.handle.cancel()
                load.sink.close()
                log.info("async KV load cancelled by preemption", req_id=req_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending: set[str] = set()
        for req_id in finished_req_ids:
            load = self._async_loads.pop(req_id, None)
            if load is not None:  # the scheduler holds its blocks until we report it here
                load.handle.cancel()
                load.sink.close()
                sending.add(req_id)
        recving: set[str] = set()
        for req_id, load in list(self._async_loads.items()):
            if load.done is not None and load.done.done():
                self._finish_load(load)
                del self._async_loads[req_id]
                recving.add(req_id)
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        if self._sync_loads:
            self.finish_sync_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_worker_meta(self) -> StreamKVWorkerMetadata | None:
        with self._lock:
            saved, self._saved_keys = self._saved_keys, set()
            failed, self._failed_keys = self._failed_keys, set()
        if not saved and not failed:
            return None
        return StreamKVWorkerMetadata(saved_keys=saved, failed_keys=failed)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every handed-over save reached every tier, and every promotion is done."""
        with self._lock:
            pending = list({id(f): f for f in self._pending.values()}.values())
        for f in pending + self.promote.take_futures():
            try:
                f.result(timeout=timeout)
            except Exception:  # failures are reported through worker metadata
                pass
        self.engine.flush()

    def shutdown(self) -> None:
        try:
            self.flush(timeout=30.0)
        except Exception as exc:
            log.warning("saves not flushed at shutdown", error=repr(exc))
        for load in list(self._async_loads.values()):
            load.handle.cancel()
            load.sink.close()
        self._async_loads.clear()
        self._copy_pool.shutdown(wait=True)
        self._write_pool.shutdown(wait=True)
        self._wait_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def info(self) -> dict[str, Any]:
        return {"layers": len(self.pages), "packing": self.packing, "tp_rank": self.tp_rank}
