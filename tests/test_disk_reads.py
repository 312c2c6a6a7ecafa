"""Whole-object reads of the disk tier (disk_read.read_whole): large objects the page cache does
not hold are read around it with O_DIRECT, the rest through it (or mapped); exact bytes either
way, and a filesystem that refuses O_DIRECT is asked once."""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import pytest

from streamkv.store import DiskStore, disk, disk_read
from streamkv.store.direct_io import O_DIRECT, cached_pages
from tests.store_conformance import key, run

SIZE = 3 * 65536 + 4097  # unaligned: the O_DIRECT read is widened, the view cut back


def _cached(path: Path) -> tuple[int, int] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cached_pages(fd)
    finally:
        os.close(fd)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Objects of 64 KiB and more count as large; returns the sizes read with O_DIRECT."""
    monkeypatch.setattr(disk_read, "DIRECT_WHOLE_BYTES", 1 << 16)
    seen: list[int] = []
    real = disk_read.read_whole_direct

    def spy(fd: int, size: int, take):  # type: ignore[no-untyped-def]
        seen.append(size)
        return real(fd, size, take)

    monkeypatch.setattr(disk_read, "read_whole_direct", spy)
    return seen


@pytest.fixture
def cold_store(tmp_path: Path) -> DiskStore:
    store = DiskStore(tmp_path, 8 << 20)
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    if not O_DIRECT or _cached(probe) is None:
        pytest.skip("no O_DIRECT, or a kernel without cachestat (Linux < 6.5): reads stay buffered")
    probe.unlink()
    return store


def test_cached_pages_sees_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(16 * mmap.PAGESIZE))
    seen = _cached(path)
    if seen is None:
        pytest.skip("a kernel without cachestat (Linux < 6.5)")
    assert seen == (16, 16)  # just written: every page cached, every page dirty
    _drop(path)
    assert _cached(path) == (0, 0)
    with open(path, "rb") as f:
        f.read(4 * mmap.PAGESIZE)
    cached, dirty = _cached(path)  # type: ignore[misc]
    assert 4 <= cached <= 16 and dirty == 0  # read-ahead may bring more


def test_cold_large_objects_are_read_around_the_page_cache(cold_store: DiskStore, small_threshold: list[int],
                                                           tmp_path: Path) -> None:
    async def go() -> None:
        data = os.urandom(SIZE)
        assert await cold_store.put(key(1), data)
        path = cold_store._path(key(1))
        _drop(path)
        assert bytes(await cold_store.get(key(1))) == data
        reader = cold_store.reader_now(key(1))
        assert reader is not None and bytes(reader()) == data
        if not cold_store.cold_direct_reads:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert small_threshold == [SIZE, SIZE]
        assert _cached(path) == (0, 0)  # neither read left a copy in the page cache
    run(go)


def test_warm_objects_are_read_from_the_page_cache(cold_store: DiskStore, small_threshold: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        data = os.urandom(SIZE)
        assert await cold_store.put(key(1), data)
        path = cold_store._path(key(1))
        path.read_bytes()  # now in the page cache
        assert bytes(await cold_store.get(key(1))) == data
        monkeypatch.setattr(disk, "MAPPED_WHOLE_BYTES", 0)  # large objects are mapped where warm
        reader = cold_store.reader_now(key(1))
        assert reader is not None
        got = reader()
        assert isinstance(got, memoryview) and isinstance(got.obj, mmap.mmap) and bytes(got) == data
        assert small_threshold == []
    run(go)


def test_partly_cached_and_dirty_objects_read_exactly(cold_store: DiskStore, small_threshold: list[int]) -> None:
    async def go() -> None:
        data = os.urandom(SIZE)
        assert await cold_store.put(key(1), data)
        path = cold_store._path(key(1))
        _drop(path)
        with open(path, "rb") as f:  # a third of it cached: still cold enough for O_DIRECT
            f.read(SIZE // 3)
        assert bytes(await cold_store.get(key(1))) == data
        dirty = DiskStore(cold_store.root / "buffered", 8 << 20, direct_writes=False)
        assert await dirty.put(key(2), data)  # buffered, not yet written back
        _, pending = _cached(dirty._path(key(2)))  # type: ignore[misc]
        assert bytes(await dirty.get(key(2))) == data
        if pending:  # dirty pages go through the page cache, never around it
            assert small_threshold.count(SIZE) <= 1
    run(go)


def test_a_fresh_direct_write_reads_around_the_page_cache_exactly(cold_store: DiskStore,
                                                                  small_threshold: list[int]) -> None:
    """The disk tier writes an object's last partial block through the page cache: right after
    the write that one page may still be dirty. The object still counts as cold (read with
    O_DIRECT, which has the kernel write that page back first), and reads back exactly."""
    async def go() -> None:
        data = os.urandom(SIZE)
        assert await cold_store.put(key(1), data)
        if not cold_store.direct_writes:
            pytest.skip("this filesystem refuses O_DIRECT")
        cached, dirty = _cached(cold_store._path(key(1)))  # type: ignore[misc]
        assert dirty <= 1 and cached <= 1  # at most the last page, maybe already written back
        assert bytes(await cold_store.get(key(1))) == data
        assert small_threshold == [SIZE]
    run(go)


def test_a_filesystem_refusing_o_direct_is_asked_once(cold_store: DiskStore, small_threshold: list[int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.fcntl
    refused: list[int] = []

    def no_direct(fd, cmd, arg=0):  # type: ignore[no-untyped-def]
        if cmd == fcntl.F_SETFL and arg & O_DIRECT:
            refused.append(fd)
            raise OSError(22, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)

    async def go() -> None:
        data = [os.urandom(SIZE + i) for i in range(3)]
        for i, d in enumerate(data):
            assert await cold_store.put(key(i), d)
            _drop(cold_store._path(key(i)))
        for i, d in enumerate(data):
            assert bytes(await cold_store.get(key(i))) == d
        assert cold_store.cold_direct_reads is False and len(refused) == 1
        assert cold_store.counters.misses == 0
    run(go)


def test_a_vanished_file_is_a_miss(cold_store: DiskStore, small_threshold: list[int]) -> None:
    async def go() -> None:
        for i in range(2):
            assert await cold_store.put(key(i), os.urandom(SIZE))
        os.unlink(cold_store._path(key(0)))
        assert await cold_store.get(key(0)) is None
        reader = cold_store.reader_now(key(1))
        assert reader is not None
        os.unlink(cold_store._path(key(1)))
        assert reader() is None
    run(go)


@pytest.mark.parametrize("huge", [False, True])
def test_a_pooled_buffer_is_lent_once_until_dropped(huge: bool) -> None:
    """Two reads in flight never share a buffer (a shared one let a corrupt object pass as the
    one read before it); a dropped buffer is lent again, page-aligned."""
    import gc

    from streamkv.store.direct_io import AlignedBuffers

    pool = AlignedBuffers()
    a = pool.take(70_001, huge=huge)
    b = pool.take(70_001, huge=huge)
    assert a.ctypes.data != b.ctypes.data and a.nbytes == b.nbytes == 70_001
    view = memoryview(a)[10:20]  # a view keeps it lent
    first = a.ctypes.data
    del a
    gc.collect()
    c = pool.take(70_001, huge=huge)
    third = c.ctypes.data
    assert third not in (first, b.ctypes.data)
    assert pool.created == 3
    del view, c
    gc.collect()
    again = [pool.take(70_001, huge=huge) for _ in range(2)]  # both back in the pool, lent again
    assert sorted(x.ctypes.data for x in again) == sorted([first, third]) and pool.created == 3
    assert all(x.ctypes.data % 4096 == 0 for x in again + [b])


def test_cold_now_says_whether_a_read_would_wait_for_the_device(cold_store: DiskStore, tmp_path: Path) -> None:
    from streamkv.store import MemoryStore, TieredStore

    async def go() -> None:
        data = os.urandom(SIZE)
        assert await cold_store.put(key(1), data)
        path = cold_store._path(key(1))
        _drop(path)
        assert cold_store.cold_now(key(1))
        path.read_bytes()  # now in the page cache
        assert not cold_store.cold_now(key(1))
        assert not cold_store.cold_now(key(2))  # not there: nothing to wait for
        _drop(path)
        mem = MemoryStore(1 << 24)
        tiered = TieredStore([mem, cold_store])
        assert tiered.cold_now(key(1))  # only the disk tier holds it, cold
        assert await mem.put(key(1), data)
        assert not tiered.cold_now(key(1)) and not mem.cold_now(key(1))  # memory answers first
    run(go)


@pytest.mark.parametrize("chunk_size, cold, lanes", [(64, True, 4), (64, False, 2), (8, True, 2)],
                         ids=["large-cold", "large-warm", "small-cold"])
def test_cold_large_objects_are_read_on_more_lanes_than_cpus(cold_store: DiskStore, monkeypatch: pytest.MonkeyPatch,
                                                           chunk_size: int, cold: bool, lanes: int) -> None:
    """On 2 CPUs, with the default 4 codec lanes: large objects (``COLD_LANES_BYTES``) that
    would come from the device get 4 reading lanes, warm or small ones 2 (one per CPU)."""
    from streamkv import chunk_objects
    from streamkv.chunk_objects import ChunkObjects
    from streamkv.keys import Namespace
    from streamkv.layout import KVLayout
    from streamkv.store.limits import Limits

    monkeypatch.setattr(chunk_objects, "_usable_cpus", lambda: 2)
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16", chunk_size=chunk_size)
    assert (layout.chunk_bytes >= chunk_objects.COLD_LANES_BYTES) == (chunk_size == 64)
    objects = ChunkObjects(cold_store, layout, Namespace("m", layout), Limits(codec=4), "off", {})

    async def go() -> None:
        assert await cold_store.put(key(1), os.urandom(SIZE))
        path = cold_store._path(key(1))
        _drop(path)
        if not cold:
            path.read_bytes()
        assert objects._read_lanes(key(1), 100) == lanes
        assert objects._read_lanes(key(1), 1) == 1  # never more lanes than objects
        assert objects._read_lanes(None, 0) == 0
    run(go)
