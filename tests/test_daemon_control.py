"""The control API in process (``streamkv.control`` on a ``TieredStore``), the frame
codec and the shared-memory pool: the parts of the daemon that need no subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import numpy as np
import pytest

from streamkv import control
from streamkv.format import CODEC_LZ4, decode_chunk, encode_chunk, parse_header
from streamkv.keys import Namespace, chunk_keys
from streamkv.layout import KVLayout
from streamkv.server.protocol import MAX_FRAME, ProtocolError, pack, unpack
from streamkv.server.shm import ShmPool
from streamkv.store import DiskStore, MemoryStore, TieredStore

LAYOUT = KVLayout(2, 2, 16, "float16", 16)
NS = Namespace("control-test", LAYOUT)


def chunk(seed: int, compressible: bool = False) -> bytearray:
    rng = np.random.default_rng(seed)
    top = 3 if compressible else 65536
    sections = [rng.integers(0, top, LAYOUT.section_bytes // 2, dtype=np.uint16) for _ in range(LAYOUT.num_layers)]
    return encode_chunk(NS, LAYOUT, sections, compression="off")


def keys(n: int, seed: int = 0) -> list[str]:
    return chunk_keys(np.random.default_rng(seed).integers(0, 1000, n * 16), 16, NS)


def test_lookup_pin_move_clear(tmp_path: Path) -> None:
    async def go() -> None:
        size = len(chunk(0))
        mem, disk = MemoryStore(3 * size), DiskStore(tmp_path, 1 << 20)
        store = TieredStore([mem, disk])
        ks = keys(4)
        for i, k in enumerate(ks[:3]):
            assert await store.put(k, chunk(i))
        found = await control.lookup(store, ks)
        assert found["hit_chunks"] == 3 and found["tiers"][3] == []
        assert all(t == ["memory", "disk"] for t in found["tiers"][:3])
        assert await control.pin(store, ks[:1]) == 1
        for i in range(10, 16):  # churn the memory tier: the pinned chunk stays
            await mem.put(keys(1, seed=i)[0], chunk(i))
        assert await mem.exists(ks[0])
        assert await control.move(store, ks[:2], "disk") == 2
        assert (await control.lookup(store, ks[:2]))["tiers"] == [["memory", "disk"], ["disk"]]
        assert await control.unpin(store, ks[:1]) == 1 and await control.unpin(store, ks[:1]) == 0
        assert await control.move(store, ks[:1], "memory") == 1
        assert await control.clear(store, prefix=ks[2][:40]) == 1  # by key prefix
        assert await control.clear(store, NS.id) >= 2
        assert (await control.lookup(store, ks))["hit_chunks"] == 0
        with pytest.raises(ValueError, match="tier"):
            await control.move(store, ks, "s3")
        with pytest.raises(ValueError, match="key"):
            await control.lookup(store, ["../etc/passwd"])
    anyio.run(go)


def test_pin_brings_a_chunk_up_from_disk(tmp_path: Path) -> None:
    async def go() -> None:
        mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
        store = TieredStore([mem, disk])
        k = keys(1)[0]
        await disk.put(k, chunk(1))
        assert await control.pin(store, [k]) == 1 and mem.is_pinned(k)
        assert await control.pin(store, keys(1, seed=9)) == 0  # held nowhere
    anyio.run(go)


def test_compress_recompresses_where_it_pays_and_keeps_bytes(tmp_path: Path) -> None:
    async def go() -> None:
        store = TieredStore([MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)])
        ks = keys(3)
        objects = [chunk(0, compressible=True), chunk(1, compressible=True), chunk(2)]
        for k, obj in zip(ks, objects):
            await store.put(k, obj)
        await store.put(ks[2][:33] + "f" * 32, b"not a chunk object at all")
        result = await control.compress(store)
        assert result["examined"] == 8 and result["corrupt"] == 2
        assert result["recompressed"] == 4 and result["bytes_after"] < result["bytes_before"]
        for tier in store.tiers:
            for k, obj in zip(ks, objects):
                new = await tier.get(k)
                assert [bytes(s) for s in decode_chunk(new, NS, LAYOUT)[1]] == \
                       [bytes(s) for s in decode_chunk(obj, NS, LAYOUT)[1]]
            assert all(s.codec == CODEC_LZ4 for s in parse_header(await tier.get(ks[0])).sections)
        again = await control.compress(store, NS.id)
        assert again["recompressed"] == 0  # already compressed, or not worth it
    anyio.run(go)


def test_drain_writes_back_what_only_memory_holds(tmp_path: Path) -> None:
    async def go() -> None:
        async with anyio.create_task_group() as tg:
            mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)
            store = TieredStore([mem, disk], write_policy="write_back", background=tg)
            for i, k in enumerate(keys(3)):
                await store.put(k, chunk(i))
            assert await disk.list_keys() == []
            assert await control.drain(store) == 3
            assert sorted(await disk.list_keys()) == sorted(keys(3))
            assert await control.drain(store) == 0
    anyio.run(go)


def test_health_and_stats(tmp_path: Path) -> None:
    async def go() -> None:
        store = TieredStore([MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 20)])
        health = await control.health(store)
        assert health["ok"] and [t["tier"] for t in health["tiers"]] == ["memory", "disk"]
        await store.put(keys(1)[0], chunk(0))
        await store.get(keys(1)[0])
        await store.get(keys(1, seed=5)[0])
        stats = control.stats(store)
        assert stats["hit_rate"] == 0.5 and stats["tiers"][0]["objects"] == 1
    anyio.run(go)


def test_frames_round_trip_and_reject_garbage() -> None:
    msg = {"id": 1, "op": "get", "items": [["a/b", None]]}
    frame = pack(msg)
    assert unpack(frame[4:]) == msg
    for bad in (b"\xc1", b"\x93\x01\x02\x03", os.urandom(3) + b"\xff"):
        with pytest.raises(ProtocolError):
            unpack(bad)
    with pytest.raises(ProtocolError):
        pack({"blob": b"x" * (MAX_FRAME + 1)})


def test_shm_pool_regions_reuse_and_capacity() -> None:
    pool = ShmPool(capacity_bytes=8 << 20, segment_bytes=4 << 20)
    try:
        a, b = pool.alloc(1 << 20), pool.alloc(1 << 20)
        assert a is not None and b is not None and a.offset != b.offset
        pool.view(a)[:5] = b"hello"  # (other processes map it by name: tests/test_daemon.py)
        assert bytes(pool.view(a, 5)) == b"hello"
        pool.free(a)
        pool.free(b)
        assert pool.used_bytes == 0
        assert pool.alloc(4 << 20) is not None and pool.alloc(4 << 20) is not None
        assert pool.alloc(1) is None  # capacity reached: refused, not exceeded
        big = ShmPool(capacity_bytes=64 << 20, segment_bytes=4 << 20)
        region = big.alloc(10 << 20)  # larger than a segment: one of its own, gone when freed
        assert region is not None and big.stats()["segments"] == 1
        big.free(region)
        assert big.stats()["segments"] == 0
        big.close()
    finally:
        pool.close()


def test_tier_pool_arrays_free_when_unreferenced() -> None:
    pool = ShmPool(capacity_bytes=16 << 20, segment_bytes=4 << 20, addressable=True)
    try:
        arr = pool.array(1000)
        assert arr is not None
        view = memoryview(arr)[10:20]
        seg, off = pool.locate(view)  # type: ignore[misc]
        assert off == 10 and seg.startswith(pool.prefix)
        assert pool.locate(memoryview(bytearray(10))) is None
        del arr
        assert pool.used_bytes > 0  # the view still holds it
        del view
        assert pool.used_bytes == 0
    finally:
        pool.close()
