"""Real vLLM objects for the connector tests: VllmConfig, KVCacheConfig, Scheduler, Request,
and per-layer KV tensors allocated by vLLM's own view code in its real paged layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

CONNECTOR = "StreamKVConnector"
MODULE = "streamkv.adapters.vllm"
NUM_LAYERS = 30  # SmolLM2-135M
NUM_KV_HEADS = 3
HEAD_SIZE = 64


def make_vllm_config(model_dir: Path, extra: dict[str, Any], *, block_size: int = 32,
                     max_num_batched_tokens: int = 2048, max_model_len: int = 2048,
                     kv_load_failure_policy: str = "recompute") -> VllmConfig:
    """A VllmConfig naming our connector, built without starting an engine."""
    model_config = ModelConfig(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16",
                               max_model_len=max_model_len, seed=0)
    return VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=block_size, cache_dtype="auto", enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens,
                                         max_model_len=max_model_len, enable_chunked_prefill=True,
                                         is_encoder_decoder=False),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(kv_connector=CONNECTOR, kv_connector_module_path=MODULE,
                                            kv_role="kv_both", kv_connector_extra_config=extra,
                                            kv_load_failure_policy=kv_load_failure_policy),
    )


def layer_names(n: int = NUM_LAYERS) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def attention_spec(block_size: int, mla: bool = False, dtype: torch.dtype = torch.bfloat16):
    if mla:
        return MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=576, dtype=dtype)
    return FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=dtype)


def make_kv_cache_config(num_blocks: int, block_size: int, mla: bool = False,
                         num_layers: int = NUM_LAYERS) -> KVCacheConfig:
    spec = attention_spec(block_size, mla)
    names = layer_names(num_layers)
    page = spec.page_size_bytes
    tensor = KVCacheTensor(size=page * num_blocks * num_layers, layers=names,
                           layer_stride=page * num_blocks, block_stride=page)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def make_kv_caches(kv_cache_config: KVCacheConfig, layout: KVCacheLayout = KVCacheLayout.LBHNC,
                   seed: int = 0, kernel_block_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer views built by vLLM's own ``create_kv_cache_views``, filled with noise.

    ``kernel_block_size``: vLLM splits each scheduler block into kernel blocks of this size."""
    tensor = kv_cache_config.kv_cache_tensors[0]
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    if layout.is_layer_compact:
        views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, tensor, kernel_block_size)
    else:  # block-outermost: all layers' pages of a block together
        page = spec.page_size_bytes
        n = len(tensor.layers)
        bo = KVCacheTensor(size=tensor.size, layers=tensor.layers, layer_stride=page, block_stride=page * n)
        views = create_kv_cache_views(raw, spec, kv_cache_config.num_blocks, layout, bo)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(-128, 127, (tensor.size,), dtype=torch.int8, generator=gen)
    raw.copy_(noise)
    return dict(zip(tensor.layers, views))


def make_request(req_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id=req_id, prompt_token_ids=prompt, sampling_params=params,
                   pooling_params=None)


def make_scheduler(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Scheduler:
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(vllm_config),
                     block_size=vllm_config.cache_config.block_size, log_stats=True)


def prompt_tokens(n: int, seed: int = 0, vocab: int = 49152) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=gen).tolist()
