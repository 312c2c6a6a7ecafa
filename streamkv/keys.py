"""Chunk keys: a token sequence cut into full chunks, each named by a prefix chain.

Key ``i`` is ``hash(key[i-1], tokens of chunk i, namespace)``, so it names the
whole prefix up to and including chunk ``i``: change one token in chunk ``i``
and keys ``i..`` change while keys ``< i`` stay. The namespace binds keys to
the model's weights, the KV dtype, the layout, the parallel rank and the
format version, so KV of one model is never served to another."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import xxhash

from streamkv.errors import ConfigError
from streamkv.format import FORMAT_VERSION
from streamkv.layout import KVLayout

_NS_ID_CHARS = 32


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for stored KV to be valid for an engine."""

    model: str
    layout: KVLayout
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    extra: str = ""
    format_version: int = FORMAT_VERSION
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", self.model, "a model fingerprint is required")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError("tp_rank", self.tp_rank, f"must be in 0..{self.tp_size - 1}")
        if self.pp_rank < 0:
            raise ConfigError("pp_rank", self.pp_rank, "must be >= 0")
        text = "|".join(
            [
                f"model={self.model}",
                f"layout={self.layout.describe()}",
                f"tp={self.tp_rank}/{self.tp_size}",
                f"pp={self.pp_rank}",
                f"format={self.format_version}",
                f"extra={self.extra}",
            ]
        )
        object.__setattr__(self, "digest", xxhash.xxh3_128_digest(text.encode()))

    @property
    def kv_dtype(self) -> str:
        return self.layout.dtype

    @property
    def id(self) -> str:
        """Hex id used as the directory / S3 prefix of this namespace's objects."""
        return self.digest.hex()[:_NS_ID_CHARS]


def as_token_array(tokens: Any) -> np.ndarray:
    """Tokens as a contiguous uint32 array; rejects anything that is not integer ids."""
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # a torch tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens: expected a sequence of integer token ids, got {type(tokens).__name__}")
    arr = np.asarray(tokens)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise TypeError(f"tokens: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= 2**32:
        raise TypeError("tokens: token ids must lie in 0..2**32-1")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def chunk_digests(tokens: Any, chunk_size: int, namespace: Namespace) -> list[bytes]:
    """16-byte prefix-chained digests, one per full chunk (a partial tail has none)."""
    arr = as_token_array(tokens)
    if chunk_size <= 0:
        raise ConfigError("chunk_size", chunk_size, "must be a positive integer")
    data = memoryview(arr).cast("B")
    step = chunk_size * 4
    parent = namespace.digest
    out: list[bytes] = []
    for i in range(len(arr) // chunk_size):
        h = xxhash.xxh3_128(parent)
        h.update(data[i * step : (i + 1) * step])
        parent = h.digest()
        out.append(parent)
    return out


def chunk_keys(tokens: Any, chunk_size: int, namespace: Namespace) -> list[str]:
    """Store keys (``<namespace id>/<chunk hex>``), one per full chunk, prefix-chained."""
    prefix = namespace.id
    return [f"{prefix}/{d.hex()}" for d in chunk_digests(tokens, chunk_size, namespace)]


def external_key(namespace: Namespace, name: str) -> str:
    """A store key for an object named by an engine's own hash (e.g. SGLang page hashes).

    The name is re-hashed with the namespace so that equal engine hashes from
    another model, dtype or rank never collide."""
    if not name:
        raise ValueError("key name must be non-empty")
    digest = xxhash.xxh3_128_digest(namespace.digest + name.encode())
    return f"{namespace.id}/{digest.hex()}"


def split_key(key: str) -> tuple[str, str]:
    """(namespace id, object name) of a store key."""
    ns, sep, name = key.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"key={key!r}: expected '<namespace>/<name>'")
    return ns, name


def full_chunk_tokens(num_tokens: int, chunk_size: int) -> int:
    """Tokens covered by full chunks."""
    return (num_tokens // chunk_size) * chunk_size


def prefix_hits(flags: Sequence[bool]) -> int:
    """Length of the leading run of True."""
    n = 0
    for flag in flags:
        if not flag:
            break
        n += 1
    return n
