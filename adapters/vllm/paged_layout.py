"""Translate vLLM's per-layer paged KV views into streamkv's byte segments.

Why: vLLM 0.32 hands every attention layer one view of logical shape
``[num_blocks, heads, block_size, content]`` (all layers ``as_strided`` into one
buffer, physical order set by ``KVCacheLayout``), but *what* ``content`` holds
depends on the attention backend:

* ``packed`` (FlashAttention, Triton, FlashInfer...): K and V side by side in the
  last dim, ``content = head_size + head_size_v``.
* ``block_split`` (the CPU backend, ``CPU_ATTN``): each ``(block, head)`` region is
  a K half followed by a V half of ``block_size * head_size`` elements each; the
  backend re-views the region as ``[2 * block_size, head_size]`` and chunks it. Inside
  a half the arrangement is the ISA kernel's own (``vec`` stores K transposed), so these
  pages are only ever copied as whole blocks, bytes unchanged (``LayerPages.pages``).
* ``latent`` (MLA): one head, ``content`` is the latent vector, no V.

Everything here is derived from the tensor's shape and strides; nothing assumes a
contiguous cache. The gather/scatter itself is streamkv's (``streamkv.pipeline.paged``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from streamkv.pipeline import paged as core_paged
from streamkv.pipeline.paged import PagedSegment

KVPacking = Literal["packed", "block_split", "latent"]

# Attention backends whose KV content is K block then V block inside each (block, head).
BLOCK_SPLIT_BACKENDS = frozenset({"CPU_ATTN"})


def packing_for_backend(backend_name: str | None, *, mla: bool) -> KVPacking:
    """How K and V share one page for an attention backend (by ``get_name()``)."""
    if mla:
        return "latent"
    if backend_name is not None and backend_name.upper() in BLOCK_SPLIT_BACKENDS:
        return "block_split"
    return "packed"


@dataclass(frozen=True)
class LayerPages:
    """One layer's paged KV as streamkv segments (K, V) or (latent,).

    ``pages``: set for the CPU backend, whose block interiors are ISA-specific bytes
    anyway (see ``settings.kv_format``). A chunk section is then the blocks' pages
    themselves, ``[blocks, heads, block_size, content]`` (each head's K half, then its V
    half), so a chunk copies as a few long runs; only whole blocks are ever copied."""

    segments: tuple[PagedSegment, ...]
    block_size: int
    num_blocks: int
    pages: torch.Tensor | None = None

    @property
    def page_order(self) -> bool:
        return self.pages is not None

    def page_bytes(self) -> int:
        """Bytes of one block of this layer (all heads, K and V)."""
        return sum(s.row_bytes for s in self.segments) * self.block_size


def _block_split(kv: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[B, H, N, D]`` views of a CPU_ATTN page, built from its strides."""
    num_blocks, heads, block_size, content = kv.shape
    if content != 2 * head_size:
        raise ValueError(
            f"CPU_ATTN KV view: last dim {content} != 2 * head_size ({2 * head_size})"
        )
    s_b, s_h, s_n, s_c = kv.stride()
    if block_size > 1 and s_n != content or content > 1 and s_c != 1:
        raise ValueError(
            "CPU_ATTN KV view: each (block, head) region must be one contiguous "
            f"[block_size, content] run, got shape {tuple(kv.shape)} strides {kv.stride()}"
        )
    size = (num_blocks, heads, block_size, head_size)
    stride = (s_b, s_h, head_size, 1)
    off = kv.storage_offset()
    k = kv.as_strided(size, stride, off)
    v = kv.as_strided(size, stride, off + block_size * head_size)
    return k, v


def layer_pages(kv: torch.Tensor, packing: KVPacking, head_size: int) -> LayerPages:
    """Segments of one layer's vLLM KV view ``[num_blocks, heads, block_size, content]``."""
    if kv.dim() != 4:
        raise ValueError(
            f"vLLM KV view must be 4-D [num_blocks, heads, block_size, content], got {tuple(kv.shape)}"
        )
    num_blocks, heads, block_size, content = (int(x) for x in kv.shape)
    if packing == "latent":
        if heads != 1:
            raise ValueError(f"MLA KV view must have one head, got shape {tuple(kv.shape)}")
        segs = core_paged.mla(kv[:, 0])
    elif packing == "block_split":
        k, v = _block_split(kv, head_size)
        segs = core_paged.mha_hnd(k, v)
        return LayerPages(tuple(segs), block_size, num_blocks, pages=kv)
    elif packing == "packed":
        if content != 2 * head_size:
            raise ValueError(
                f"packed KV view: last dim {content} != 2 * head_size ({2 * head_size}); "
                "a different V head size is not supported"
            )
        segs = core_paged.vllm_packed(kv, head_size)
    else:
        raise ValueError(f"packing={packing!r}: expected packed, block_split or latent")
    return LayerPages(tuple(segs), block_size, num_blocks)


