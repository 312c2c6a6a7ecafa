"""Real SGLang host pools on a CPU, and helpers that read pages through SGLang's own views.

SGLang's ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` are built the way
SGLang builds them, from a device pool's buffer description; here the "device"
buffers are CPU tensors (SGLang has no CPU build on PyPI, but its host pools
only need tensors, and ``pin_memory=False`` skips cudaHostRegister). So the
tests drive the real pool classes: their ``kv_buffer`` layouts, ``alloc``,
``get_data_page`` / ``set_from_flat_data_page`` and per-layer views."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

CPU = torch.device("cpu")


def _ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def mha_pool(layout: str = "page_first", page_size: int = 4, layers: int = 3, heads: int = 2,
             head_dim: int = 8, dtype: torch.dtype = torch.bfloat16, tokens: int = 64) -> MHATokenToKVPoolHost:
    """A real MHA host pool of ``2 * tokens`` slots (plus SGLang's padding page)."""
    k = [torch.zeros(tokens + page_size, heads, head_dim, dtype=dtype) for _ in range(layers)]
    v = [torch.zeros(tokens + page_size, heads, head_dim, dtype=dtype) for _ in range(layers)]
    info = MHABufferInfo(
        buffers=KVBuffers(k=tuple(k), v=tuple(v), k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v),
                          layout=KVBufferLayout.NHD),
        page_size=page_size, head_num=heads, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype, device=CPU,
    )
    return MHATokenToKVPoolHost(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=tokens, start_layer=0, end_layer=layers)


def mla_pool(layout: str = "page_first", page_size: int = 4, layers: int = 3, kv_lora_rank: int = 16,
             rope_dim: int = 8, dtype: torch.dtype = torch.bfloat16, tokens: int = 64) -> MLATokenToKVPoolHost:
    """A real MLA host pool (one latent row of ``kv_lora_rank + rope_dim`` per token and layer)."""
    width = kv_lora_rank + rope_dim
    bufs = [torch.zeros(tokens + page_size, 1, width, dtype=dtype) for _ in range(layers)]
    info = MLABufferInfo(
        buffers=tuple(bufs), data_ptrs=_ptrs(bufs), layer_indices=tuple(range(layers)), device_layer_num=layers,
        page_size=page_size, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim, kv_cache_dim=width,
        dtype=dtype, device=CPU,
    )
    return MLATokenToKVPoolHost(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=tokens, start_layer=0, end_layer=layers,
                                target_layer_num=layers)


def fill_random(pool: Any, seed: int = 0) -> None:
    """Random KV in every slot (as raw bits, so every dtype gets distinct values)."""
    g = torch.Generator().manual_seed(seed)
    raw = pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_kv(pool: Any, start: int) -> torch.Tensor:
    """One page's raw bytes as [layer, plane, token, ...], read through SGLang's own per-layer
    views (``k_data_refs``/``v_data_refs`` for MHA, ``data_refs`` for MLA), not through our codec.
    Bytes, not values: random bits include NaNs, which never compare equal."""
    end = start + pool.page_size

    def tokens(ref: torch.Tensor) -> torch.Tensor:
        # page_first_direct views are [page, token-in-page, ...]: flatten to slots
        if ref.dim() == 4:
            ref = ref.reshape(-1, *ref.shape[2:])
        return ref[start:end]

    if hasattr(pool, "kv_lora_rank"):
        if pool.layout == "page_first_direct":  # its data_refs are per page, not per layer
            page = pool.get_data_page(start, flat=False)[0].unsqueeze(1)
        else:
            page = torch.stack([tokens(ref) for ref in pool.data_refs]).unsqueeze(1)
    else:
        page = torch.stack(
            [torch.stack([tokens(k), tokens(v)]) for k, v in zip(pool.k_data_refs, pool.v_data_refs)]
        )
    return page.contiguous().view(torch.uint8).clone()


def storage_config(extra: dict, *, model: str | None = "org/model-a", tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, mla: bool = False,
                   page_first: bool = True) -> HiCacheStorageConfig:
    """The ``HiCacheStorageConfig`` SGLang's cache controller would build for one rank."""
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=True, is_page_first_layout=page_first, model_name=model,
        extra_config=dict(extra),
    )


def page_hashes(n: int, salt: str = "") -> list[str]:
    """SGLang-style page keys: chained SHA-256 hex digests (64 chars) of each page's token ids.

    SGLang's own ``get_hash_str`` JIT-compiles a C++ extension on first use, so
    the tests chain ``hashlib.sha256`` the same way instead."""
    out: list[str] = []
    prior = b""
    for i in range(n):
        h = hashlib.sha256(prior)
        h.update(f"{salt}:{i}".encode())
        prior = h.digest()
        out.append(h.hexdigest())
    return out
