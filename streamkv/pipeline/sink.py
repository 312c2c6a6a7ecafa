"""Where retrieved layer sections land.

A sink gets ``begin(hit_chunks)`` once the hit is known, then
``write(layer, chunk, raw)`` for every verified section, from worker threads
(different chunks of a layer may arrive concurrently; they never overlap).
``HostKVSink`` assembles each layer as one host array ``[planes, T, H, D]``
(``[T, D]`` for MLA) that an adapter turns into its engine's tensors."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from streamkv.layout import KVLayout


class LayerSink(Protocol):
    def begin(self, hit_chunks: int) -> None: ...

    def write(self, layer: int, chunk: int, raw: memoryview) -> None: ...


class HostKVSink:
    """Per-layer host arrays of the hit prefix, in the engine's element width."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.layers: list[np.ndarray] = []

    def begin(self, hit_chunks: int) -> None:
        lay = self.layout
        tokens = hit_chunks * lay.chunk_size
        shape = (tokens, lay.head_size) if lay.mla else (2, tokens, lay.num_kv_heads, lay.head_size)
        self.layers = [np.empty(shape, dtype=lay.raw_numpy_dtype) for _ in range(lay.num_layers)]

    def write(self, layer: int, chunk: int, raw: memoryview) -> None:
        lay = self.layout
        src = np.frombuffer(raw, dtype=lay.raw_numpy_dtype).reshape(lay.section_shape)
        lo, hi = chunk * lay.chunk_size, (chunk + 1) * lay.chunk_size
        if lay.mla:
            self.layers[layer][lo:hi] = src
        else:
            self.layers[layer][:, lo:hi] = src
