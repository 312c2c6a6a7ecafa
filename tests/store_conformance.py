"""One test class for every tier, written once against the Store interface.

A tier's test module subclasses ``StoreConformance`` and provides a ``store``
fixture (an open store on a fresh location); a new tier is done when it passes."""

from __future__ import annotations

import os

import anyio
import pytest

from streamkv.store.base import Store

NS = "0123456789abcdef0123456789abcdef"


def key(i: int, ns: str = NS) -> str:
    return f"{ns}/{i:032x}"


def run(fn, *args):  # type: ignore[no-untyped-def]
    return anyio.run(fn, *args)


class StoreConformance:
    """Behaviour every Store must have."""

    def test_round_trip(self, store: Store) -> None:
        async def go() -> None:
            data = os.urandom(10_000)
            assert await store.put(key(1), data)
            assert bytes(await store.get(key(1))) == data
            assert await store.exists(key(1))
        run(go)

    def test_missing_is_none_not_error(self, store: Store) -> None:
        async def go() -> None:
            assert await store.get(key(99)) is None
            assert await store.get_ranges(key(99), [(0, 4)]) is None
            assert not await store.exists(key(99))
            assert not await store.delete(key(99))
        run(go)

    def test_exists_now_never_contradicts_exists(self, store: Store) -> None:
        """The synchronous answer is the async one, or None ("cannot tell here")."""
        async def go() -> None:
            assert store.exists_now(key(98)) in (False, None)
            await store.put(key(98), b"x" * 100)
            assert store.exists_now(key(98)) in (True, None)
            await store.delete(key(98))
            assert store.exists_now(key(98)) in (False, None)
        run(go)

    def test_reader_now_reads_what_get_reads(self, store: Store) -> None:
        """A local tier's reader (run on a worker thread, as read_chunks_into runs it) gives the
        object's bytes; a tier without one says None and callers use ``get``."""
        async def go() -> None:
            assert store.reader_now(key(97)) is None
            for size in (1, 4096 * 3 + 5, 300_000):
                data = os.urandom(size)
                await store.put(key(97), data)
                reader = store.reader_now(key(97))
                if reader is None:
                    assert bytes(await store.get(key(97))) == data  # not a local tier: get
                    continue
                got = await anyio.to_thread.run_sync(reader)
                assert got is not None and bytes(memoryview(got).cast("B")[:size]) == data
                assert memoryview(got).nbytes == size
            await store.delete(key(97))
            assert store.reader_now(key(97)) is None
        run(go)

    def test_ranges(self, store: Store) -> None:
        async def go() -> None:
            data = os.urandom(4096)
            await store.put(key(2), data)
            parts = await store.get_ranges(key(2), [(0, 10), (100, 50), (4000, 96)])
            assert [bytes(p) for p in parts] == [data[:10], data[100:150], data[4000:]]
        run(go)

    def test_ranges_of_many_objects_are_each_objects_ranges(self, store: Store) -> None:
        """``get_ranges_many`` answers in order what ``get_ranges`` answers per object: a missing
        object or a range past an object's end is None for that object only."""
        async def go() -> None:
            blobs = {i: os.urandom(3000 + 7 * i) for i in range(30, 36)}
            for i, data in blobs.items():
                await store.put(key(i), data)
            requests = [(key(i), [(0, 16), (len(data) - 9, 9)]) for i, data in blobs.items()]
            requests.insert(2, (key(899), [(0, 4)]))
            requests.insert(4, (key(31), [(0, 5000)]))  # past its end
            hits = store.counters.hits
            got = await store.get_ranges_many(requests)
            assert len(got) == len(requests)
            for (k, ranges), parts in zip(requests, got):
                assert (parts is None) == (await store.get_ranges(k, ranges) is None)
                if parts is not None:
                    data = blobs[int(k.rsplit("/", 1)[1], 16)]
                    assert [bytes(p) for p in parts] == [data[o : o + n] for o, n in ranges]
            assert [p is None for p in got].count(True) == 2
            assert store.counters.hits - hits >= 6
            [one] = await store.get_ranges_many([(key(30), [(0, 3)])])
            assert [bytes(p) for p in one] == [blobs[30][:3]]
        run(go)

    def test_overwrite_replaces(self, store: Store) -> None:
        async def go() -> None:
            await store.put(key(3), b"a" * 100)
            await store.put(key(3), b"b" * 50)
            assert bytes(await store.get(key(3))) == b"b" * 50
        run(go)

    def test_batched_forms(self, store: Store) -> None:
        async def go() -> None:
            items = [(key(i), os.urandom(100 + i)) for i in range(10, 20)]
            assert all(await store.put_many(items))
            got = await store.get_many([k for k, _ in items] + [key(999)])
            assert [bytes(g) for g in got[:-1]] == [d for _, d in items]
            assert got[-1] is None
            flags = await store.exists_many([key(10), key(998), key(19)])
            assert flags == [True, False, True]
            assert await store.delete_many([key(10), key(998)]) == [True, False]
            assert not await store.exists(key(10))
        run(go)

    def test_list_and_clear_by_namespace(self, store: Store) -> None:
        other = "f" * 32
        async def go() -> None:
            await store.put(key(1), b"x" * 10)
            await store.put(key(2), b"y" * 10)
            await store.put(key(1, other), b"z" * 10)
            assert sorted(await store.list_keys(NS)) == sorted([key(1), key(2)])
            assert await store.clear(NS) == 2
            assert await store.list_keys(NS) == []
            assert await store.exists(key(1, other))
        run(go)

    @pytest.mark.parametrize("bad", ["../x/y", "a/b/c", "noslash", "/abs", "ns/..", ".hidden/x"])
    def test_bad_keys_rejected(self, store: Store, bad: str) -> None:
        async def go() -> None:
            with pytest.raises(ValueError):
                await store.put(bad, b"data")
        run(go)
