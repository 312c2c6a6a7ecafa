"""Pages go into streamkv and come back byte for byte, through both of SGLang's storage paths.

The host pools are SGLang's real ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` on
CPU tensors (pools.py); the transfer loops are SGLang's own (controller.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402

from streamkv.adapters.sglang import StreamKVStorage  # noqa: E402

from .controller import backup, prefetch  # noqa: E402
from .pools import fill_random, mha_pool, mla_pool, page_hashes, page_kv  # noqa: E402

POOLS = {"mha": mha_pool, "mla": mla_pool}


def _pages(pool: Any, n: int, skip: int = 0) -> torch.Tensor:
    """Host slots of ``n`` pages, allocated the way SGLang does (after ``skip`` pages)."""
    if skip:
        pool.alloc(skip * pool.page_size)
    return pool.alloc(n * pool.page_size)


def _assert_pages_equal(src: Any, src_idx: torch.Tensor, dst: Any, dst_idx: torch.Tensor, n: int) -> None:
    P = src.page_size
    for i in range(n):
        assert torch.equal(page_kv(src, int(src_idx[i * P])), page_kv(dst, int(dst_idx[i * P]))), f"page {i} differs"


def test_factory_builds_the_backend(extra: dict, make_backend: Any) -> None:
    backend = make_backend(extra, mha_pool())
    assert isinstance(backend, StreamKVStorage)  # not wrapped: no failure injection configured
    assert backend.engine is not None and backend.engine.layout.chunk_size == 4


@pytest.mark.parametrize("zero_copy", [True, False], ids=["interface_v1", "generic"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_round_trip(kind: str, layout: str, page_size: int, zero_copy: bool, extra: dict, make_backend: Any) -> None:
    extra["interface_v1"] = int(zero_copy)
    n = 5
    src = POOLS[kind](layout, page_size=page_size)
    fill_random(src, seed=page_size)
    writer = make_backend(extra, src, mla=kind == "mla")
    src_idx = _pages(src, n, skip=1)
    keys = page_hashes(n, f"{kind}-{layout}-{page_size}")

    assert writer.batch_exists(keys) == 0
    assert backup(writer, src, keys, src_idx, zero_copy)
    assert writer.batch_exists(keys) == n
    assert all(writer.exists(k) for k in keys)

    # Another "process": a fresh pool and backend over the same disk directory.
    writer.flush()
    dst = POOLS[kind](layout, page_size=page_size)
    reader = make_backend(extra, dst, mla=kind == "mla")
    dst_idx = _pages(dst, n, skip=2)
    assert reader.batch_exists(keys) == n
    assert prefetch(reader, dst, keys, dst_idx, zero_copy) == n
    _assert_pages_equal(src, src_idx, dst, dst_idx, n)


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("write_layout,read_layout",
                         [("page_first", "layer_first"), ("layer_first", "page_first_direct")])
def test_pages_are_shared_across_host_layouts(kind: str, write_layout: str, read_layout: str, extra: dict,
                                              make_backend: Any) -> None:
    """Pages are stored layer-major, independent of --hicache-mem-layout, so replicas with
    different host layouts share them."""
    src = POOLS[kind](write_layout, page_size=4)
    fill_random(src, seed=3)
    writer = make_backend(extra, src, mla=kind == "mla")
    src_idx = _pages(src, 3)
    keys = page_hashes(3, "cross")
    assert writer.batch_set_v1(keys, src_idx) == [True] * 3
    writer.flush()
    dst = POOLS[kind](read_layout, page_size=4)
    reader = make_backend(extra, dst, mla=kind == "mla")
    dst_idx = _pages(dst, 3, skip=1)
    assert reader.batch_get_v1(keys, dst_idx) == [True] * 3
    _assert_pages_equal(src, src_idx, dst, dst_idx, 3)


def test_batch_exists_counts_the_contiguous_prefix(extra: dict, make_backend: Any) -> None:
    pool = mha_pool(page_size=4)
    fill_random(pool)
    backend = make_backend(extra, pool)
    keys = page_hashes(6, "prefix")
    idx = _pages(pool, 6)
    P = pool.page_size
    stored = [0, 1, 2, 4]  # a gap at 3
    for i in stored:
        assert backend.batch_set_v1([keys[i]], idx[i * P : (i + 1) * P]) == [True]
    assert backend.batch_exists(keys) == 3
    assert backend.batch_exists(keys[4:5]) == 1
    assert backend.batch_exists(keys[3:]) == 0
    assert backend.batch_exists([]) == 0
    assert [backend.exists(k) for k in keys] == [True, True, True, False, True, False]


def test_batch_get_stops_at_the_first_miss(extra: dict, make_backend: Any) -> None:
    """A page after a missing one is not reported, and not written into the host pool."""
    pool = mha_pool(page_size=4)
    fill_random(pool, seed=1)
    backend = make_backend(extra, pool)
    keys = page_hashes(4, "gap")
    idx = _pages(pool, 4)
    P = pool.page_size
    backend.batch_set_v1([keys[0], keys[2], keys[3]], torch.cat([idx[0:P], idx[2 * P : 4 * P]]))
    into = _pages(pool, 4)
    for i in range(4):  # SGLang's host slots for a prefetch hold no KV yet
        pool.set_from_flat_data_page(int(into[i * P]), torch.zeros_like(pool.get_dummy_flat_data_page()))
    assert backend.batch_get_v1(keys, into) == [True, False, False, False]
    _assert_pages_equal(pool, idx, pool, into, 1)
    assert not page_kv(pool, int(into[2 * P])).any(), "page after the miss was written"
    flat = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert [t is not None for t in flat] == [True, False, False, False]


def test_single_page_get_and_set(extra: dict, make_backend: Any) -> None:
    src = mla_pool(page_size=8)
    fill_random(src, seed=9)
    backend = make_backend(extra, src, mla=True)
    idx = _pages(src, 1)
    key = page_hashes(1, "one")[0]
    assert backend.get(key, src.get_dummy_flat_data_page()) is None
    assert backend.set(key, src.get_data_page(int(idx[0])))
    got = backend.get(key, src.get_dummy_flat_data_page())
    assert got is not None
    assert torch.equal(got.view(torch.uint8), src.get_data_page(int(idx[0])).view(torch.uint8))


def test_same_backend_serves_its_own_writes_from_memory(tmp_path: Any, make_backend: Any) -> None:
    """With the default tiers (memory, then disk) a page is readable at once, before the disk write."""
    from .conftest import LOAD_KEYS

    extra = {**LOAD_KEYS, "interface_v1": 1, "disk_dir": str(tmp_path), "disk_gb": 1, "memory_gb": 0.05}
    src = mha_pool(page_size=4)
    fill_random(src, seed=4)
    backend = make_backend(extra, src)
    idx = _pages(src, 4)
    keys = page_hashes(4, "mem")
    assert backend.batch_set_v1(keys, idx) == [True] * 4
    into = _pages(src, 4)  # other slots of the same host pool, as a later prefetch would use
    assert backend.batch_get_v1(keys, into) == [True] * 4
    _assert_pages_equal(src, idx, src, into, 4)
    stats = backend.stats()
    assert stats["sglang"]["pages_written"] == 4 and stats["sglang"]["pages_read"] == 4


def test_rewriting_a_stored_page_is_skipped(extra: dict, make_backend: Any) -> None:
    pool = mha_pool(page_size=4)
    fill_random(pool)
    backend = make_backend(extra, pool)
    idx = _pages(pool, 2)
    keys = page_hashes(2, "again")
    assert backend.batch_set_v1(keys, idx) == [True, True]
    assert backend.batch_set_v1(keys, idx) == [True, True]
    counts = backend.stats()["sglang"]
    assert counts["pages_written"] == 2 and counts["pages_already_stored"] == 2


def test_storage_metrics_reach_sglang(extra: dict, make_backend: Any) -> None:
    """get_stats returns SGLang's StorageMetrics with the page counts of each batch, then resets."""
    pool = mha_pool(page_size=4)
    fill_random(pool)
    backend = make_backend(extra, pool)
    idx = _pages(pool, 3)
    keys = page_hashes(3, "metrics")
    assert backend.batch_set_v1(keys, idx) == [True] * 3
    assert backend.batch_get_v1(keys, _pages(pool, 3)) == [True] * 3
    metrics = backend.get_stats()
    assert metrics.backup_pgs == [3] and metrics.prefetch_pgs == [3]
    assert backend.get_stats().backup_pgs == []


