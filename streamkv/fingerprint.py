"""A model fingerprint from its weights, not only its name.

Two checkpoints that share a name but differ in weights (a fine-tune, another
quantisation) must never share KV, so the namespace hashes the tensors
themselves: every byte for models up to ``FULL_HASH_BYTES``, an even sample of
each tensor above that (cheap enough to run at every start)."""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import xxhash

FULL_HASH_BYTES = 2 << 30
_SAMPLE_BYTES = 1 << 20


def _tensor_bytes(tensor: Any) -> memoryview:
    if hasattr(tensor, "detach"):  # torch, without importing it
        t = tensor.detach().cpu().contiguous()
        t = t.view(-1).view(__import__("torch").uint8)
        return memoryview(t.numpy())
    return memoryview(np.ascontiguousarray(tensor)).cast("B")


def fingerprint_tensors(named: Iterable[tuple[str, Any]], extra: str = "") -> str:
    """Hex digest over tensor names, shapes, dtypes and contents."""
    items = list(named)
    total = sum(int(getattr(t, "nbytes", 0) or t.numel() * t.element_size()) for _, t in items)
    sample = total > FULL_HASH_BYTES
    h = xxhash.xxh3_128(extra.encode())
    for name, tensor in items:
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        data = _tensor_bytes(tensor)
        if sample and len(data) > _SAMPLE_BYTES:
            step = len(data) // 16
            for i in range(16):
                h.update(data[i * step : i * step + _SAMPLE_BYTES // 16])
        else:
            h.update(data)
    return h.hexdigest()


def fingerprint_model(model: Any) -> str:
    """Fingerprint of a torch module: its config plus its weights."""
    config = getattr(model, "config", None)
    text = json.dumps(config.to_dict(), sort_keys=True, default=str) if hasattr(config, "to_dict") else ""
    return fingerprint_tensors(model.state_dict().items(), extra=text)
