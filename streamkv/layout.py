"""What an engine's KV looks like, and where each layer lives inside a chunk.

A chunk holds ``chunk_size`` tokens. For every layer it has one section:
MHA sections are K then V, each ``[chunk_size, num_kv_heads, head_size]``;
MLA sections are one latent ``[chunk_size, head_size]``. Sections are
contiguous and in layer order, so one layer is one byte range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamkv.errors import ConfigError

# dtype name -> (bytes per element, numpy dtype used to hold the raw bytes)
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
}
_RAW_VIEW = {4: np.uint32, 2: np.uint16, 1: np.uint8}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a torch/numpy dtype or a string ('torch.bfloat16' -> 'bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name == "float":
        name = "float32"
    if name == "half":
        name = "float16"
    if name not in DTYPE_SIZES:
        raise ConfigError("dtype", dtype, f"unsupported KV dtype; one of {sorted(DTYPE_SIZES)}")
    return name


@dataclass(frozen=True)
class KVLayout:
    """The shape of one engine's KV, and the byte geometry of its chunks."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str = "bfloat16"
    chunk_size: int = 256
    mla: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("num_layers", "num_kv_heads", "head_size", "chunk_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(field, value, "must be a positive integer")
        if self.mla and self.num_kv_heads != 1:
            raise ConfigError("num_kv_heads", self.num_kv_heads, "MLA layouts have one latent head")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def planes(self) -> int:
        """Tensors per layer: 2 (K, V) for MHA, 1 latent for MLA."""
        return 1 if self.mla else 2

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's KV in one layer."""
        return self.planes * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def section_bytes(self) -> int:
        """Bytes of one layer section of a full chunk."""
        return self.chunk_size * self.token_bytes

    @property
    def chunk_bytes(self) -> int:
        """Payload bytes of a full chunk (all layers, no header)."""
        return self.num_layers * self.section_bytes

    @property
    def section_shape(self) -> tuple[int, ...]:
        """Element shape of one section: (2, T, H, D) for MHA, (T, D) for MLA."""
        if self.mla:
            return (self.chunk_size, self.head_size)
        return (2, self.chunk_size, self.num_kv_heads, self.head_size)

    @property
    def raw_numpy_dtype(self) -> type:
        """An unsigned integer dtype of the element width, to move bytes without meaning."""
        return _RAW_VIEW[self.itemsize]

    def section_offset(self, layer: int) -> int:
        """Offset of a layer's section inside a chunk payload."""
        self.check_layer(layer)
        return layer * self.section_bytes

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer}: outside 0..{self.num_layers - 1}")

    def describe(self) -> str:
        """A stable, human-readable identity, part of every chunk's namespace."""
        kind = "mla" if self.mla else "mha"
        return (
            f"{kind}:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_size}"
            f":{self.dtype}:C{self.chunk_size}"
        )

    def with_chunk_size(self, chunk_size: int) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_size, self.dtype, chunk_size, self.mla)

    @classmethod
    def from_hf_config(cls, config: Any, dtype: Any = "float32", chunk_size: int = 256) -> KVLayout:
        """Layout of a transformers model's cache from its config."""
        text = getattr(config, "text_config", None) or config
        layers = int(text.num_hidden_layers)
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(layers, heads, int(head_dim), dtype_name(dtype), chunk_size)
