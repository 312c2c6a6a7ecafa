"""Memory, disk and tiered stores: the conformance suite plus tier-specific behaviour."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from streamkv.errors import ConfigError
from streamkv.store import DiskStore, MemoryStore, TieredStore
from streamkv.store.direct_io import aligned_empty
from tests.store_conformance import StoreConformance, key, run


class TestMemoryConformance(StoreConformance):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore(1 << 20)


class TestDiskConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> DiskStore:
        return DiskStore(tmp_path / "disk", 1 << 20)


class TestDiskDirectReadsConformance(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> DiskStore:
        return DiskStore(tmp_path / "disk", 1 << 20, direct_reads=True)


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
            # victims still being handed down are on disk (and counted) until then
            assert mem.used_bytes <= 2000 and disk.used_bytes - disk.leaving_bytes <= 2000
            await tiered.flush()
            assert disk.used_bytes <= 2000 and disk.leaving_bytes == 0
    run(go)


def test_an_object_being_handed_down_stays_readable(tmp_path: Path) -> None:
    """write_back: while the disk tier reads a victim to hand it to the tier below (on a worker
    thread), a read of that object must still find it: in the disk tier until the tiered store
    holds its copy in flight, then there, then below. (It used to leave the index first: a get
    in between found it in no tier.)"""
    import threading

    gate = threading.Event()
    reads: list[Path] = []

    class SlowHandDown(DiskStore):
        def _read_whole(self, path, *args):  # type: ignore[no-untyped-def]
            reads.append(path)
            if len(reads) == 1:  # the eviction's read: held until the test has read the object
                gate.wait(10)
            return super()._read_whole(path, *args)

    async def go() -> None:
        disk, bottom = SlowHandDown(tmp_path, 2000), MemoryStore(1 << 20)
        async with anyio.create_task_group() as tg:
            tiered = TieredStore([disk, bottom], write_policy="write_back", background=tg)
            await tiered.put(key(0), b"a" * 1000)
            await tiered.put(key(1), b"b" * 1000)
            async with anyio.create_task_group() as puts:
                puts.start_soon(tiered.put, key(2), b"c" * 1000)  # evicts key(0)
                with anyio.fail_after(10):
                    while not reads:
                        await anyio.sleep(0.001)
                try:
                    got = await tiered.get(key(0))
                    assert got is not None and bytes(got) == b"a" * 1000
                    assert await tiered.exists(key(0))
                finally:
                    gate.set()
            await tiered.flush()
            assert bytes(await bottom.get(key(0))) == b"a" * 1000
            assert not await disk.exists(key(0)) and disk.used_bytes == 2000
            assert sorted(os.listdir(tmp_path / key(0).split("/")[0])) == sorted(k.split("/")[1] for k in (key(1), key(2)))
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


class RecordingDisk(DiskStore):
    """A real disk tier that also remembers the read-ahead hints it was given."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hints: list[tuple[str, tuple[int, int]]] = []

    async def prefetch(self, requests) -> None:  # type: ignore[no-untyped-def]
        self.hints.extend(requests)
        await super().prefetch(requests)


def test_tiered_prefetch_goes_to_the_tier_holding_each_object_in_order(tmp_path: Path) -> None:
    async def go() -> None:
        mem, disk = MemoryStore(1 << 20), RecordingDisk(tmp_path, 1 << 20)
        tiered = TieredStore([mem, disk])
        await mem.put(key(1), b"m" * 8192)
        for i in (2, 3):
            await disk.put(key(i), b"d" * 8192)
        await disk.put(key(1), b"m" * 8192)  # also on disk, but memory answers first
        hints = [(key(3), (4096, 100)), (key(1), (0, 10)), (key(2), (0, 4096)), (key(9), (0, 1)), (key(3), (0, 1))]
        await tiered.prefetch(hints)
        assert disk.hints == [(key(3), (4096, 100)), (key(2), (0, 4096)), (key(3), (0, 1))]
        assert tiered.prefetches() and disk.prefetches() and not mem.prefetches()
    run(go)


def test_disk_prefetch_of_a_vanished_file_is_harmless(tmp_path: Path) -> None:
    async def go() -> None:
        disk = DiskStore(tmp_path, 1 << 20)
        await disk.put(key(1), b"x" * 10000)
        await disk.put(key(2), b"y" * 10000)
        os.unlink(disk._path(key(1)))  # gone behind the index's back
        await disk.prefetch([(key(1), (0, 10000)), (key(2), (0, 10000)), (key(7), (0, 5))])
        assert bytes((await disk.get_ranges(key(2), [(9990, 10)]))[0]) == b"y" * 10
    run(go)