def test_clear_removes_this_namespace_only(extra: dict, make_backend: Any) -> None:
    a_pool, b_pool = mha_pool(page_size=4), mha_pool(page_size=4)
    fill_random(a_pool)
    a = make_backend(extra, a_pool, model="org/a")
    b = make_backend(extra, b_pool, model="org/b")
    keys = page_hashes(2, "clear")
    a.batch_set_v1(keys, _pages(a_pool, 2))
    b.batch_set_v1(keys, _pages(b_pool, 2))
    assert a.clear() is True
    assert a.batch_exists(keys) == 0
    assert b.batch_exists(keys) == 2


def test_multi_pool_v2_calls_for_the_kv_pool(extra: dict, make_backend: Any) -> None:
    """The v2 interface works for the KV pool; a request that needs another pool gets no hit."""
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    pool = mha_pool(page_size=4)
    fill_random(pool, seed=12)
    backend = make_backend(extra, pool)
    keys = page_hashes(3, "v2")
    idx = _pages(pool, 3)
    assert backend.batch_set_v2([PoolTransfer(name=PoolName.KV, host_indices=idx, keys=keys)]) == {
        PoolName.KV: [True] * 3
    }
    result = backend.batch_exists_v2(keys)
    assert result.kv_hit_pages == 3 and result.restorable_prefix_pages == [1, 2, 3]
    into = _pages(pool, 3)
    got = backend.batch_get_v2([PoolTransfer(name=PoolName.KV, host_indices=into, keys=keys)])
    assert got == {PoolName.KV: [True] * 3}
    _assert_pages_equal(pool, idx, pool, into, 3)

    mamba = PoolTransfer(name=PoolName.MAMBA, keys=keys[-1:], host_indices=into[:4])
    assert backend.batch_exists_v2(keys, [mamba]).kv_hit_pages == 0
    assert backend.batch_get_v2([mamba]) == {PoolName.MAMBA: [False]}


