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


class ChunkViewSink:
    """Each verified section kept as it arrived: a zero-copy view of a memory-tier object,
    or the buffer a disk/S3 read filled. The consumer assembles a layer with one copy
    straight into its own cache tensor, instead of a copy here and another there.

    Memory-tier buffers are never reused, so a view stays valid after eviction."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.sections: list[list[np.ndarray | None]] = []

    def begin(self, hit_chunks: int) -> None:
        self.sections = [[None] * hit_chunks for _ in range(self.layout.num_layers)]

    def write(self, layer: int, chunk: int, raw: memoryview) -> None:
        lay = self.layout
        self.sections[layer][chunk] = np.frombuffer(raw, dtype=lay.raw_numpy_dtype).reshape(lay.section_shape)

    def layer_sections(self, layer: int) -> list[np.ndarray]:
        """The chunks' sections of ``layer`` in order (``[2, C, H, D]`` each, or ``[C, D]``)."""
        parts = self.sections[layer]
        if any(p is None for p in parts):
            raise ValueError(f"layer {layer} is incomplete")
        return parts  # type: ignore[return-value]