# -- the disk tier's write path: O_DIRECT from an aligned buffer, buffered where refused --------

from streamkv.store import disk as disk_mod  # noqa: E402
from streamkv.store import disk_write  # noqa: E402

ALIGN_SIZES = [1, 4095, 4096, 4097, (1 << 20) + 3, disk_write.DIRECT_PIECE + 4097]


def _no_temps(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"{disk_write.TMP_PREFIX}*")]


def _spy_open(monkeypatch: pytest.MonkeyPatch, refuse_direct: bool = False) -> list[int]:
    """Record the flags of every os.open the disk tier makes; optionally refuse O_DIRECT as
    tmpfs did before Linux 6.6 (EINVAL at open, after creating the file)."""
    real, flags_seen = os.open, []

    def fake(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        flags_seen.append(flags)
        if refuse_direct and flags & disk_write.O_DIRECT:
            os.close(real(path, flags & ~disk_write.O_DIRECT, *args, **kwargs))
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(disk_write.os, "open", fake)
    return flags_seen


def _takes_direct_writes(d: Path) -> bool:
    """Whether the filesystem under ``d`` takes an aligned O_DIRECT write (asked with plain
    system calls, so that a bug in the disk tier's direct path is not taken for a refusal)."""
    d.mkdir(parents=True, exist_ok=True)
    probe = d / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | disk_write.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.pwrite(fd, memoryview(aligned_empty(4096)), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.skipif(not disk_write.O_DIRECT, reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("source", ["bytes", "huge pages"])
@pytest.mark.parametrize("size", [0] + ALIGN_SIZES)
def test_disk_direct_write_round_trips_around_the_alignment(size: int, source: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """From any buffer, and straight from one in huge pages (the engine's object buffers): the
    whole blocks by O_DIRECT, the last partial block buffered, exact bytes and size."""
    if not _takes_direct_writes(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    data = os.urandom(size)
    buf: Any = data
    if source == "huge pages":
        buf = aligned_empty(size)
        buf[:] = np.frombuffer(data, dtype=np.uint8)
    path = tmp_path / "ns" / "obj"
    seen = _spy_open(monkeypatch)
    assert disk_write.write_atomic(path, memoryview(buf), False, direct=True) is True
    assert any(f & disk_write.O_DIRECT for f in seen)  # it really took the direct path
    assert os.stat(path).st_size == size
    assert path.read_bytes() == data
    assert _no_temps(tmp_path) == []


@pytest.mark.parametrize("size", ALIGN_SIZES)
def test_disk_store_puts_read_back_exactly_by_get_and_mapped_ranges(size: int, tmp_path: Path) -> None:
    async def go() -> None:
        store = DiskStore(tmp_path, 64 << 20)
        data = os.urandom(size)
        assert await store.put(key(1), data)
        assert store.used_bytes == size
        assert bytes(await store.get(key(1))) == data
        tail = (max(0, size - 5000), min(size, 5000))
        assert [bytes(p) for p in await store.get_ranges(key(1), [(0, 1), tail])] == [
            data[:1], data[tail[0]:tail[0] + tail[1]]]
        assert os.stat(store._path(key(1))).st_size == size
        assert _no_temps(tmp_path) == []
    run(go)


@pytest.mark.parametrize("size", [0, 1, 4097, (1 << 20) + 3])
def test_disk_buffered_write_round_trips(size: int, tmp_path: Path) -> None:
    roots = [tmp_path] + ([Path("/dev/shm")] if Path("/dev/shm").is_dir() else [])
    for root in roots:
        d = Path(root) / f"streamkv-test-{os.getpid()}-{size}"
        try:
            data = os.urandom(size)
            assert disk_write.write_atomic(d / "obj", memoryview(data), True, direct=False) is False
            assert (d / "obj").read_bytes() == data
            # and direct on tmpfs: written either way (O_DIRECT where the kernel takes it, else buffered)
            disk_write.write_atomic(d / "obj2", memoryview(data), False, direct=True)
            assert (d / "obj2").read_bytes() == data
            assert _no_temps(d) == []
        finally:
            for p in d.glob("*"):
                p.unlink()
            if d.exists():
                d.rmdir()


def test_disk_falls_back_to_buffered_when_open_refuses_direct(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        seen = _spy_open(monkeypatch, refuse_direct=True)
        store = DiskStore(tmp_path, 1 << 20)
        data = [os.urandom(disk_write.DIRECT_MIN_BYTES + i) for i in range(3)]
        assert await store.put(key(0), data[0])
        assert store.direct_writes is False and store.stats()["direct_writes"] is False
        tried = sum(1 for f in seen if f & disk_write.O_DIRECT)
        assert tried >= (1 if disk_write.O_DIRECT else 0)
        for i, d in enumerate(data[1:], 1):
            assert await store.put(key(i), d)
        assert sum(1 for f in seen if f & disk_write.O_DIRECT) == tried  # refused once, not tried again
        for i, d in enumerate(data):
            assert bytes(await store.get(key(i))) == d
        assert store.counters.errors == 0
        assert _no_temps(tmp_path) == []  # the file the refused open created is gone
    run(go)


@pytest.mark.skipif(not disk_write.O_DIRECT, reason="no O_DIRECT on this platform")
def test_disk_falls_back_when_a_direct_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args):  # type: ignore[no-untyped-def]
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(disk_write.os, "pwrite", refuse)
    data = os.urandom(70_000)
    assert disk_write.write_atomic(tmp_path / "ns" / "obj", memoryview(data), False) is False
    assert (tmp_path / "ns" / "obj").read_bytes() == data
    assert _no_temps(tmp_path) == []


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("failing", ["pwrite", "write", "fcntl", "replace"])
def test_disk_failed_write_leaves_no_temp_file_and_the_old_object(direct: bool, failing: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        store = DiskStore(tmp_path, 1 << 20, direct_writes=direct)
        old = os.urandom(disk_write.DIRECT_MIN_BYTES + 5000)
        assert await store.put(key(1), old)

        def full(*args):  # type: ignore[no-untyped-def]
            raise OSError(28, "No space left on device")

        where = disk_write.fcntl if failing == "fcntl" else disk_write.os
        real = getattr(where, failing)
        monkeypatch.setattr(where, failing, full)
        stored = await store.put(key(1), os.urandom(disk_write.DIRECT_MIN_BYTES + 9001))  # unaligned
        monkeypatch.setattr(where, failing, real)
        used = {"pwrite": direct, "write": not direct, "fcntl": direct, "replace": True}[failing]
        if used:
            assert not stored and store.counters.errors == 1
        assert _no_temps(tmp_path) == []
        if not stored:
            assert bytes(await store.get(key(1))) == old  # the old object, whole
            assert store.used_bytes == len(old)
    run(go)


def test_disk_concurrent_puts_of_mixed_sizes_do_not_share_buffers(tmp_path: Path) -> None:
    async def go() -> None:
        from streamkv.store.limits import Limits

        store = DiskStore(tmp_path, 256 << 20, limits=Limits(disk_io=8))
        rng = random.Random(3)
        data = {key(i): os.urandom(rng.choice([1, 4096, 70_001, 1 << 20, disk_write.DIRECT_PIECE + 1]))
                for i in range(24)}
        async with anyio.create_task_group() as tg:
            for k, v in data.items():
                tg.start_soon(store.put, k, v)
        for k, v in data.items():
            assert bytes(await store.get(k)) == v
        assert _no_temps(tmp_path) == []
    run(go)


def test_direct_reads_exact_bytes_and_reused_buffers(tmp_path: Path) -> None:
    import gc

    async def go() -> None:
        disk = DiskStore(tmp_path, 1 << 22, direct_reads=True)
        blob = os.urandom(3 * 4096 + 123)
        await disk.put(key(1), blob)
        ranges = [(0, 10), (4090, 10), (5000, 7000), (len(blob) - 5, 5), (len(blob), 0)]
        for _ in range(3):
            parts = await disk.get_ranges(key(1), ranges)
            assert parts is not None and [bytes(p) for p in parts] == [blob[o : o + n] for o, n in ranges]
            del parts
            gc.collect()
        if disk.direct_reads:  # the filesystem took O_DIRECT: buffers came back and were reused
            assert disk._read_buffers.created <= len(ranges)
        assert await disk.get_ranges(key(1), [(len(blob) - 5, 6)]) is None  # past the end: a miss
    run(go)


def test_direct_reads_fall_back_to_the_page_cache_when_the_kernel_refuses_them(tmp_path: Path) -> None:
    from streamkv.store.direct_io import AlignedBuffers

    class Misaligned(AlignedBuffers):
        """Buffers one byte off the page boundary: O_DIRECT reads into them fail with EINVAL,
        as they do on filesystems without O_DIRECT."""

        def take(self, nbytes: int):  # type: ignore[no-untyped-def]
            return super().take(nbytes + 1)[1:]

    async def go() -> None:
        disk = DiskStore(tmp_path, 1 << 20, direct_reads=True)
        disk._read_buffers = Misaligned()
        await disk.put(key(2), b"0123456789" * 1000)
        probe = await disk.get_ranges(key(2), [(5, 20)])
        assert bytes(probe[0]) == (b"0123456789" * 1000)[5:25]
        if disk.direct_reads:
            pytest.skip("this filesystem reads O_DIRECT into unaligned buffers")
        assert bytes((await disk.get_ranges(key(2), [(9990, 10)]))[0]) == b"0123456789"
    run(go)


@pytest.mark.skipif(not disk_write.O_DIRECT, reason="no O_DIRECT on this platform")
def test_disk_store_writes_small_objects_buffered_and_large_ones_direct(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        store = DiskStore(tmp_path, 8 << 20)
        assert await store.put(key(0), b"warm")  # makes the namespace directory
        seen = _spy_open(monkeypatch)
        small, large = os.urandom(disk_write.DIRECT_MIN_BYTES - 1), os.urandom(disk_write.DIRECT_MIN_BYTES)
        assert await store.put(key(1), small)
        assert [f & disk_write.O_DIRECT for f in seen] == [0]
        assert await store.put(key(2), large)
        if not store.direct_writes:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert [bool(f & disk_write.O_DIRECT) for f in seen] == [False, True]
        assert bytes(await store.get(key(1))) == small and bytes(await store.get(key(2))) == large
    run(go)


def test_an_object_being_evicted_is_not_indexed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write-back victim stays indexed (readable) while it is handed down; then it leaves the
    index, and between that and its unlink its file still exists: a lookup in that window must
    not index it again."""
    async def go() -> None:
        seen: list[tuple[str, bool]] = []
        disk = DiskStore(tmp_path, 2500)
        disk.on_evict = lambda k, data: seen.append((k, disk._known(k)))
        real_unlink = disk_write.unlink_quietly

        def look_then_unlink(path: Path) -> None:
            seen.append((path.name, disk._unindexed_size(key(0)) is not None))
            real_unlink(path)

        monkeypatch.setattr(disk_mod, "unlink_quietly", look_then_unlink)
        for i in range(3):
            await disk.put(key(i), bytes([i]) * 1000)
        assert seen == [(key(0), True), (key(0).split("/")[1], False)]
        assert disk.used_bytes == sum(disk._index.values()) == 2000
        assert not await disk.exists(key(0))
    run(go)


def test_exists_now_answers_from_the_tiers_own_state(tmp_path: Path) -> None:
    """On the caller's thread: memory's map, disk's index or a stat of a file another process
    wrote (not indexed by the question), objects being demoted; False only where every tier
    could answer."""
    memory, disk = MemoryStore(1 << 20), DiskStore(tmp_path / "d", 1 << 20)
    tiered = TieredStore([memory, disk])
    run(lambda: memory.put(key(1), b"m" * 10))
    run(lambda: disk.put(key(2), b"d" * 10))
    assert [tiered.exists_now(key(i)) for i in (1, 2, 3)] == [True, True, False]
    (tmp_path / "d" / key(4)).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / key(4)).write_bytes(b"another process")
    assert tiered.exists_now(key(4)) is True and key(4) not in disk._index
    tiered._moving[key(5)] = b"in transit"
    assert tiered.exists_now(key(5)) is True

    class Remote(MemoryStore):  # a tier that cannot answer in process (S3, the daemon)
        def exists_now(self, key: str) -> None:
            return None

    with_remote = TieredStore([memory, Remote(1 << 20)])
    assert with_remote.exists_now(key(1)) is True and with_remote.exists_now(key(3)) is None


def test_which_stores_are_read_in_place(tmp_path: Path) -> None:
    """Sections are sliced from a header read's memory only where that memory is the whole,
    unchanging object (memory tier, disk through mmap) and no tier lends reusable memory."""
    from types import SimpleNamespace

    from streamkv.client.store import DaemonStore
    from streamkv.store.in_place import reads_in_place, whole_object
    from streamkv.store.s3 import S3Store

    memory = MemoryStore(1 << 20)
    mapped = DiskStore(tmp_path / "m", 1 << 20)
    direct = DiskStore(tmp_path / "d", 1 << 20, direct_reads=True)
    pread = DiskStore(tmp_path / "p", 1 << 20, mmap_reads=False)
    assert (memory.range_views, mapped.range_views, direct.range_views, pread.range_views) == \
        ("whole", "whole", "lent", "exact")
    assert (S3Store.range_views, DaemonStore.range_views) == ("exact", "lent")

    def store(*tiers):  # type: ignore[no-untyped-def]
        return SimpleNamespace(tiers=list(tiers))

    assert reads_in_place(store(memory, mapped))
    assert reads_in_place(store(memory, mapped), every_tier=True)
    assert not reads_in_place(store(memory, direct)) and not reads_in_place(store(pread))
    s3_like = SimpleNamespace(range_views=S3Store.range_views)
    assert reads_in_place(store(memory, mapped, s3_like)) and not reads_in_place(store(memory, s3_like), every_tier=True)
    assert not reads_in_place(store(memory, SimpleNamespace(range_views=DaemonStore.range_views)))

    data = os.urandom(10_000)
    run(lambda: mapped.put(key(1), data))
    run(lambda: pread.put(key(1), data))
    [head] = run(lambda: mapped.get_ranges(key(1), [(0, 64)]))
    whole = whole_object(head, len(data))
    assert whole is not None and bytes(whole[:len(data)]) == data
    assert whole_object(head, len(data) + 1) is None  # shorter than the header says: not whole
    [exact] = run(lambda: pread.get_ranges(key(1), [(0, 64)]))
    assert whole_object(exact, 64) is None


def test_tiered_ranges_of_many_objects_come_from_each_ones_tier(tmp_path: Path) -> None:
    """Objects split over the tiers: each comes from the first tier holding it, disk hits are
    promoted, the misses count once; the disk tier maps all its objects in one worker hop."""
    async def go() -> None:
        mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
        hops = []
        run_on_worker = disk._run

        async def counted(fn, *args):  # type: ignore[no-untyped-def]
            hops.append(fn)
            return await run_on_worker(fn, *args)

        disk._run = counted  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tiered = TieredStore([mem, disk], background=tg)
            for i in range(6):
                await tiered.put(key(i), bytes([i]) * 500)
            await tiered.flush()
            for i in (1, 3, 4):
                await mem.delete(key(i))
            hops.clear()
            got = await tiered.get_ranges_many([(key(i), [(10, 4)]) for i in range(8)])
            assert [None if g is None else bytes(g[0]) for g in got] == [bytes([i]) * 4 for i in range(6)] + [None] * 2
            assert len(hops) == 1  # keys 1, 3 and 4, mapped together
            assert disk.counters.hits >= 3 and tiered.counters.misses == 2
            await tiered.flush()
            assert all([await mem.exists(key(i)) for i in (1, 3, 4)])  # promoted
    run(go)


def test_warm_now_answers_for_the_fastest_tier_holding_the_object(tmp_path: Path) -> None:
    """Memory holds its objects in memory; the disk tier's answer is the page cache's, and a
    tiered store asks the first tier holding the key (never one below it)."""
    from streamkv.store.direct_io import cached_pages
    from streamkv.store.disk import drop_page_cache

    async def go() -> None:
        mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
        tiered = TieredStore([mem, disk])
        await mem.put(key(1), b"m" * 5000)
        await disk.put(key(2), b"d" * 50_000)
        assert mem.warm_now(key(1)) and not mem.warm_now(key(2))
        assert tiered.warm_now(key(1)) and not tiered.warm_now(key(3))
        drop_page_cache(tmp_path)
        assert not disk.warm_now(key(2)) and not tiered.warm_now(key(2))
        fd = os.open(disk._path(key(2)), os.O_RDONLY)
        try:
            telling = cached_pages(fd) is not None
        finally:
            os.close(fd)
        disk._path(key(2)).read_bytes()
        assert disk.warm_now(key(2)) == telling == tiered.warm_now(key(2))
    run(go)
