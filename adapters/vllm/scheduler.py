"""The scheduler half: which prompt chunks are stored, what each step loads and saves.

Why here: vLLM decides what to compute in the scheduler process, so hits must be
known there, but the KV bytes live in the worker processes. This half only
hashes prompts into chunk keys, asks the store which keys exist, and plans
loads and saves as plain metadata; it never touches KV.

Presence comes from two places: the store's persistent tiers opened in this
process (disk, S3: they outlive the engine and are shared by replicas), and the
keys the workers report as saved (their memory tier is not visible here).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.keys import Namespace, chunk_keys
from streamkv.layout import KVLayout
from streamkv.store.limits import Limits
from streamkv.store.tiers import build_tiers

from streamkv.adapters.vllm.metadata import (
    LoadSpec,
    SaveSpec,
    StreamKVConnectorMetadata,
    StreamKVWorkerMetadata,
)
from streamkv.adapters.vllm.paged_layout import blocks_for_tokens

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = structlog.get_logger(__name__)

KNOWN_KEYS_CAP = 1 << 20  # rank-0 keys remembered as saved by the workers (LRU)


@dataclass
class _RequestState:
    """What the scheduler half tracks for one live request."""

    rank_keys: list[list[str]]  # full prompt chunks, per TP rank
    hit_chunks: int = 0  # leading chunks present at the last lookup
    local_tokens: int = 0  # tokens vLLM had computed locally at the last lookup
    block_ids: list[int] = field(default_factory=list)
    next_save: int = 0  # first chunk not yet saved (or known present)
    load_in_flight: bool = False  # an async load was planned and not yet reported done


class SchedulerSide:
    """Lookup and planning; one instance in vLLM's scheduler process."""

    def __init__(self, config: StreamKVConfig, layout: KVLayout, namespaces: list[Namespace],
                 block_size: int, layerwise: bool) -> None:
        self.config = config
        self.layout = layout
        self.namespaces = namespaces
        self.chunk_size = layout.chunk_size
        self.block_size = block_size
        self.layerwise = layerwise
        self.engine = self._open_persistent_tiers(config, layout, namespaces[0])
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: list[LoadSpec] = []
        self._known: OrderedDict[str, None] = OrderedDict()
        self.stats: dict[str, int] = {"lookups": 0, "lookup_hit_tokens": 0, "lookup_errors": 0}

    @staticmethod
    def _open_persistent_tiers(config: StreamKVConfig, layout: KVLayout,
                               namespace: Namespace) -> StreamKVEngine | None:
        names = tuple(t for t in (config.tiers or ()) if t != "memory")
        if not names:
            return None
        cfg = config.replace(tiers=names)
        return StreamKVEngine(cfg, layout, namespace, tiers=build_tiers(cfg, Limits(
            disk_io=cfg.disk_io_threads, s3_requests=cfg.s3_max_concurrency, codec=cfg.codec_threads)))

    # -- lookup ------------------------------------------------------------------
    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = list(request.prompt_token_ids or [])
            keys = [chunk_keys(tokens, self.chunk_size, ns) for ns in self.namespaces]
            state = _RequestState(rank_keys=keys)
            self._requests[request.request_id] = state
        return state

    def _present_prefix(self, rank_keys: list[list[str]], limit: int) -> int:
        """Leading chunks (of the first ``limit``) that every rank's store holds."""
        n = 0
        while n < limit and rank_keys[0][n] in self._known:
            self._known.move_to_end(rank_keys[0][n])
            n += 1
        if n == limit or self.engine is None:
            return n
        rest = [keys[n:limit] for keys in rank_keys]
        flat = [k for keys in rest for k in keys]
        try:
            found = self.engine.exists_many(flat)
        except Exception as exc:  # a failing tier is a miss, never an error in vLLM
            self.stats["lookup_errors"] += 1
            log.warning("lookup failed; treated as a miss", error=repr(exc))
            return n
        width = limit - n
        for i in range(width):
            if not all(found[r * width + i] for r in range(len(rank_keys))):
                break
            n += 1
        return n

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        state = self._state(request)
        if state.load_in_flight:
            return 0, False
        prompt_len = len(request.prompt_token_ids or [])
        # vLLM must compute at least the last prompt token to sample from it, so a hit ends
        # at the last whole block before it (inside the last stored chunk, if need be).
        cap = max(prompt_len - 1, 0) // self.block_size * self.block_size
        limit = min(len(state.rank_keys[0]), -(-cap // self.chunk_size))
        hit = self._present_prefix(state.rank_keys, limit)
        state.hit_chunks = hit
        state.local_tokens = num_computed_tokens
        self.stats["lookups"] += 1
        new_tokens = max(0, min(hit * self.chunk_size, cap) - num_computed_tokens)
        self.stats["lookup_hit_tokens"] += new_tokens
        return new_tokens, (new_tokens > 0 and not self.layerwise)

    # -- allocation and planning ---------------------------------------------------
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        state = self._state(request)
        if num_external_tokens <= 0:
            return
        start = state.local_tokens
        end = start + num_external_tokens
        first, last = start // self.chunk_size, -(-end // self.chunk_size)
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads.append(LoadSpec(
            req_id=request.request_id,
            rank_keys=[keys[first:last] for keys in state.rank_keys],
            first_chunk=first, start=start, end=end, block_ids=block_ids,
            is_async=not self.layerwise,
        ))
        state.load_in_flight = not self.layerwise
        # Loaded chunks are in the store already: never save them again.
        state.next_save = max(state.next_save, last)

    def build_connector_meta(self, so: SchedulerOutput) -> StreamKVConnectorMetadata:
        meta = StreamKVConnectorMetadata(loads=self._pending_loads,
                                         preempted_req_ids=set(so.preempted_req_ids or ()))
        self._pending_loads = []
        for req_id in meta.preempted_req_ids:
            state = self._requests.get(req_id)
            if state is not None:
                state.block_ids = []  # freed by the preemption; resumed requests send all anew
        for new in so.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_save(meta, new.req_id, state, done)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            done = cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
            self._plan_save(meta, req_id, state, done)
        return meta

    def _plan_save(self, meta: StreamKVConnectorMetadata, req_id: str, state: _RequestState,
                   computed_after_step: int) -> None:
        """Save the prompt chunks this step completes (full chunks only)."""
        done = min(len(state.rank_keys[0]), computed_after_step // self.chunk_size)
        first = max(state.next_save, state.hit_chunks)  # chunks found present are not saved again
        if done <= first:
            return
        need = blocks_for_tokens(state.block_ids, self.block_size, 0, done * self.chunk_size)
        if len(need) * self.block_size < done * self.chunk_size:
            log.warning("block table shorter than the chunks to save; skipped", req_id=req_id)
            return
        meta.saves.append(SaveSpec(req_id=req_id, rank_keys=[k[first:done] for k in state.rank_keys],
                                   first_chunk=first, block_ids=need))
        state.next_save = done

    # -- feedback from the workers ---------------------------------------------------
    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for req_id in output.finished_recving or ():
            state = self._requests.get(req_id)
            if state is not None:
                state.load_in_flight = False
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, StreamKVWorkerMetadata):
            for key in meta.saved_keys:
                self._known[key] = None
                self._known.move_to_end(key)
            for key in meta.failed_keys:
                self._known.pop(key, None)
            while len(self._known) > KNOWN_KEYS_CAP:
                self._known.popitem(last=False)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Saves finish within their step, so blocks never need holding for them; an
        asynchronous load still writing into the blocks does hold them."""
        state = self._requests.pop(request.request_id, None)
        hold = state is not None and state.load_in_flight
        return hold, None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
