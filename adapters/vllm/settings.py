"""From vLLM's configuration to streamkv's: settings, layout, namespace.

Why: both halves of the connector (scheduler process, worker processes) must
derive the *same* chunk size, layout and namespace from the same inputs, or the
keys one computes would never match the objects the other writes. This module
is that single derivation, and the one place ``kv_connector_extra_config`` is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from streamkv.config import StreamKVConfig
from streamkv.errors import ConfigError
from streamkv.keys import Namespace
from streamkv.layout import KVLayout, dtype_name

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

LoadMode = Literal["layerwise", "async"]
LOAD_MODES: tuple[str, ...] = ("layerwise", "async")

# kv_connector_extra_config keys that are the connector's own; every other key is
# passed to StreamKVConfig (memory_gb, disk_dir, s3_url, chunk_size, ...).
CONNECTOR_KEYS = frozenset({"load_mode", "config_path", "model_fingerprint", "attn_backend"})


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's own settings plus the streamkv configuration it runs with."""

    load_mode: LoadMode
    config: StreamKVConfig
    model_fingerprint: str | None = None
    attn_backend: str | None = None

    @property
    def layerwise(self) -> bool:
        return self.load_mode == "layerwise"

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        extra = dict(extra or {})
        mode = str(extra.get("load_mode", "layerwise")).lower().replace("-", "_")
        mode = {"layer_wise": "layerwise", "whole_request": "async"}.get(mode, mode)
        if mode not in LOAD_MODES:
            raise ConfigError("kv_connector_extra_config.load_mode", extra.get("load_mode"),
                              f"expected one of {LOAD_MODES} ('whole_request' means 'async')")
        overrides = {k: v for k, v in extra.items() if k not in CONNECTOR_KEYS}
        config = StreamKVConfig.load(extra.get("config_path"), **overrides)
        return cls(mode, config, extra.get("model_fingerprint"), extra.get("attn_backend"))  # type: ignore[arg-type]


def model_fingerprint(vllm_config: VllmConfig, override: str | None = None) -> str:
    """A name for the model's *weights*, not only its name.

    For a local folder: hashes of ``config.json`` and of each weight file's size and
    first MiB (the safetensors header lists every tensor's name, shape and offset).
    For a hub id: the id and revision. Quantization and the served dtype are folded in."""
    if override:
        return override
    mc = vllm_config.model_config
    h = hashlib.sha256()
    h.update(f"{mc.model}|rev={mc.revision}|quant={mc.quantization}|dtype={mc.dtype}".encode())
    folder = Path(str(mc.model))
    if folder.is_dir():
        cfg = folder / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            h.update(f"{path.name}:{path.stat().st_size}".encode())
            with path.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return f"{Path(str(mc.model)).name}@{h.hexdigest()[:24]}"


@dataclass(frozen=True)
class GroupGeometry:
    """The attention KV cache group the connector serves, from ``KVCacheConfig``."""

    layer_names: tuple[str, ...]  # in layer order
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str
    mla: bool


def attention_group(kv_cache_config: KVCacheConfig) -> GroupGeometry:
    """The single full-attention group; hybrid models need vLLM's HMA off and are refused."""
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

    groups = [g for g in kv_cache_config.kv_cache_groups if isinstance(g.kv_cache_spec, AttentionSpec)]
    if len(groups) != 1 or len(kv_cache_config.kv_cache_groups) != 1:
        raise ConfigError("kv_cache_groups", len(kv_cache_config.kv_cache_groups),
                          "StreamKVConnector serves models with one attention KV cache group")
    group = groups[0]
    spec = group.kv_cache_spec
    mla = isinstance(spec, MLAAttentionSpec)
    if not mla and spec.head_size_v != spec.head_size:
        raise ConfigError("head_size_v", spec.head_size_v, f"must equal head_size ({spec.head_size})")
    names = sorted(group.layer_names, key=lambda n: (extract_layer_index(n), n))
    return GroupGeometry(
        layer_names=tuple(names),
        block_size=int(spec.block_size),
        num_kv_heads=1 if mla else int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        dtype=dtype_name(spec.dtype),
        mla=mla,
    )


def build_layout(geometry: GroupGeometry, chunk_size: int) -> KVLayout:
    if chunk_size % geometry.block_size:
        raise ConfigError("chunk_size", chunk_size,
                          f"must be a multiple of vLLM's block size ({geometry.block_size})")
    return KVLayout(len(geometry.layer_names), geometry.num_kv_heads, geometry.head_size,
                    geometry.dtype, chunk_size, geometry.mla)


def kv_format(vllm_config: VllmConfig, geometry: GroupGeometry, settings: ConnectorSettings) -> tuple[str, str]:
    """(backend name, format tag) of the pages, the same in the scheduler and the workers.

    The CPU backend stores each block's interior in an ISA-specific arrangement (the
    ``vec`` kernels keep K transposed, ``[head_size, block_size]``). streamkv copies whole
    blocks byte for byte, so a round trip is exact, but those bytes are not the canonical
    ``[T, H, D]`` (and sections are the pages themselves, ``LayerPages.pages``):
    the tag puts them in their own namespace, never served to another backend or ISA. GPU backends store plain rows and share the canonical tag."""
    from vllm.platforms import current_platform

    backend = settings.attn_backend
    if backend is None:
        backend = "CPU_MLA" if geometry.mla and current_platform.is_cpu() else (
            "CPU_ATTN" if current_platform.is_cpu() else "GPU")
    if backend.upper() in ("CPU_ATTN", "CPU_MLA"):
        isa = "unknown"
        try:
            import torch
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(getattr(torch, geometry.dtype), geometry.block_size, geometry.head_size,
                                vllm_config.cache_config.cache_dtype)
        except Exception:  # an unknown ISA still gets its own, stable namespace
            pass
        return backend, f"{backend.lower()}:{isa}:bs{geometry.block_size}:pages"
    return backend, "canonical"


def build_namespaces(vllm_config: VllmConfig, layout: KVLayout, fingerprint: str,
                     format_tag: str = "canonical") -> list[Namespace]:
    """One namespace per tensor-parallel rank (index = rank)."""
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        raise ConfigError("pipeline_parallel_size", pc.pipeline_parallel_size,
                          "StreamKVConnector supports pipeline_parallel_size=1")
    tp = int(pc.tensor_parallel_size)
    extra = json.dumps({"engine": "vllm", "kv_cache_dtype": vllm_config.cache_config.cache_dtype,
                        "format": format_tag}, sort_keys=True)
    return [Namespace(fingerprint, layout, tp_rank=r, tp_size=tp, extra=extra) for r in range(tp)]


def tp_rank() -> int:
    """This worker's tensor-parallel rank (0 outside a distributed setup)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, RuntimeError, ImportError):
        return int(os.environ.get("STREAMKV_TP_RANK", "0"))
