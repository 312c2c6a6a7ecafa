"""Moves SGLang host-pool pages to and from streamkv chunk payloads.

A streamkv chunk payload is layer-major: one section per layer, MHA sections
``[2, page_size, heads, head_dim]`` (K then V), MLA sections
``[page_size, kv_cache_dim]``. SGLang's host pool keeps pages in one of several
memory layouts (``--hicache-mem-layout``), so every page is re-ordered on the
way in and out. The re-ordering is no extra copy: the engine copies sections
straight between these views of the pool and its objects. It is what lets a
page written by a ``page_first`` replica be read by a ``layer_first`` one, and
what lets the layer-wise pipeline fetch one layer of a page with one ranged read.

Two entry points, matching SGLang's two storage paths:
* generic (``get``/``set``/``batch_*``): SGLang hands flat page tensors in the
  pool's own page order (``get_data_page(flat=True)`` /
  ``get_dummy_flat_data_page()``); ``flat_view`` permutes one the same way.
* ``interface_v1`` (``batch_get_v1``/``batch_set_v1``): SGLang hands host slot
  indices; ``page_views`` are the pool's pages (SGLang's own
  ``get_data_page(flat=False)`` views), permuted into section order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from streamkv.errors import ConfigError
from streamkv.layout import KVLayout

# Layouts whose pages this codec can address. ``page_head`` splits heads
# across the page (heterogeneous-TP sharing), ``page_first_kv_split`` and
# ``page_unified`` are Ascend / fused formats: none is a plain page of KV.
SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")

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


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy, same strides) of a CPU tensor's elements as same-size integers
    (numpy has no bfloat16; the bytes are what is copied)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


class PageCodec:
    """Views of one registered SGLang host pool's pages in streamkv's section order.

    A view is the pool's own memory, permuted (no copy): ``view[l]`` is layer ``l``'s section of
    the page. The engine copies sections straight between such views and its objects, so the
    re-ordering between SGLang's layout and streamkv's is the one copy each way."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.geo = PoolGeometry.of(pool)
        self._to_canon = self.geo.native_to_canonical()

    @property
    def page_bytes(self) -> int:
        return self.geo.page_bytes

    def page_starts(self, host_indices: torch.Tensor, n_pages: int) -> torch.Tensor:
        """First host slot of each page; checks that ``host_indices`` covers the pages."""
        P = self.geo.page_size
        if host_indices.numel() != n_pages * P:
            raise ValueError(f"host_indices has {host_indices.numel()} slots for {n_pages} pages of {P}")
        return host_indices.reshape(n_pages, P)[:, 0]

    # ---- interface_v1: the pool's pages in place ----

    def _native(self, start: int) -> torch.Tensor:
        """A view (no copy) of one page in the pool, through SGLang's own ``get_data_page``.

        A page is ``page_size`` consecutive host slots from a page-aligned start,
        as SGLang's page allocator hands them out and its own accessors assume."""
        return self.pool.get_data_page(start, flat=False).view(self.geo.native_page_shape())

    def page_views(self, host_indices: torch.Tensor, n_pages: int) -> list[np.ndarray]:
        """Layer-first views of the ``n_pages`` pool pages at ``host_indices`` (no copy)."""
        starts = self.page_starts(host_indices, n_pages).tolist()
        return [as_numpy(self._native(int(s)).permute(*self._to_canon)) for s in starts]

    # ---- generic path: flat page tensors in the pool's own order ----

    def flat_view(self, flat: torch.Tensor) -> np.ndarray:
        """A flat page tensor (``get_data_page(flat=True)`` / ``get_dummy_flat_data_page()``) as a
        layer-first view (no copy)."""
        g = self.geo
        if flat.numel() * flat.element_size() != g.page_bytes or flat.dtype != g.dtype or flat.device.type != "cpu":
            raise ValueError(
                f"page tensor has {flat.numel()} x {flat.dtype} on {flat.device}; "
                f"expected {g.page_bytes // g.dtype.itemsize} x {g.dtype} on the CPU"
            )
        return as_numpy(flat.view(g.native_page_shape()).permute(*self._to_canon))


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
