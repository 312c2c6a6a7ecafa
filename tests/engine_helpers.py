"""Small real engines for tests: a tiny layout, random KV, tiers in a tmp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.keys import Namespace
from streamkv.layout import KVLayout

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_size=8, dtype="float32", chunk_size=16)


def make_engine(tmp: Path, layout: KVLayout = LAYOUT, tiers=None, model: str = "tiny", **overrides) -> StreamKVEngine:
    """``tiers``: tier names for the config (``("disk",)``), or ready Store objects."""
    names = tiers if tiers and isinstance(tiers[0], str) else None
    cfg = StreamKVConfig(chunk_size=layout.chunk_size, disk_dir=str(tmp / "disk"), memory_gb=0.01,
                         disk_gb=0.01, tiers=names, **overrides)
    return StreamKVEngine(cfg, layout, Namespace(model, layout), tiers=None if names else tiers)


def random_kv(tokens: int, layout: KVLayout = LAYOUT, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (tokens, layout.num_kv_heads, layout.head_size)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
            for _ in range(layout.num_layers)]


def source_of(kv: list[tuple[np.ndarray, np.ndarray]]):  # type: ignore[no-untyped-def]
    return lambda layer: [p.view(np.uint32) for p in kv[layer]]


def streamed(engine: StreamKVEngine, tokens, **kw) -> tuple[int, list[np.ndarray] | None]:  # type: ignore[no-untyped-def]
    """Retrieve and wait for every layer; (hit tokens, per-layer arrays or None on failure)."""
    handle = engine.retrieve(tokens, **kw)
    hit = handle.hit_tokens
    ok = all(handle.wait(layer) for layer in range(engine.layout.num_layers))
    return hit, ([a.view(np.float32) for a in handle.sink.layers] if ok else None)