def slots_for_tokens(
    block_ids: list[int] | torch.Tensor, block_size: int, start: int, end: int
) -> torch.Tensor:
    """Pool slots (``block * block_size + offset``) of a request's tokens ``[start, end)``.

    ``block_ids`` is the request's block table (block ``i`` holds tokens
    ``i * block_size ..``)."""
    if not 0 <= start <= end:
        raise ValueError(f"token range [{start}, {end}) is not a range")
    if end == 0:
        return torch.zeros(0, dtype=torch.int64)
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    need = (end + block_size - 1) // block_size
    if blocks.numel() < need:
        raise ValueError(
            f"tokens [{start}, {end}) need {need} blocks of {block_size}, request has {blocks.numel()}"
        )
    tok = torch.arange(start, end, dtype=torch.int64)
    return blocks[tok // block_size] * block_size + tok % block_size


def blocks_for_tokens(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Block ids that hold any of the tokens ``[start, end)``."""
    if end <= start:
        return []
    return list(block_ids[start // block_size : (end + block_size - 1) // block_size])


def _wide(view: torch.Tensor) -> torch.dtype:
    """The widest integer type a uint8 page view can be reinterpreted as.

    Strided copies move uint8 elements about ten times slower than int64 ones on a CPU."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if view.shape[-1] % size == 0 and view.storage_offset() % size == 0 and all(
            st % size == 0 for st in view.stride()[:-1]
        ):
            return dtype
    return torch.uint8


def gather_blocks(pages: LayerPages, block_ids: list[int], out: torch.Tensor) -> torch.Tensor:
    """Whole blocks -> one chunk section (for token-major pages, the bytes ``gather_pages``
    gives for their slots; for page-order pages, the pages themselves).

    Why a second path: a chunk is whole blocks, so each segment (or the whole page) is one
    ``index_select`` along the block dimension, in wide integer elements, straight into
    its part of the section; slot-wise indexing pays for two advanced indices per token."""
    idx = torch.as_tensor(block_ids, dtype=torch.int64)
    if pages.page_order:
        assert pages.pages is not None
        src = _as_wide(pages.pages)
        n = len(block_ids) * pages.page_bytes()
        torch.index_select(src, 0, idx, out=out[:n].view(src.dtype).view(len(block_ids), *src.shape[1:]))
        return out[:n]
    tokens = len(block_ids) * pages.block_size
    at = 0
    for seg in pages.segments:
        n = tokens * seg.row_bytes
        wide = _wide(seg.view)
        dst = out[at : at + n].view(wide).view(len(block_ids), seg.block_size, seg.heads, -1)
        torch.index_select(seg.view.view(wide), 0, idx, out=dst)
        at += n
    return out[:at]


def scatter_blocks(pages: LayerPages, block_ids: list[int], section: torch.Tensor) -> None:
    """One chunk section -> whole blocks (inverse of :func:`gather_blocks`)."""
    if pages.page_order:
        assert pages.pages is not None
        dst = _as_wide(pages.pages)
        n = len(block_ids) * pages.page_bytes()
        src = section[:n].view(dst.dtype).view(len(block_ids), *dst.shape[1:])
        for j, block in enumerate(block_ids):
            dst[block].copy_(src[j])
        return
    tokens = len(block_ids) * pages.block_size
    at = 0
    for seg in pages.segments:
        n = tokens * seg.row_bytes
        wide = _wide(seg.view)
        dst = seg.view.view(wide)
        src = section[at : at + n].view(wide).view(len(block_ids), seg.block_size, seg.heads, -1)
        for j, block in enumerate(block_ids):
            dst[block].copy_(src[j])
        at += n


def _as_wide(kv: torch.Tensor) -> torch.Tensor:
    """A page view ``[blocks, heads, block_size, content]`` as the widest integer elements."""
    raw = kv.view(torch.uint8) if kv.element_size() == 1 else _bytes_view(kv)
    return raw.view(_wide(raw))


def _bytes_view(kv: torch.Tensor) -> torch.Tensor:
    if kv.shape[-1] > 1 and kv.stride(-1) != 1:
        raise ValueError(f"page view: the last dim must be contiguous, got strides {kv.stride()}")
    return kv.view(torch.uint8)
