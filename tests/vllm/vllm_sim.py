"""Drive vLLM's real Scheduler and our connector's two halves step by step, without a model.

Each step runs what vLLM's model runner does around a forward (bind metadata,
handle_preemptions, start_load_kv, per layer wait_for_layer_load → attention's KV
write → save_kv_layer, wait_for_save, get_finished, load errors, worker metadata)
and feeds a ModelRunnerOutput back to ``Scheduler.update_from_output``. The
"attention" writes a deterministic KV for each (layer, position, token) into the
real paged tensors: with vLLM's own CPU kernel (``cpu_attn_reshape_and_cache``) for
the CPU layout, and through the logical view for the GPU-packed and MLA layouts.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from tests.vllm.vllm_helpers import make_kv_caches, make_scheduler

SAMPLED = 1234  # the token every "forward" samples


def kv_values(layer: int, pos: torch.Tensor, tok: torch.Tensor, heads: int, dim: int,
              dtype: torch.dtype) -> torch.Tensor:
    """Deterministic KV ``[T, heads, dim]`` for tokens at positions ``pos``."""
    h = torch.arange(heads).view(1, heads, 1)
    d = torch.arange(dim).view(1, 1, dim)
    base = (tok.view(-1, 1, 1) * 31 + pos.view(-1, 1, 1) * 17 + layer * 13 + h * 7 + d) % 251
    return (base.to(torch.float32) / 8.0 - 15.0).to(dtype)


class Sim:
    """One engine: vLLM's Scheduler (with our scheduler connector) and our worker connector."""

    def __init__(self, vllm_config: Any, kv_cache_config: KVCacheConfig, writer: str = "cpu_kernel",
                 layout: KVCacheLayout = KVCacheLayout.LBHNC, seed: int = 0,
                 kernel_block_size: int | None = None) -> None:
        vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        self.scheduler = make_scheduler(vllm_config, kv_cache_config)
        self.sched_conn = self.scheduler.connector
        self.worker = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.caches = make_kv_caches(kv_cache_config, layout, seed, kernel_block_size)
        self.worker.register_kv_caches(self.caches)
        self.spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self.block_size = self.spec.block_size
        self.writer = writer
        self.layer_names = list(self.worker.geometry.layer_names)
        self.requests: dict[str, Any] = {}
        self.outputs: list[tuple[SchedulerOutput, ModelRunnerOutput]] = []
        self.load_errors: list[set[int]] = []
        self.before_forward_hook = None  # called after start_load_kv, before the layers

    def add(self, request: Any) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    # -- the fake attention -------------------------------------------------------
    def _write(self, layer_idx: int, kv: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
               toks: torch.Tensor) -> None:
        if self.writer == "latent":
            lat = kv_values(layer_idx, pos, toks, 1, kv.shape[-1], kv.dtype)[:, 0]
            kv[slots // kv.shape[2], 0, slots % kv.shape[2]] = lat
            return
        hs = self.spec.head_size
        k = kv_values(layer_idx, pos, toks, self.spec.num_kv_heads, hs, kv.dtype)
        v = kv_values(layer_idx + 1000, pos, toks, self.spec.num_kv_heads, hs, kv.dtype)
        if self.writer == "cpu_kernel":
            from vllm import _custom_ops as ops
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            nb, h, bs, _ = kv.shape
            kc, vc = kv.view(nb, h, bs * 2, -1).chunk(2, dim=2)
            isa = _get_attn_isa(kv.dtype, bs, hs)
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
        else:  # GPU-packed semantics: K | V in the last dim, [B, H, N, C] logical view
            bs = kv.shape[2]  # the view's (kernel) block size; slots number tokens the same way
            b, o = slots // bs, slots % bs
            kv.permute(0, 2, 1, 3)[b, o, :, :hs] = k
            kv.permute(0, 2, 1, 3)[b, o, :, hs:] = v

    def step(self) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        so = self.scheduler.schedule()
        w = self.worker
        meta = so.kv_connector_metadata
        w.bind_connector_metadata(meta)
        w.handle_preemptions(meta)
        w.start_load_kv(None)
        if self.before_forward_hook is not None:
            self.before_forward_hook(so)
        work: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.requests[req_id]
            start = req.num_computed_tokens - n  # the scheduler already advanced it
            pos = torch.arange(start, start + n, dtype=torch.int64)
            toks = torch.tensor(req.all_token_ids[start : start + n], dtype=torch.int64)
            blocks = torch.tensor(self.block_ids(req_id), dtype=torch.int64)
            slots = blocks[pos // self.block_size] * self.block_size + pos % self.block_size
            work.append((slots, pos, toks))
        for li, name in enumerate(self.layer_names):
            w.wait_for_layer_load(name)
            for slots, pos, toks in work:
                self._write(li, self.caches[name], slots, pos, toks)
            w.save_kv_layer(name, self.caches[name], None)
        w.wait_for_save()
        sending, recving = w.get_finished(so.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        self.load_errors.append(set(invalid))
        kv_out = KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                   invalid_block_ids=invalid,
                                   kv_connector_worker_meta=w.build_connector_worker_meta(),
                                   kv_connector_stats=w.get_kv_connector_stats())
        w.clear_connector_metadata()
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            req = self.requests[req_id]
            done = req.num_computed_tokens >= req.num_tokens
            sampled.append([SAMPLED] if done else [])
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, kv_connector_output=kv_out)
        self.scheduler.update_from_output(so, mro)
        self.outputs.append((so, mro))
        return so, mro

    def run_until_done(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            so, _ = self.step()
            if not so.total_num_scheduled_tokens:
                time.sleep(0.01)  # waiting for an asynchronous load, as an idle engine would
        raise AssertionError("requests did not finish")

    def flush(self) -> None:
        """Wait until background writes reached every tier."""
        self.worker.worker_side.flush()

    def page_bytes(self, block_ids: list[int]) -> list[bytes]:
        """Raw bytes of whole pages, every layer (the byte-equality reference)."""
        out = []
        for name in self.layer_names:
            kv = self.caches[name]
            r = kv.shape[0] // self.scheduler.kv_cache_config.num_blocks  # kernel blocks per block
            for b in [b * r + i for b in block_ids for i in range(r)]:
                out.append(kv[b].contiguous().view(torch.uint8).numpy().tobytes())
        return out

    def scramble_pages(self, seed: int = 99) -> None:
        """Overwrite every page with fresh noise."""
        gen = torch.Generator().manual_seed(seed)
        for kv in self.caches.values():
            noise = torch.randint(0, 255, tuple(kv.shape), dtype=torch.uint8, generator=gen)
            kv.copy_(noise.to(kv.dtype))

    def close(self) -> None:
        self.worker.shutdown()
        self.sched_conn.shutdown()
