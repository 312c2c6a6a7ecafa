"""Gather/scatter between an engine's paged KV pool and a contiguous layer section.

Why: engines keep KV in pages (vLLM blocks, SGLang token slots) while the store keeps one
contiguous section per layer. This module describes a pool as byte "segments", defines the
section's byte layout, and moves the bytes: with the compiled kernels (``kernels.py``) on a
GPU, with torch indexing everywhere else. Both paths give identical bytes, so a section
written by one is read back by the other.

Section layout (see ``cuda/paged_copy.cu``): tokens are grouped in chunks of
``chunk_tokens`` (a store chunk); inside a chunk the segments (K then V, or the MLA latent)
follow each other, and inside a segment rows are ``[token][head][seg_bytes]``. MHA with
separate K/V tensors and vLLM's packed K|V layout therefore give the same section bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
import torch

log = structlog.get_logger(__name__)

Backend = Literal["auto", "kernel", "torch"]


@dataclass(frozen=True)
class PagedSegment:
    """A strided byte view ``[num_blocks, block_size, heads, seg_bytes]`` of a pool.

    The innermost bytes of a (token, head) row are contiguous; every other stride is free,
    so non-contiguous engine views (vLLM's packed K|V halves, HND pages) need no copy.
    """

    view: torch.Tensor

    def __post_init__(self) -> None:
        v = self.view
        if v.dtype != torch.uint8 or v.dim() != 4:
            raise ValueError(f"PagedSegment.view must be a 4-D uint8 tensor, got {v.dtype} {tuple(v.shape)}")
        if v.shape[3] > 1 and v.stride(3) != 1:
            raise ValueError(f"PagedSegment.view: innermost dim must be contiguous, strides={v.stride()}")

    @property
    def num_blocks(self) -> int:
        return int(self.view.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.view.shape[1])

    @property
    def heads(self) -> int:
        return int(self.view.shape[2])

    @property
    def seg_bytes(self) -> int:
        return int(self.view.shape[3])

    @property
    def row_bytes(self) -> int:
        """Bytes one token contributes to the section for this segment."""
        return self.heads * self.seg_bytes

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def as_segment(pages: torch.Tensor) -> PagedSegment:
    """Wrap a 4-D ``[num_blocks, block_size, heads, dim]`` tensor of any dtype as bytes."""
    if pages.dim() != 4:
        raise ValueError(f"pages must be 4-D [num_blocks, block_size, heads, dim], got shape {tuple(pages.shape)}")
    if pages.shape[3] > 1 and pages.stride(3) != 1:
        raise ValueError(f"pages: the last dim must be contiguous (stride 1), got strides {pages.stride()}")
    if pages.element_size() == 1:
        return PagedSegment(pages.view(torch.uint8))
    if pages.shape[3] == 1:
        # view(dtype) needs stride 1 in the last dim; a size-1 dim may carry any stride.
        pages = pages.as_strided(pages.shape, (*pages.stride()[:3], 1))
    return PagedSegment(pages.view(torch.uint8))


def mha_nhd(k: torch.Tensor, v: torch.Tensor) -> list[PagedSegment]:
    """K and V pages ``[num_blocks, block_size, heads, head_size]`` (vLLM GPU: ``kv[0], kv[1]``)."""
    return [as_segment(k), as_segment(v)]


def mha_hnd(k: torch.Tensor, v: torch.Tensor) -> list[PagedSegment]:
    """K and V pages ``[num_blocks, heads, block_size, head_size]`` (FlashInfer HND)."""
    return [as_segment(k.permute(0, 2, 1, 3)), as_segment(v.permute(0, 2, 1, 3))]


def token_pool(k: torch.Tensor, v: torch.Tensor) -> list[PagedSegment]:
    """SGLang's ``MHATokenToKVPool`` per layer: ``[num_slots, heads, head_dim]``, slot-indexed."""
    return [as_segment(k.unsqueeze(1)), as_segment(v.unsqueeze(1))]


def vllm_packed(kv: torch.Tensor, head_size: int) -> list[PagedSegment]:
    """vLLM 0.32 packed pages ``[num_blocks, num_kv_heads, block_size, head_size + head_size_v]``.

    K is the first ``head_size`` elements of the last dim, V the rest; the view may be strided.
    """
    if kv.dim() != 4 or not 0 < head_size < kv.shape[3]:
        raise ValueError(f"vllm_packed: need 4-D kv with 0 < head_size < last dim, got {tuple(kv.shape)} head_size={head_size}")
    nhd = kv.permute(0, 2, 1, 3)
    return [as_segment(nhd[..., :head_size]), as_segment(nhd[..., head_size:])]


def mla(latent: torch.Tensor) -> list[PagedSegment]:
    """One latent tensor ``[num_blocks, block_size, dim]`` (vLLM MLA; SGLang MLA is ``[slots, 1, dim]``)."""
    if latent.dim() != 3:
        raise ValueError(f"mla: latent must be 3-D [num_blocks, block_size, dim], got {tuple(latent.shape)}")
    return [as_segment(latent.unsqueeze(2))]


def section_nbytes(segments: Sequence[PagedSegment], n_tokens: int) -> int:
    """Bytes of the layer section holding ``n_tokens`` tokens of these segments."""
    return n_tokens * sum(s.row_bytes for s in segments)


def slots_for_pages(pages: torch.Tensor, block_size: int, num_tokens: int | None = None) -> torch.Tensor:
    """Token slots of whole pages (``page * block_size + offset``), cut to ``num_tokens``."""
    pages = pages.to(torch.int64).reshape(-1)
    offs = torch.arange(block_size, device=pages.device, dtype=torch.int64)
    slots = (pages[:, None] * block_size + offs[None, :]).reshape(-1)
    return slots if num_tokens is None else slots[:num_tokens]


def _check(segments: Sequence[PagedSegment], slots: torch.Tensor, staging: torch.Tensor, chunk_tokens: int | None) -> int:
    if not segments:
        raise ValueError("segments: need at least one PagedSegment")
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError(f"slots must be a 1-D int64 tensor, got {slots.dtype} shape {tuple(slots.shape)}")
    if staging.dtype != torch.uint8 or staging.dim() != 1 or not staging.is_contiguous():
        raise ValueError(f"staging must be a contiguous 1-D uint8 tensor, got {staging.dtype} shape {tuple(staging.shape)}")
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    dev = segments[0].view.device
    for i, s in enumerate(segments):
        if s.view.device != dev:
            raise ValueError(f"segments[{i}] is on {s.view.device}, segments[0] on {dev}")
    if slots.device != dev or staging.device != dev:
        raise ValueError(f"slots ({slots.device}) and staging ({staging.device}) must be on the pool's device {dev}")
    need = section_nbytes(segments, slots.numel())
    if staging.numel() < need:
        raise ValueError(f"staging holds {staging.numel()} bytes, the section needs {need}")
    return need


Pieces = list[tuple[int, int, torch.Tensor]]


def _section_views(staging: torch.Tensor, segments: Sequence[PagedSegment], n: int, chunk: int) -> list[Pieces]:
    """Per segment, ``(tok0, tok1, view[tok1 - tok0, row_bytes])`` pieces of the section."""
    total = sum(s.row_bytes for s in segments)
    full, rest = divmod(n, chunk)
    out: list[Pieces] = []
    prefix = 0
    for s in segments:
        row = s.row_bytes
        pieces: Pieces = []
        if full:
            block = staging[: full * chunk * total].view(full, chunk * total)
            pieces.append((0, full * chunk, block[:, chunk * prefix : chunk * (prefix + row)].unflatten(1, (chunk, row))))
        if rest:
            base = full * chunk * total
            tail = staging[base + rest * prefix : base + rest * (prefix + row)].view(rest, row)
            pieces.append((full * chunk, n, tail))
        out.append(pieces)
        prefix += row
    return out


_WIDE = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` (uint8) viewed with the widest integer element its sizes, strides and offset allow.

    Why: torch's indexing copies element by element; 8-byte elements move rows ~4x faster."""
    for width, dtype in _WIDE:
        if (t.shape[-1] % width == 0 and t.storage_offset() % width == 0
                and all(st % width == 0 for st, sz in zip(t.stride()[:-1], t.shape[:-1]) if sz > 1)):
            try:
                return t.view(dtype)
            except RuntimeError:
                continue
    return t


def _alike(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 tensors viewed with the widest integer element both allow."""
    a, b = _wide(a), _wide(b)
    if a.element_size() > b.element_size():
        a = a.view(b.dtype)
    elif b.element_size() > a.element_size():
        b = b.view(a.dtype)
    return a, b


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for uint8 tensors of one shape, with wide elements where both allow."""
    d, s = _alike(dst, src)
    d.copy_(s)


def _slot_rows(seg: PagedSegment) -> torch.Tensor | None:
    """The pool as ``[num_slots, heads, seg_bytes]`` (a view) where blocks and in-block offsets
    merge into one slot dimension (NHD pages, SGLang's token pools, MLA); None where they do
    not (HND pages, vLLM's packed K|V halves)."""
    try:
        return seg.view.view(seg.num_slots, seg.heads, seg.seg_bytes)
    except RuntimeError:
        return None


def _per_chunk(pieces: Pieces, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(slots, contiguous ``[tokens, row_bytes]`` part of the section) for each chunk of ``pieces``."""
    out = []
    for t0, t1, part in pieces:
        parts = part if part.dim() == 3 else part.unsqueeze(0)
        m = parts.shape[1]
        out += [(slots[t0 + c * m : t0 + (c + 1) * m], parts[c]) for c in range(parts.shape[0])]
    return out


def gather_torch(
    segments: Sequence[PagedSegment], slots: torch.Tensor, staging: torch.Tensor, chunk_tokens: int | None = None
) -> None:
    """Torch indexing fallback of the gather kernel: pool rows at ``slots`` -> section."""
    n = slots.numel()
    if n == 0:
        return
    chunk = chunk_tokens or n
    for seg, pieces in zip(segments, _section_views(staging, segments, n, chunk)):
        pool = _slot_rows(seg)
        if pool is not None:  # one index_select per chunk, straight into the section
            for idx, dst in _per_chunk(pieces, slots):
                rows, out = _alike(pool, dst.view(-1, seg.heads, seg.seg_bytes))
                torch.index_select(rows, 0, idx, out=out)
            continue
        blk, off = slots // seg.block_size, slots % seg.block_size
        rows = _wide(seg.view)[blk, off].reshape(n, -1).view(torch.uint8)
        for t0, t1, dst in pieces:
            _copy_bytes(dst, rows[t0:t1].view(dst.shape))


def scatter_torch(
    segments: Sequence[PagedSegment], slots: torch.Tensor, staging: torch.Tensor, chunk_tokens: int | None = None
) -> None:
    """Torch indexing fallback of the scatter kernel: section -> pool rows at ``slots``."""
    n = slots.numel()
    if n == 0:
        return
    chunk = chunk_tokens or n
    for seg, pieces in zip(segments, _section_views(staging, segments, n, chunk)):
        pool_rows = _slot_rows(seg)
        if pool_rows is not None:  # one index_copy_ per chunk, straight from the section (4x
            for idx, src in _per_chunk(pieces, slots):  # faster than the index_put_ below)
                rows, part = _alike(pool_rows, src.view(-1, seg.heads, seg.seg_bytes))
                rows.index_copy_(0, idx, part)
            continue
        rows = torch.empty((n, seg.row_bytes), dtype=torch.uint8, device=staging.device)
        for t0, t1, src in pieces:
            _copy_bytes(rows[t0:t1].view(src.shape), src)
        blk, off = slots // seg.block_size, slots % seg.block_size
        pool = _wide(seg.view)
        pool[blk, off] = rows.view(pool.dtype).view(n, seg.heads, -1)


def chunk_scatter(segments: Sequence[PagedSegment]) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``scatter_pages`` of one section of whole segments at a time (a chunk's), with what
    depends only on the pool worked out once: each segment's slot rows, viewed wide. For a
    producer that scatters many small sections into one pool on a CPU, where the per-call
    Python of ``scatter_pages`` costs as much as the copy. None where the pool's blocks and
    offsets do not merge into slots (use ``scatter_pages``)."""
    rows = [_slot_rows(s) for s in segments]
    if any(r is None for r in rows):
        return None
    pools = [(_wide(r), s.heads, s.seg_bytes, s.row_bytes) for r, s in zip(rows, segments)]  # type: ignore[arg-type]

    def scatter(slots: torch.Tensor, section: torch.Tensor) -> None:
        n, off = slots.numel(), 0
        for pool, heads, seg_bytes, row_bytes in pools:
            part = section[off : off + n * row_bytes].view(n, heads, seg_bytes)
            try:
                pool.index_copy_(0, slots, part.view(pool.dtype))
            except RuntimeError:  # this section's offset does not allow the wide element
                dst, src = _alike(pool.view(torch.uint8), part)
                dst.index_copy_(0, slots, src)
            off += n * row_bytes

    return scatter


def _use_kernel(backend: Backend, device: torch.device) -> bool:
    if backend == "torch" or device.type != "cuda":
        if backend == "kernel":
            raise ValueError(f"backend='kernel' needs a CUDA/ROCm tensor, got device {device}")
        return False
    if backend == "auto" and os.environ.get("STREAMKV_KERNELS", "").lower() == "torch":
        return False  # the operator's switch to the fallback (an explicit backend wins)
    from streamkv.pipeline import kernels

    if kernels.available():
        return True
    if backend == "kernel":
        raise RuntimeError(f"backend='kernel' requested but the kernels cannot load: {kernels.unavailable_reason()}")
    return False


def gather_pages(
    segments: Sequence[PagedSegment],
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    chunk_tokens: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Gather the KV of ``slots`` into a layer section; returns the section (a view of ``out``).

    On a CUDA/ROCm pool the work is enqueued on the current stream (no host sync); slot
    values are not checked there, so they must be valid slots of the pool.
    """
    n = slots.numel()
    if out is None:
        out = torch.empty(section_nbytes(segments, n), dtype=torch.uint8, device=segments[0].view.device)
    need = _check(segments, slots, out, chunk_tokens)
    section = out[:need]
    if _use_kernel(backend, section.device):
        from streamkv.pipeline import kernels

        kernels.copy_with_kernels("gather", segments, slots, section, chunk_tokens)
    else:
        gather_torch(segments, slots, section, chunk_tokens)
    return section


def scatter_pages(
    segments: Sequence[PagedSegment],
    slots: torch.Tensor,
    section: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    backend: Backend = "auto",
) -> None:
    """Scatter a layer section into the pool rows at ``slots`` (inverse of :func:`gather_pages`)."""
    need = _check(segments, slots, section, chunk_tokens)
    section = section[:need]
    if _use_kernel(backend, section.device):
        from streamkv.pipeline import kernels

        kernels.copy_with_kernels("scatter", segments, slots, section, chunk_tokens)
    else:
        scatter_torch(segments, slots, section, chunk_tokens)