@pytest.mark.parametrize("tiers", ["disk", "memory,disk"])
def test_pages_are_copied_out_before_batch_set_returns(tiers: str, extra: dict, make_backend: Any) -> None:
    """batch_set_v1 reads the pool's pages in place: it returns only once every page is in its
    object, so SGLang may overwrite the slots at once. Successive batches go through the engine's
    reused object buffers (one disk tier), or fresh ones where a background write_through to a
    lower tier still holds them (memory,disk): a fresh reader of the disk sees every page intact."""
    extra["tiers"] = tiers
    extra["memory_gb"] = 0.01
    pool = mha_pool(page_size=4, tokens=256)
    fill_random(pool, seed=13)
    backend = make_backend(extra, pool)
    batches = [(page_hashes(5, f"copied-{b}"), _pages(pool, 5)) for b in range(4)]
    expected = []
    for keys, idx in batches:
        expected.append([page_kv(pool, int(idx[i * 4])).clone() for i in range(5)])
        assert backend.batch_set_v1(keys, idx) == [True] * 5
        pool.kv_buffer[:, idx] = 0  # SGLang reuses the slots as soon as the call returns
    backend.flush()

    reader = make_backend({**extra, "tiers": "disk"}, pool)  # another process: the disk only
    for (keys, _), pages in zip(batches, expected):
        into = _pages(pool, 5)
        assert reader.batch_get_v1(keys, into) == [True] * 5
        for i in range(5):
            assert torch.equal(page_kv(pool, int(into[i * 4])), pages[i]), f"page {i} differs"
