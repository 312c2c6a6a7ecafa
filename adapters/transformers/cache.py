"""A transformers ``DynamicCache`` whose layers fill themselves from a retrieve.

Before the forward starts, every layer reports the hit prefix as already
cached, so transformers computes positions and masks for the suffix only.
When attention of layer ``l`` calls ``update``, the layer first waits for
``handle.wait(l)`` and installs the streamed prefix, then appends the new
tokens as usual: layer ``l+1`` keeps streaming while layer ``l`` computes."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from streamkv.errors import LayoutMismatch, RetrieveFailed
from streamkv.layout import KVLayout
from streamkv.pipeline.handle import RetrieveHandle
from streamkv.pipeline.sink import ChunkViewSink

_TORCH_RAW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a model's forward and ``generate``: transformers 5.25 renamed
    ``past_key_values`` to ``cache`` (the old name warns on every call and goes in 5.40);
    older 5.x releases know only the old name."""
    forward = getattr(model, "forward", None)
    try:
        new = forward is not None and "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        new = False
    return {"cache" if new else "past_key_values": cache}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def layer_tensors(array: np.ndarray, layout: KVLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's host array ``[2, T, H, D]`` (raw width) as transformers' K, V ``[1, H, T, D]``."""
    raw = torch.from_numpy(array.view(np.dtype(f"i{layout.itemsize}")))
    kv = raw.view(torch_dtype(layout.dtype)).to(device, non_blocking=True)
    return kv[0].permute(1, 0, 2).unsqueeze(0), kv[1].permute(1, 0, 2).unsqueeze(0)


def section_planes(sections: list[np.ndarray], layout: KVLayout,
                   device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Chunk sections ``[2, C, H, D]`` (raw width) as K and V views ``[H, C, D]`` per chunk."""
    dtype = torch_dtype(layout.dtype)
    raw = np.dtype(f"i{layout.itemsize}")
    keys, values = [], []
    with warnings.catch_warnings():  # disk/S3 reads are read-only bytes; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        for section in sections:
            kv = torch.from_numpy(section.view(raw)).view(dtype).to(device, non_blocking=True)
            keys.append(kv[0].permute(1, 0, 2))
            values.append(kv[1].permute(1, 0, 2))
    return keys, values


def host_planes(keys: torch.Tensor, values: torch.Tensor, tokens: int) -> list[np.ndarray]:
    """transformers' K, V ``[1, H, T, D]`` as host planes ``[T, H, D]`` of raw width, for storing."""
    out = []
    for t in (keys, values):
        rows = t[0, :, :tokens].transpose(0, 1).contiguous().cpu()
        out.append(rows.view(_TORCH_RAW[rows.element_size()]).numpy())
    return out


class StreamedLayer(DynamicLayer):
    """A ``DynamicLayer`` that starts with the streamed prefix of one layer."""

    def __init__(self, handle: RetrieveHandle, layer: int, layout: KVLayout) -> None:
        super().__init__()
        self._handle = handle
        self._layer = layer
        self._layout = layout
        self._pending = handle.hit_tokens > 0

    def get_seq_length(self) -> int:
        if self._pending:
            return self._handle.hit_tokens
        return super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self._pending:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self._handle.wait(self._layer):
            raise RetrieveFailed(self._layer, self._handle.valid_tokens)
        self._pending = False
        self.lazy_initialization(key_states, value_states)
        sink = self._handle.sink  # type: ignore[attr-defined]
        if isinstance(sink, ChunkViewSink):
            # one copy: the streamed sections and the new tokens, straight into the cache tensor
            planes = section_planes(sink.layer_sections(self._layer), self._layout, key_states.device)
            self.keys = torch.cat([*planes[0], key_states[0]], dim=1).unsqueeze(0)
            self.values = torch.cat([*planes[1], value_states[0]], dim=1).unsqueeze(0)
            return self.keys, self.values
        self.keys, self.values = layer_tensors(sink.layers[self._layer], self._layout, key_states.device)
        return super().update(key_states, value_states, *args, **kwargs)


class StreamKVCache(DynamicCache):
    """The cache to pass as ``past_key_values``; reports the hit before its KV arrives."""

    def __init__(self, model_config: Any, handle: RetrieveHandle, layout: KVLayout) -> None:
        super().__init__(config=model_config)
        if len(self.layers) != layout.num_layers or any(type(l) is not DynamicLayer for l in self.layers):
            raise LayoutMismatch(
                f"model has {len(self.layers)} cache layers of types "
                f"{sorted({type(l).__name__ for l in self.layers})}; streamkv streams full-attention "
                f"DynamicLayer caches of {layout.num_layers} layers"
            )
        self.handle = handle
        self.layers = [StreamedLayer(handle, i, layout) for i in range(layout.num_layers)]

    @property
    def hit_tokens(self) -> int:
        return self.handle.hit_tokens
