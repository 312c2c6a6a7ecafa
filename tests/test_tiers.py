"""Memory, disk and tiered stores: the conformance suite plus tier-specific behaviour."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

from streamkv.errors import ConfigError
from streamkv.store import DiskStore, MemoryStore, TieredStore
from tests.store_conformance import StoreConformance, key, run


class TestMemoryConformance(StoreConformance):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore(1 << 20)


class TestDiskConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> DiskStore:
        return DiskStore(tmp_path / "disk", 1 << 20)


class TestTieredConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> TieredStore:
        return TieredStore([MemoryStore(1 << 20), DiskStore(tmp_path / "disk", 1 << 20)])


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_capacity_never_exceeded_under_random_load(kind: str, tmp_path: Path) -> None:
    cap = 50_000
    store = MemoryStore(cap) if kind == "memory" else DiskStore(tmp_path, cap)
    rng = random.Random(7)

    async def go() -> None:
        for step in range(400):
            k = key(rng.randrange(60))
            if rng.random() < 0.6:
                await store.put(k, os.urandom(rng.randrange(1, 9000)))
            else:
                await store.get(k)
            assert store.used_bytes <= cap
            if kind == "disk":
                on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
                assert on_disk == store.used_bytes
    run(go)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_lru_order(kind: str, tmp_path: Path) -> None:
    store = MemoryStore(3000) if kind == "memory" else DiskStore(tmp_path, 3000)

    async def go() -> None:
        for i in range(3):
            await store.put(key(i), bytes(1000))
        await store.get(key(0))  # 0 is now the most recent; 1 is the oldest
        await store.put(key(3), bytes(1000))
        assert [await store.exists(key(i)) for i in range(4)] == [True, False, True, True]
    run(go)


def test_pinned_survives_eviction() -> None:
    store = MemoryStore(3000)

    async def go() -> None:
        for i in range(3):
            await store.put(key(i), bytes(1000))
        assert store.pin(key(0))
        for i in range(3, 10):
            assert await store.put(key(i), bytes(1000))
        assert await store.exists(key(0))
        assert store.unpin(key(0))
        for i in range(10, 13):
            await store.put(key(i), bytes(1000))
        assert not await store.exists(key(0))
    run(go)


def test_put_refused_when_only_pinned_objects_remain() -> None:
    store = MemoryStore(2000)

    async def go() -> None:
        await store.put(key(0), bytes(1000))
        await store.put(key(1), bytes(1000))
        store.pin(key(0))
        store.pin(key(1))
        assert not await store.put(key(2), bytes(1000))
        assert store.used_bytes == 2000
        assert not await store.put(key(3), bytes(5000))  # larger than the whole tier
    run(go)


def test_disk_index_rebuilt_after_reopen(tmp_path: Path) -> None:
    data = {key(i): os.urandom(500 + i) for i in range(5)}

    async def write() -> None:
        store = DiskStore(tmp_path, 1 << 20)
        for k, v in data.items():
            await store.put(k, v)

    async def read() -> None:
        store = DiskStore(tmp_path, 1 << 20)
        assert sorted(await store.list_keys()) == sorted(data)
        assert store.used_bytes == sum(len(v) for v in data.values())
        for k, v in data.items():
            assert bytes(await store.get(k)) == v
    run(write)
    run(read)


def test_torn_temp_file_ignored_and_cleaned(tmp_path: Path) -> None:
    ns_dir = tmp_path / key(0).split("/")[0]
    ns_dir.mkdir(parents=True)
    torn = ns_dir / f".tmp.{key(5).split('/')[1]}.deadbeef"
    torn.write_bytes(b"half an object")
    store = DiskStore(tmp_path, 1 << 20)
    assert not torn.exists()
    assert store.used_bytes == 0
    assert run(store.list_keys) == []


def test_tiered_promotes_on_hit_and_writes_through(tmp_path: Path) -> None:
    async def go() -> None:
        mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
        async with anyio.create_task_group() as tg:
            tiered = TieredStore([mem, disk], background=tg)
            await tiered.put(key(1), b"abc" * 100)
            await tiered.flush()
            assert await mem.exists(key(1)) and await disk.exists(key(1))
            await mem.delete(key(1))
            assert bytes(await tiered.get(key(1))) == b"abc" * 100
            await tiered.flush()
            assert await mem.exists(key(1))
            assert await tiered.where([key(1), key(2)]) == [["memory", "disk"], []]
    run(go)


def test_tiered_write_back_demotes_on_eviction(tmp_path: Path) -> None:
    async def go() -> None:
        mem, disk = MemoryStore(2000), DiskStore(tmp_path, 1 << 20)
        async with anyio.create_task_group() as tg:
            tiered = TieredStore([mem, disk], write_policy="write_back", background=tg)
            for i in range(3):
                await tiered.put(key(i), bytes([i]) * 1000)
            await tiered.flush()
            assert not await disk.exists(key(2))
            assert await disk.exists(key(0)) and not await mem.exists(key(0))
            assert bytes(await tiered.get(key(0))) == bytes([0]) * 1000
    run(go)


@pytest.mark.parametrize("cap", [0, -5, 1.5])
def test_bad_capacity_rejected_at_construction(cap: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        MemoryStore(cap)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capacity"):
        DiskStore(tmp_path, cap)  # type: ignore[arg-type]


def test_unwritable_disk_dir_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(ConfigError, match="disk_dir"):
        DiskStore(blocker / "sub", 1 << 20)


def test_write_back_demotes_down_every_tier(tmp_path: Path) -> None:
    """memory → disk → a third tier: each eviction hands the object one tier down, nothing is lost."""
    async def go() -> None:
        mem, disk, bottom = MemoryStore(2000), DiskStore(tmp_path, 2000), MemoryStore(1 << 20)
        async with anyio.create_task_group() as tg:
            tiered = TieredStore([mem, disk, bottom], write_policy="write_back", background=tg)
            for i in range(6):
                await tiered.put(key(i), bytes([i]) * 1000)
                await tiered.flush()
            for i in range(6):
                assert bytes(await tiered.get(key(i))) == bytes([i]) * 1000
            assert await bottom.exists(key(0)) and await bottom.exists(key(1))
            assert mem.used_bytes <= 2000 and disk.used_bytes <= 2000
    run(go)


def test_disk_sees_objects_another_process_wrote(tmp_path: Path) -> None:
    """Two DiskStores on one directory (two engine processes): each sees the other's new objects."""
    async def go() -> None:
        a, b = DiskStore(tmp_path, 1 << 20), DiskStore(tmp_path, 1 << 20)
        await a.put(key(1), b"shared" * 100)
        assert await b.exists_many([key(1), key(2)]) == [True, False]
        assert bytes(await b.get(key(1))) == b"shared" * 100
        assert [bytes(p) for p in await b.get_ranges(key(1), [(0, 6)])] == [b"shared"]
    run(go)
