"""Which stored pages an SGLang rank may use: its streamkv namespace.

SGLang's page hashes cover only token ids, so everything else that makes KV
bytes differ has to be in the namespace: the model, the KV dtype and shape
(layout, page size), and the rank's shard of the KV. SGLang's own file backend
leaves the KV dtype out and collides across runs (sglang issue 33268); here the
dtype is part of the layout, which is part of every key.

MLA KV is the same on every TP rank (the latent is not sharded), so MLA ranks
share one namespace with TP left out; only the ``is_storage_writer`` rank
writes, the others read. MHA ranks each own their head shard: TP rank and size
are in the key. The host pool's memory layout is *not* in the namespace: pages
are stored in streamkv's own layer-major order (see page_codec), so replicas
with different ``--hicache-mem-layout`` share objects.
"""

from __future__ import annotations

import os
from typing import Any

import xxhash

from streamkv.errors import ConfigError
from streamkv.keys import Namespace
from streamkv.layout import KVLayout


def model_identity(model_name: str | None, fingerprint: str | None) -> str:
    """The model part of the namespace: SGLang's model name, pinned by a fingerprint where we have one.

    A name alone does not pin weights; an explicit ``model_fingerprint`` does,
    and a local model directory contributes a hash of its ``config.json``."""
    name = (model_name or "").strip()
    if not name and not fingerprint:
        raise ConfigError(
            "model_fingerprint",
            fingerprint,
            "SGLang passed no model name; set model_fingerprint in --hicache-storage-backend-extra-config",
        )
    parts = [name or "unnamed"]
    if fingerprint:
        parts.append(f"fp={fingerprint}")
    config_json = os.path.join(name, "config.json") if name else ""
    if config_json and os.path.isfile(config_json):
        with open(config_json, "rb") as f:
            parts.append(f"cfg={xxhash.xxh3_64_hexdigest(f.read())}")
    return "|".join(parts)


def is_writer(storage_config: Any) -> bool:
    """SGLang's own rule: every MHA rank writes; for MLA only the first rank of the DCP group."""
    return bool(storage_config.is_storage_writer)


def namespace_for(storage_config: Any, layout: KVLayout, model: str, extra: str = "") -> Namespace:
    """The namespace of one SGLang rank, from its ``HiCacheStorageConfig``."""
    shard = ["sglang-page", f"pp_size={storage_config.pp_size}"]
    if storage_config.attn_cp_size > 1:
        shard.append(f"cp={storage_config.attn_cp_rank}/{storage_config.attn_cp_size}")
    if getattr(storage_config, "dcp_size", 1) > 1:
        raise ConfigError("--dcp-size", storage_config.dcp_size, "the streamkv backend does not support DCP yet")
    if storage_config.should_split_heads:
        raise ConfigError("tp_lcm_size", storage_config.tp_lcm_size,
                          "split-head sharing (page_head layout) is not supported")
    if extra:
        shard.append(f"user={extra}")
    if layout.mla:
        tp_rank, tp_size = 0, 1  # replicated on every TP rank: one shared copy
    else:
        tp_rank, tp_size = storage_config.tp_rank, storage_config.tp_size
    return Namespace(
        model=model,
        layout=layout,
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=storage_config.pp_rank,
        extra=";".join(shard),
    )
