"""The write side: turn an engine's per-layer KV into chunk objects and put them.

The adapter hands over a ``LayerSource``: a function that returns, for one
layer, the planes of the request's KV as host arrays ``[T, H, D]`` (K and V)
or ``[T, D]`` (MLA latent), in raw element width. It is called on a worker
thread, so the engine's forward never waits for a copy, an encode or a put."""

from __future__ import annotations

from typing import Callable, Sequence

import anyio
import numpy as np
import structlog

from streamkv.format import encode_chunk
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.store.base import Store
from streamkv.store.limits import Limits

log = structlog.get_logger(__name__)

LayerSource = Callable[[int], Sequence[np.ndarray]]


def chunk_sections(planes: Sequence[np.ndarray], layout: KVLayout, chunk: int) -> list[memoryview]:
    """The parts of one layer section of ``chunk``: each plane's rows of that chunk."""
    lo, hi = chunk * layout.chunk_size, (chunk + 1) * layout.chunk_size
    parts = []
    for plane in planes:
        rows = np.ascontiguousarray(plane[lo:hi])
        parts.append(memoryview(rows).cast("B"))
    return parts


def check_planes(planes: Sequence[np.ndarray], layout: KVLayout, tokens: int, layer: int) -> None:
    want = (layout.head_size,) if layout.mla else (layout.num_kv_heads, layout.head_size)
    if len(planes) != layout.planes:
        raise ValueError(f"layer {layer}: {len(planes)} planes, layout has {layout.planes}")
    for plane in planes:
        if plane.shape[0] < tokens or tuple(plane.shape[1:]) != want or plane.itemsize != layout.itemsize:
            raise ValueError(
                f"layer {layer}: plane shape {plane.shape}/{plane.dtype} does not fit {layout.describe()}"
            )


def encode_chunks(source: LayerSource, layout: KVLayout, namespace: Namespace, chunks: Sequence[int],
                  compression: str) -> list[bytearray]:
    """Encode the given chunks of a request; runs on a worker thread."""
    tokens = (max(chunks) + 1) * layout.chunk_size
    per_chunk: list[list[bytes]] = [[] for _ in chunks]
    for layer in range(layout.num_layers):
        planes = source(layer)
        check_planes(planes, layout, tokens, layer)
        for i, chunk in enumerate(chunks):
            parts = chunk_sections(planes, layout, chunk)
            per_chunk[i].append(parts[0] if len(parts) == 1 else b"".join(parts))
    return [encode_chunk(namespace, layout, sections, compression=compression) for sections in per_chunk]


async def save_request(store: Store, keys: Sequence[str], source: LayerSource, layout: KVLayout,
                       namespace: Namespace, limits: Limits, compression: str,
                       counters: dict[str, int]) -> int:
    """Store the chunks of ``keys`` that no tier holds yet; returns how many were written."""
    present = await store.exists_many(keys)
    todo = [i for i, p in enumerate(present) if not p]
    if not todo:
        return 0
    try:
        objects = await anyio.to_thread.run_sync(
            encode_chunks, source, layout, namespace, todo, compression, limiter=limits.limiter("codec")
        )
    except ValueError as exc:
        counters["store_rejected"] = counters.get("store_rejected", 0) + 1
        log.error("KV handed to store does not fit the layout; nothing stored", error=str(exc))
        return 0
    # one batch: a daemon-backed store turns it into one round trip
    written = sum(await store.put_many([(keys[i], obj) for i, obj in zip(todo, objects)]))
    counters["stored_chunks"] = counters.get("stored_chunks", 0) + written
    return written
