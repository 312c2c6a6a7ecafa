"""Moves SGLang host-pool pages to and from streamkv chunk payloads.

A streamkv chunk payload is layer-major: one section per layer, MHA sections
``[2, page_size, heads, head_dim]`` (K then V), MLA sections
``[page_size, kv_cache_dim]``. SGLang's host pool keeps pages in one of several
memory layouts (``--hicache-mem-layout``), so every page is re-ordered on the
way in and out. That costs one copy, but it is what lets a page written by a
``page_first`` replica be read by a ``layer_first`` one, and what lets the
layer-wise pipeline fetch one layer of a page with one ranged read.

Two entry points, matching SGLang's two storage paths:
* generic (``get``/``set``/``batch_*``): SGLang hands flat page tensors in the
  pool's own page order (``get_data_page(flat=True)`` /
  ``get_dummy_flat_data_page()``); ``flat_to_payload``/``payload_to_flat``.
* ``interface_v1`` (``batch_get_v1``/``batch_set_v1``): SGLang hands host slot
  indices; ``gather``/``scatter`` copy between the pool's pages (SGLang's own
  ``get_data_page(flat=False)`` views) and payloads, one copy per page.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from streamkv.errors import ConfigError
from streamkv.layout import KVLayout

# Layouts whose pages this codec can address. ``page_head`` splits heads
# across the page (heterogeneous-TP sharing), ``page_first_kv_split`` and
# ``page_unified`` are Ascend / fused formats: none is a plain page of KV.
SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

# Bytes of the reusable staging buffer that pages are gathered into before a write.
STAGE_BYTES = 256 << 20


def check_layout(layout: str) -> None:
    """Raise a ConfigError naming the SGLang flag when the host layout is not supported."""
    if layout not in SUPPORTED_LAYOUTS:
        raise ConfigError(
            "--hicache-mem-layout",
            layout,
            f"the streamkv storage backend supports {', '.join(SUPPORTED_LAYOUTS)}; "
            "launch SGLang with --hicache-mem-layout page_first (or layer_first)",
        )


@dataclass(frozen=True)
class PoolGeometry:
    """What the codec needs to know about a host pool, read once at registration."""

    mla: bool
    layout: str
    page_size: int
    layer_num: int
    heads: int  # MHA: KV heads on this rank; MLA: 1
    head_dim: int  # MHA: head_dim; MLA: kv_cache_dim
    dtype: torch.dtype

    @classmethod
    def of(cls, pool: Any) -> PoolGeometry:
        layout = str(pool.layout)
        check_layout(layout)
        mla = hasattr(pool, "kv_lora_rank")  # MLATokenToKVPoolHost; MHA pools have head_num
        if getattr(pool, "kv_buffer", None) is None:
            raise ConfigError("mem_pool_host", type(pool).__name__, "host pool has no kv_buffer (dummy pool)")
        if int(getattr(pool, "dcp_size", 1)) != 1:
            raise ConfigError("--dcp-size", pool.dcp_size, "the streamkv backend does not support DCP yet")
        if mla:
            return cls(True, layout, int(pool.page_size), int(pool.layer_num), 1, int(pool.kv_cache_dim), pool.dtype)
        if int(getattr(pool, "v_head_dim", pool.head_dim)) != int(pool.head_dim):
            raise ConfigError("v_head_dim", pool.v_head_dim,
                              "K and V head sizes must match (asymmetric MHA pools are not supported)")
        return cls(False, layout, int(pool.page_size), int(pool.layer_num), int(pool.head_num), int(pool.head_dim),
                   pool.dtype)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """One page in streamkv order: layer, then the section."""
        if self.mla:
            return (self.layer_num, self.page_size, self.head_dim)
        return (self.layer_num, 2, self.page_size, self.heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        n = 1
        for d in self.canonical_shape:
            n *= d
        return n * self.dtype.itemsize

    def native_page_shape(self) -> tuple[int, ...]:
        """Shape of one flat page as SGLang's ``get_data_page`` orders it."""
        L, P, H, D = self.layer_num, self.page_size, self.heads, self.head_dim
        if self.mla:
            return {"layer_first": (L, P, D), "page_first": (P, L, D), "page_first_direct": (L, P, D)}[self.layout]
        return {
            "layer_first": (2, L, P, H, D),
            "page_first": (2, P, L, H, D),
            "page_first_direct": (2, L, P, H, D),
        }[self.layout]

    def native_to_canonical(self) -> tuple[int, ...]:
        """Permutation taking a native page to canonical order."""
        if self.mla:
            return (1, 0, 2) if self.layout == "page_first" else (0, 1, 2)
        return (2, 0, 1, 3, 4) if self.layout == "page_first" else (1, 0, 2, 3, 4)


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as a uint8 numpy array (no copy)."""
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


class PageCodec:
    """Re-orders pages between one registered SGLang host pool and streamkv payloads."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.geo = PoolGeometry.of(pool)
        self._stage: torch.Tensor | None = None
        self._stage_lock = threading.Lock()
        self._to_canon = self.geo.native_to_canonical()
        self._from_canon = _inverse(self._to_canon)

    @property
    def page_bytes(self) -> int:
        return self.geo.page_bytes

    def page_starts(self, host_indices: torch.Tensor, n_pages: int) -> torch.Tensor:
        """First host slot of each page; checks that ``host_indices`` covers the pages."""
        P = self.geo.page_size
        if host_indices.numel() != n_pages * P:
            raise ValueError(f"host_indices has {host_indices.numel()} slots for {n_pages} pages of {P}")
        return host_indices.reshape(n_pages, P)[:, 0]

    # ---- interface_v1: straight out of / into the pool's pages ----

    def _native(self, start: int) -> torch.Tensor:
        """A view (no copy) of one page in the pool, through SGLang's own ``get_data_page``.

        A page is ``page_size`` consecutive host slots from a page-aligned start,
        as SGLang's page allocator hands them out and its own accessors assume."""
        return self.pool.get_data_page(start, flat=False).view(self.geo.native_page_shape())

    def _gather_into(self, out: torch.Tensor, starts: Sequence[int]) -> np.ndarray:
        for i, start in enumerate(starts):
            out[i].copy_(self._native(int(start)).permute(*self._to_canon))
        return out.view(torch.uint8).reshape(len(starts), self.geo.page_bytes).numpy()

    def gather(self, host_indices: torch.Tensor, n_pages: int) -> np.ndarray:
        """Copy ``n_pages`` pages out of the pool into a new ``(n_pages, page_bytes)`` uint8 array."""
        starts = self.page_starts(host_indices, n_pages).tolist()
        return self._gather_into(torch.empty((n_pages, *self.geo.canonical_shape), dtype=self.geo.dtype), starts)

    @contextmanager
    def gathered(self, host_indices: torch.Tensor, n_pages: int) -> Iterator[np.ndarray]:
        """Like ``gather``, into a staging buffer that is valid until the block ends.

        The stage is kept and reused: a fresh buffer per batch costs more in page
        faults than the copy itself. A second caller while the stage is busy, or a
        batch larger than ``STAGE_BYTES``, gets a fresh buffer."""
        g = self.geo
        starts = self.page_starts(host_indices, n_pages).tolist()
        reuse = n_pages * g.page_bytes <= STAGE_BYTES and self._stage_lock.acquire(blocking=False)
        try:
            if reuse:
                if self._stage is None or self._stage.shape[0] < n_pages:
                    pages = max(n_pages, min(STAGE_BYTES // g.page_bytes, 128))
                    self._stage = torch.empty((pages, *g.canonical_shape), dtype=g.dtype)
                out = self._stage[:n_pages]
            else:
                out = torch.empty((n_pages, *g.canonical_shape), dtype=g.dtype)
            yield self._gather_into(out, starts)
        finally:
            if reuse:
                self._stage_lock.release()

    def scatter(self, host_indices: torch.Tensor, payloads: Sequence[Any]) -> None:
        """Write whole-page payloads (canonical order) into the pool at the given pages.

        ``payloads[i]`` goes to page ``i`` of ``host_indices``; pass only the
        pages to write. One re-ordering copy per page, payload → pool."""
        g = self.geo
        n = len(payloads)
        if n == 0:
            return
        starts = host_indices[: n * g.page_size].reshape(n, g.page_size)[:, 0].tolist()
        for start, payload in zip(starts, payloads):
            raw = np.frombuffer(payload, dtype=np.uint8, count=g.page_bytes)
            if not raw.flags.writeable:  # torch wants writable memory; copy only then
                raw = raw.copy()
            src = torch.from_numpy(raw).view(g.dtype).view(g.canonical_shape)
            self._native(int(start)).copy_(src.permute(*self._from_canon))

    # ---- generic path: flat page tensors in the pool's own order ----

    def flat_to_payload(self, flat: torch.Tensor) -> np.ndarray:
        """A flat page from ``get_data_page(flat=True)`` as a canonical payload."""
        g = self.geo
        if flat.numel() * flat.element_size() != g.page_bytes or flat.dtype != g.dtype:
            raise ValueError(
                f"page tensor has {flat.numel()} x {flat.dtype}; "
                f"expected {g.page_bytes // g.dtype.itemsize} x {g.dtype}"
            )
        page = flat.reshape(self.geo.native_page_shape()).permute(*self._to_canon)
        return _as_bytes(page)

    def payload_to_flat(self, payload: Any, target: torch.Tensor) -> torch.Tensor:
        """Fill a flat page tensor (``get_dummy_flat_data_page()``) from a canonical payload."""
        g = self.geo
        if target.numel() * target.element_size() != g.page_bytes or target.dtype != g.dtype:
            raise ValueError(f"target tensor has {target.numel()} x {target.dtype}; expected one page of {g.dtype}")
        raw = np.frombuffer(payload, dtype=np.uint8, count=g.page_bytes)
        if not raw.flags.writeable:  # torch wants writable memory; copy only then
            raw = raw.copy()
        src = torch.from_numpy(raw).view(g.dtype).view(g.canonical_shape)
        native = src.permute(*self._from_canon)
        target.view(self.geo.native_page_shape()).copy_(native)
        return target


def layout_for(geo: PoolGeometry, kv_dtype: str) -> KVLayout:
    """The streamkv layout of one SGLang page: chunk_size is the page size."""
    return KVLayout(
        num_layers=geo.layer_num,
        num_kv_heads=geo.heads,
        head_size=geo.head_dim,
        dtype=kv_dtype,
        chunk_size=geo.page_size,
        mla=geo.mla,
    )
