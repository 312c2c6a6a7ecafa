"""Layout translation: vLLM per-layer views (built by vLLM) -> streamkv segments, both copy paths."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.vllm.vllm_helpers import make_kv_cache_config, make_kv_caches
from streamkv.adapters.vllm.paged_layout import (
    gather_blocks,
    layer_pages,
    packing_for_backend,
    scatter_blocks,
    slots_for_tokens,
)
from streamkv.pipeline.paged import gather_pages, section_nbytes


def _raw(t: torch.Tensor) -> bytes:
    """Bytes, not values: the pages hold random bit patterns (NaNs never compare equal)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _pages(layout: KVCacheLayout, packing: str, mla: bool = False):
    kvc = make_kv_cache_config(24, 32, mla=mla, num_layers=2)
    caches = make_kv_caches(kvc, layout, seed=3)
    spec = kvc.kv_cache_groups[0].kv_cache_spec
    return [layer_pages(v, packing, spec.head_size) for v in caches.values()], caches


def test_packing_by_backend():
    assert packing_for_backend("CPU_ATTN", mla=False) == "block_split"
    assert packing_for_backend("FLASH_ATTN", mla=False) == "packed"
    assert packing_for_backend(None, mla=False) == "packed"
    assert packing_for_backend("CPU_MLA", mla=True) == "latent"


@pytest.mark.parametrize("layout,packing,mla", [
    (KVCacheLayout.LBNHC, "packed", False),
    (KVCacheLayout.LBHNC, "packed", False),
    (KVCacheLayout.BLNHC, "packed", False),
    (KVCacheLayout.LBHNC, "latent", True),
])
def test_page_path_equals_slot_path(layout, packing, mla):
    """For token-major pages the page-wise copy gives streamkv's own section bytes."""
    pages, _ = _pages(layout, packing, mla)
    blocks = [9, 4, 17, 2]
    slots = slots_for_tokens(blocks, 32, 0, 128)
    for p in pages:
        want = gather_pages(list(p.segments), slots, chunk_tokens=128)
        got = torch.empty_like(want)
        gather_blocks(p, blocks, got)
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout,packing,mla", [
    (KVCacheLayout.LBHNC, "block_split", False),
    (KVCacheLayout.LBNHC, "packed", False),
    (KVCacheLayout.LBHNC, "latent", True),
])
def test_page_path_round_trip(layout, packing, mla):
    pages, caches = _pages(layout, packing, mla)
    for p, kv in zip(pages, caches.values()):
        section = torch.empty(section_nbytes(list(p.segments), 64), dtype=torch.uint8)
        gather_blocks(p, [3, 5], section)
        scatter_blocks(p, [11, 7], section)
        assert _raw(kv[11]) == _raw(kv[3]) and _raw(kv[7]) == _raw(kv[5])


def test_block_split_reads_the_cpu_backend_halves():
    """K and V views equal what vLLM's CPU backend itself slices out of a page."""
    _, caches = _pages(KVCacheLayout.LBHNC, "block_split")
    kv = next(iter(caches.values()))
    nb, h, bs, _ = kv.shape
    k_ref, v_ref = kv.view(nb, h, bs * 2, -1).chunk(2, dim=2)
    from streamkv.adapters.vllm.paged_layout import _block_split

    k, v = _block_split(kv, kv.shape[-1] // 2)
    assert _raw(k) == _raw(k_ref) and _raw(v) == _raw(v_ref)


def test_bad_views_are_refused():
    with pytest.raises(ValueError, match="4-D"):
        layer_pages(torch.zeros(4, 32, 128), "packed", 64)
    with pytest.raises(ValueError, match="head_size"):
        layer_pages(torch.zeros(4, 2, 32, 100), "packed", 64)
    with pytest.raises(ValueError, match="one head"):
        layer_pages(torch.zeros(4, 2, 32, 64), "latent", 64)
    with pytest.raises(ValueError, match="need 2 blocks"):
        slots_for_tokens([1], 32, 0, 64)
