"""The layer-wise pipeline: producer, consumer handle, sinks, and the device layer.

The CPU pieces (handle, producer, saver, sink) need only numpy. The device
pieces (events and streams, the pinned staging ring, paged gather/scatter)
need torch, so they load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "select_device": "streamkv.pipeline.device",
    "StagingRing": "streamkv.pipeline.staging",
    "PagedPoolSink": "streamkv.pipeline.staging",
    "load_layer": "streamkv.pipeline.staging",
    "save_layer": "streamkv.pipeline.staging",
    "gather_pages": "streamkv.pipeline.paged",
    "scatter_pages": "streamkv.pipeline.paged",
    "mha_nhd": "streamkv.pipeline.paged",
    "mha_hnd": "streamkv.pipeline.paged",
    "token_pool": "streamkv.pipeline.paged",
    "vllm_packed": "streamkv.pipeline.paged",
    "mla": "streamkv.pipeline.paged",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamkv.pipeline' has no attribute {name!r}")
