"""The engine core on real tiers: hit lengths, corruption, non-blocking stores, bad input."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.errors import ConfigError
from streamkv.format import header_size
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.store import DiskStore, MemoryStore
from streamkv.store.disk import drop_page_cache
from tests.engine_helpers import LAYOUT, make_engine, random_kv, source_of, streamed

C = LAYOUT.chunk_size


def stored_engine(tmp_path: Path, tokens: np.ndarray, kv, **kw) -> StreamKVEngine:  # type: ignore[no-untyped-def]
    engine = make_engine(tmp_path, **kw)
    assert engine.store_kv(tokens, source_of(kv)).result() == len(tokens) // C
    engine.flush()
    return engine


def test_hit_lengths_exact_partial_diverging(tmp_path: Path) -> None:
    tokens = np.arange(100)
    with stored_engine(tmp_path, tokens, random_kv(100)) as engine:
        assert engine.lookup(tokens) == 96
        assert engine.lookup(tokens[:50]) == 48
        assert engine.lookup(np.concatenate([tokens, np.arange(40)])) == 96
        diverged = tokens.copy()
        diverged[40] = 9999
        assert engine.lookup(diverged) == 32
        assert engine.lookup(np.arange(5, 105)) == 0
        assert engine.lookup(tokens[:10]) == 0


def test_streamed_kv_equals_stored(tmp_path: Path) -> None:
    tokens = np.arange(70)
    kv = random_kv(70)
    with stored_engine(tmp_path, tokens, kv) as engine:
        hit, layers = streamed(engine, tokens)
        assert hit == 64 and layers is not None
        for layer, (k, v) in enumerate(kv):
            assert np.array_equal(layers[layer][0], k[:64]) and np.array_equal(layers[layer][1], v[:64])


@pytest.mark.parametrize("tiers", [("disk",), ("memory",)])
def test_single_tier_engines(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    tokens = np.arange(48)
    kv = random_kv(48, seed=3)
    with stored_engine(tmp_path, tokens, kv, tiers=None, **{}) as _:
        pass
    cfg = StreamKVConfig(chunk_size=C, disk_dir=str(tmp_path / "disk"), memory_gb=0.01, disk_gb=0.01, tiers=tiers)
    with StreamKVEngine(cfg, LAYOUT, Namespace("tiny", LAYOUT)) as engine:
        if tiers == ("memory",):
            engine.store_kv(tokens, source_of(kv)).result()
        hit, layers = streamed(engine, tokens)
        assert hit == 48 and np.array_equal(layers[2][1], kv[2][1])


def _corrupt_file(tmp_path: Path, engine: StreamKVEngine, tokens, chunk: int, where: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "disk" / engine.keys(tokens)[chunk]
    data = bytearray(path.read_bytes())
    if where == "section":
        data[-10] ^= 0xFF  # inside the last layer's section
    elif where == "header":
        data[30] ^= 0xFF
    elif where == "truncate":
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "section", "truncate"])
def test_corrupt_chunk_in_the_middle_cuts_the_hit(tmp_path: Path, where: str) -> None:
    tokens = np.arange(80)
    kv = random_kv(80, seed=1)
    with stored_engine(tmp_path, tokens, kv) as engine:
        _corrupt_file(tmp_path, engine, tokens, 2, where)
    cfg = StreamKVConfig(chunk_size=C, disk_dir=str(tmp_path / "disk"), memory_gb=0.01, disk_gb=0.01, tiers=("disk",))
    with StreamKVEngine(cfg, LAYOUT, Namespace("tiny", LAYOUT)) as engine:
        handle = engine.retrieve(tokens)
        results = [handle.wait(layer) for layer in range(LAYOUT.num_layers)]
        if where == "header":
            assert handle.hit_tokens == 2 * C and all(results)  # known before the forward: a shorter hit
        elif where == "section":
            assert handle.hit_tokens == 5 * C and results == [True, True, True, False]
        else:  # truncated: the header reads fine, sections past the cut do not
            assert handle.hit_tokens == 5 * C and not all(results)
        assert handle.valid_tokens == 2 * C
        got = [a.view(np.float32) for a in handle.sink.layers]
        for layer in range(LAYOUT.num_layers):  # whatever did arrive for the valid prefix is right
            if results[layer]:
                assert np.array_equal(got[layer][0][: 2 * C], kv[layer][0][: 2 * C])
        assert engine.counters.get("retrieve_corrupt", 0) + engine.counters.get("retrieve_missing", 0) >= 1
        if where != "truncate":  # a corrupt object is deleted, so it stops looking like a hit
            engine.flush()
            assert engine.lookup(tokens) == 2 * C


def test_missing_chunk_cuts_hit_and_foreign_object_is_a_miss(tmp_path: Path) -> None:
    tokens = np.arange(64)
    kv = random_kv(64)
    with stored_engine(tmp_path, tokens, kv, tiers=("disk",)) as engine:
        keys = engine.keys(tokens)
        (tmp_path / "disk" / keys[1]).unlink()
    with make_engine(tmp_path, tiers=None) as engine:
        assert streamed(engine, tokens)[0] == C
    # an object of another model placed under this model's key is a miss
    with stored_engine(tmp_path / "other", tokens, kv, model="other-model", tiers=("disk",)) as other:
        foreign = (tmp_path / "other" / "disk" / other.keys(tokens)[0]).read_bytes()
    with make_engine(tmp_path) as engine:
        (tmp_path / "disk" / engine.keys(tokens)[0]).write_bytes(foreign)
    with make_engine(tmp_path) as engine:
        assert streamed(engine, tokens)[0] == 0


class GatedStore(MemoryStore):
    """A real memory tier whose puts wait for a gate: a slow tier."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__(1 << 24)
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def put(self, key: str, data) -> bool:  # type: ignore[no-untyped-def]
        self.entered.set()
        await anyio.to_thread.run_sync(self.gate.wait)
        return await super().put(key, data)


def test_store_never_blocks_on_a_slow_tier(tmp_path: Path) -> None:
    slow = GatedStore()
    engine = make_engine(tmp_path, tiers=[slow])
    tokens = np.arange(64)
    future = engine.store_kv(tokens, source_of(random_kv(64)))  # returns while the tier is stuck
    assert slow.entered.wait(30)
    assert not future.done()
    slow.gate.set()
    assert future.result(30) == 4
    assert engine.lookup(tokens) == 64
    engine.close()


def test_store_skips_chunks_already_stored(tmp_path: Path) -> None:
    tokens = np.arange(64)
    with stored_engine(tmp_path, tokens, random_kv(64)) as engine:
        assert engine.store_kv(tokens, source_of(random_kv(64))).result() == 0
        assert engine.store_kv(np.arange(96), source_of(random_kv(96))).result() == 2


def test_store_of_wrong_shaped_kv_stores_nothing(tmp_path: Path) -> None:
    with make_engine(tmp_path) as engine:
        wrong = random_kv(64, KVLayout(4, 3, 8, "float32", 16))
        assert engine.store_kv(np.arange(64), source_of(wrong)).result() == 0
        assert engine.counters["store_rejected"] == 1
        assert engine.lookup(np.arange(64)) == 0


def test_read_and_write_whole_chunks(tmp_path: Path) -> None:
    with make_engine(tmp_path) as engine:
        key = engine.object_key("a" * 64)
        payload = np.random.default_rng(0).integers(0, 255, LAYOUT.chunk_bytes, dtype=np.uint8)
        assert engine.write_chunks([(key, payload), (engine.object_key("b"), b"short")], wait=True) == 1
        got = engine.read_chunks([key, engine.object_key("c")])
        assert np.array_equal(got[0], payload) and got[1] is None


def test_bad_input_at_construction(tmp_path: Path) -> None:
    cfg = StreamKVConfig(chunk_size=16, disk_dir=str(tmp_path), memory_gb=0.01, disk_gb=0.01)
    with pytest.raises(ConfigError, match="chunk_size"):
        StreamKVEngine(cfg, LAYOUT.with_chunk_size(32), Namespace("m", LAYOUT.with_chunk_size(32)))
    with pytest.raises(ConfigError, match="layout"):
        StreamKVEngine(cfg, LAYOUT, Namespace("m", KVLayout(2, 2, 8, "float32", 16)))
    with pytest.raises(ConfigError, match="memory_gb"):
        StreamKVConfig(memory_gb=0)
    with pytest.raises(ConfigError, match="disk_gb"):
        StreamKVConfig(disk_gb=-1)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="disk_dir"):
        StreamKVEngine(cfg.replace(disk_dir=str(blocker / "cache")), LAYOUT, Namespace("m", LAYOUT))
    with pytest.raises(ConfigError, match="tiers"):
        StreamKVConfig(tiers=("disk", "memory"))
    with pytest.raises(ConfigError, match="s3_url"):
        StreamKVConfig(tiers=("memory", "s3"))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        KVLayout(4, 0, 8)


def test_bad_tokens_raise_type_error(tmp_path: Path) -> None:
    with make_engine(tmp_path) as engine:
        with pytest.raises(TypeError, match="tokens"):
            engine.lookup("hello world")
        with pytest.raises(TypeError, match="tokens"):
            engine.retrieve([0.5, 1.5])


def test_config_sources_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "streamkv.yaml"
    path.write_text("memory_gb: 0.5\nchunk_size: 128\ndisk_dir: /tmp/x\n")
    cfg = StreamKVConfig.load(path, env={"STREAMKV_CHUNK_SIZE": "64"}, disk_gb=3)
    assert (cfg.memory_gb, cfg.chunk_size, cfg.disk_gb, cfg.disk_dir) == (0.5, 64, 3, "/tmp/x")
    path.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        StreamKVConfig.load(path, env={})
    with pytest.raises(ConfigError, match="chunk_size='abc'"):
        StreamKVConfig.load(env={"STREAMKV_CHUNK_SIZE": "abc"})
    with pytest.raises(ConfigError, match="write_policy"):
        StreamKVConfig(write_policy="sometimes")


def test_retrieve_asks_the_disk_to_read_ahead_layer_by_layer(tmp_path: Path) -> None:
    from tests.test_tiers import RecordingDisk

    disk = RecordingDisk(tmp_path / "rec", 1 << 24)
    engine = make_engine(tmp_path, tiers=[disk])
    tokens = np.arange(48)
    kv = random_kv(48)
    assert engine.store_kv(tokens, source_of(kv)).result(30) == 3
    keys = engine.keys(tokens)
    drop_page_cache(disk.root)  # hints are for objects the page cache does not hold
    hit, layers = streamed(engine, tokens)
    assert hit == 48 and layers is not None
    sizes = [disk._index[k] for k in keys]
    # first, before the headers are read: each chunk's header and layer 0 in one range
    first, sections = disk.hints[: len(keys)], disk.hints[len(keys) :]
    assert first == [(k, (0, header_size(LAYOUT.num_layers) + LAYOUT.section_bytes)) for k in keys]
    # then every section of every chunk, layer 0 of all chunks first: the order the forward consumes
    assert [k for k, _ in sections] == keys * LAYOUT.num_layers
    assert all(0 < off and off + n <= sizes[i % len(keys)] for i, (_, (off, n)) in enumerate(sections))
    per_chunk = [[r for k, r in sections if k == key] for key in keys]
    assert all(rs == sorted(rs) and len(rs) == LAYOUT.num_layers for rs in per_chunk)
    engine.close()


def test_retrieve_of_objects_the_page_cache_holds_gives_no_read_ahead_hints(tmp_path: Path) -> None:
    """Hinting pages already cached reads nothing and costs CPU every layer: a hit whose files
    the page cache holds whole is read with no hints; once evicted, it is hinted again."""
    from streamkv.store.direct_io import cached_pages
    from tests.test_tiers import RecordingDisk

    disk = RecordingDisk(tmp_path / "rec", 1 << 24)
    with make_engine(tmp_path, tiers=[disk]) as engine:
        tokens = np.arange(48)
        kv = random_kv(48)
        assert engine.store_kv(tokens, source_of(kv)).result(30) == 3
        keys = engine.keys(tokens)
        fd = os.open(disk._path(keys[0]), os.O_RDONLY)
        try:
            if cached_pages(fd) is None:
                pytest.skip("this kernel cannot tell what the page cache holds (cachestat, Linux 6.5+)")
        finally:
            os.close(fd)
        for path in disk.root.rglob("*"):  # read every file whole: the page cache holds them
            if path.is_file():
                path.read_bytes()
        assert all(disk.warm_now(k) for k in keys) and not any(disk.cold_now(k) for k in keys)
        hit, layers = streamed(engine, tokens)
        assert hit == 48 and layers is not None
        assert all(np.array_equal(layers[i][j], kv[i][j]) for i in range(LAYOUT.num_layers) for j in (0, 1))
        assert disk.hints == []
        drop_page_cache(disk.root)
        assert not any(disk.warm_now(k) for k in keys)
        hit, layers = streamed(engine, tokens)
        assert hit == 48 and {k for k, _ in disk.hints} == set(keys)


def test_close_cancels_a_retrieve_its_consumer_abandoned(tmp_path: Path) -> None:
    """A consumer that took layer 0 and went away (no more waits, no cancel): close() must not
    wait forever for a producer holding its next layer, and later waits answer False."""
    import threading

    layout = KVLayout(num_layers=12, num_kv_heads=2, head_size=8, dtype="float32", chunk_size=16)
    engine = make_engine(tmp_path, layout=layout, tiers=("disk",), max_inflight_layers=1)
    tokens = np.arange(32)
    kv = [[np.ones((32, 2, 8), np.float32) for _ in range(2)] for _ in range(12)]
    assert engine.store_kv(tokens, lambda layer: kv[layer]).result(30) == 2
    handle = engine.retrieve(tokens)
    assert handle.wait(0)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "close() hung on an abandoned retrieve"
    assert handle.wait(11, timeout=1) is False


def test_read_ahead_hints_run_a_window_ahead_of_the_consumer(tmp_path: Path) -> None:
    """Hints go out a few layers ahead of the layer being read, not all at once: the first
    layers' reads must not queue behind the last ones'. With one layer in flight (window 2),
    a consumer that took only layer 0 has had at most layers 0-3 hinted."""
    import time

    from tests.test_tiers import RecordingDisk

    layout = KVLayout(num_layers=12, num_kv_heads=2, head_size=8, dtype="float32", chunk_size=16)
    disk = RecordingDisk(tmp_path / "rec", 1 << 24)
    with make_engine(tmp_path, layout=layout, tiers=[disk], max_inflight_layers=1) as engine:
        tokens = np.arange(32)
        kv = [[np.random.default_rng(i).standard_normal((32, 2, 8)).astype(np.float32) for _ in range(2)]
              for i in range(12)]
        assert engine.store_kv(tokens, lambda layer: kv[layer]).result(30) == 2
        keys = engine.keys(tokens)
        drop_page_cache(disk.root)  # hints are for objects the page cache does not hold
        handle = engine.retrieve(tokens)
        assert handle.wait(0)
        time.sleep(0.3)  # the producer goes as far as it may
        hinted = sorted({(k, r) for k, r in disk.hints[2:]})  # past the header + layer 0 hints
        assert 2 * 2 <= len(hinted) <= 4 * 2  # layers 0-1 at least, 0-3 at most, of 2 chunks
        assert all(handle.wait(layer) for layer in range(12))
        assert [k for k, _ in disk.hints[2:]] == keys * 12  # in the end every section, layer-major


# -- key-level objects straight from / into the caller's memory (write_chunks_from, read_chunks_into) --

def _token_major(tokens_kv: np.ndarray) -> np.ndarray:
    """A host-pool-like page ``[plane, token, layer, heads, dim]`` viewed layer-first (strided, no copy)."""
    return tokens_kv.transpose(2, 0, 1, 3, 4)


def _page(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, (2, C, LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_size), dtype=np.uint32)


@pytest.mark.parametrize("mapped", [False, True], ids=["whole-reads", "mapped-reads"])
@pytest.mark.parametrize("tiers", [("disk",), ("memory", "disk"), ("memory",)])
def test_write_from_and_read_into_strided_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                tiers: tuple[str, ...], mapped: bool) -> None:
    """Sources and destinations in another memory layout: the one copy each way re-orders them.
    Large objects are read in place from the local tiers (``mapped``), small ones whole."""
    from streamkv.store import disk

    monkeypatch.setattr(disk, "MAPPED_WHOLE_BYTES", 0 if mapped else 1 << 40)
    with make_engine(tmp_path, tiers=tiers) as engine:
        assert engine.objects._mapped_reads() is mapped
        if mapped:  # in place: the header's view leads to the whole object, never a whole get

            async def no_whole_gets(key: str) -> None:
                raise AssertionError("whole-object get")

            monkeypatch.setattr(engine.store, "get", no_whole_gets)
        pages = [_page(i) for i in range(5)]
        keys = [engine.object_key(f"p{i}") for i in range(5)]
        bad = np.zeros(7, dtype=np.uint8)
        assert engine.write_chunks_from(keys + [engine.object_key("bad")], [_token_major(p) for p in pages] + [bad]) \
            == [True] * 5 + [False]
        assert engine.counters["store_rejected"] == 1
        engine.flush()
        out = [np.zeros_like(p) for p in pages]
        assert engine.read_chunks_into(keys, [_token_major(o) for o in out]) == [True] * 5
        for p, o in zip(pages, out):
            assert np.array_equal(p, o)
        # the stored object is the layer-major payload: read_chunks returns it contiguous
        got = engine.read_chunks(keys[:1])[0]
        assert got is not None and np.array_equal(got, np.ascontiguousarray(_token_major(pages[0])).view(np.uint8).ravel())


def test_in_place_encoding_is_encode_chunk_byte_for_byte(tmp_path: Path) -> None:
    """Raw objects are sealed in place (format.seal_raw_chunk, no intermediate copy); they must stay
    exactly what format.encode_chunk writes, or readers elsewhere (the layer-wise producer) would
    reject them."""
    from streamkv.format import encode_chunk

    with make_engine(tmp_path, tiers=("disk",), compression="off") as engine:
        page = _page(1)
        key = engine.object_key("exact")
        assert engine.write_chunks_from([key], [_token_major(page)]) == [True]
        layers = np.ascontiguousarray(_token_major(page)).view(np.uint8).reshape(LAYOUT.num_layers, -1)
        expected = encode_chunk(engine.namespace, LAYOUT, list(layers), compression="off")
        assert (tmp_path / "disk" / key).read_bytes() == bytes(expected)


@pytest.mark.parametrize("compression", ["lz4", "auto"])
def test_compressible_pages_are_compressed_and_read_back(tmp_path: Path, compression: str) -> None:
    with make_engine(tmp_path, tiers=("disk",), compression=compression) as engine:
        page = np.zeros((2, C, LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_size), dtype=np.uint32)
        page[..., 0] = 7  # mostly zeros: lz4 pays
        key = engine.object_key("zeros")
        assert engine.write_chunks_from([key], [_token_major(page)]) == [True]
        assert (tmp_path / "disk" / key).stat().st_size < LAYOUT.chunk_bytes // 2
        out = np.ones_like(page)
        assert engine.read_chunks_into([key], [_token_major(out)]) == [True]
        assert np.array_equal(out, page)


def test_auto_compression_probes_less_while_pages_do_not_compress(tmp_path: Path) -> None:
    """"auto" stops probing every object once probes keep saying no, and compresses again
    within ``PROBE_EVERY`` objects of pages that do compress; every page reads back exactly."""
    from streamkv.chunk_objects import PROBE_EVERY, PROBE_STREAK

    with make_engine(tmp_path, tiers=("disk",), compression="auto") as engine:
        objects = engine.objects
        noisy = [_page(100 + i) for i in range(PROBE_STREAK + 3 * PROBE_EVERY)]
        keys = [engine.object_key(f"n{i}") for i in range(len(noisy))]
        for k, p in zip(keys, noisy):  # one at a time: the count does not depend on lanes
            assert engine.write_chunks_from([k], [_token_major(p)]) == [True]
        assert objects.probes == PROBE_STREAK + 3
        zeros = np.zeros_like(noisy[0])
        zeros[..., 0] = 7
        zkeys = [engine.object_key(f"z{i}") for i in range(PROBE_EVERY + 2)]
        for k in zkeys:
            assert engine.write_chunks_from([k], [_token_major(zeros)]) == [True]
        sizes = [(tmp_path / "disk" / k).stat().st_size for k in zkeys]
        assert sizes[-1] < LAYOUT.chunk_bytes // 2  # probed again, found worth it, compressed
        out = [np.ones_like(zeros) for _ in range(len(keys) + len(zkeys))]
        assert all(engine.read_chunks_into(keys + zkeys, [_token_major(o) for o in out]))
        for o, p in zip(out, noisy + [zeros] * len(zkeys)):
            assert np.array_equal(o, p)


@pytest.mark.parametrize("reads", ["whole", "mapped", "cold-direct"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_read_into_misses_leave_destinations_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        reads: str, damage: str) -> None:
    """A corrupt, truncated or foreign object is a miss and is never copied; with ``prefix`` the
    objects after it are neither copied nor reported, without it they are. ``cold-direct``: the
    objects are out of the page cache and read around it with O_DIRECT (disk_read.read_whole)."""
    from streamkv.store import disk, disk_read
    from tests.test_disk_reads import _cached, _drop

    mapped = reads != "whole"
    monkeypatch.setattr(disk, "MAPPED_WHOLE_BYTES", 0 if mapped else 1 << 40)
    direct_reads = []
    if reads == "cold-direct":
        monkeypatch.setattr(disk_read, "DIRECT_WHOLE_BYTES", 0)
        real = disk_read.read_whole_direct
        monkeypatch.setattr(disk_read, "read_whole_direct",
                            lambda *a: direct_reads.append(a[1]) or real(*a))  # type: ignore[func-returns-value]
    with make_engine(tmp_path, tiers=("disk",)) as engine:
        pages = [_page(10 + i) for i in range(4)]
        keys = [engine.object_key(f"d{i}") for i in range(4)]
        assert engine.write_chunks_from(keys, [_token_major(p) for p in pages]) == [True] * 4
        path = tmp_path / "disk" / keys[1]
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        elif damage == "truncate":
            del data[-100:]
        else:  # another model's object under this name
            with make_engine(tmp_path / "other", tiers=("disk",), model="other") as other:
                other.write_chunks_from([other.object_key("d1")], [_token_major(pages[1])])
                data = bytearray((tmp_path / "other" / "disk" / other.object_key("d1")).read_bytes())
        path.write_bytes(bytes(data))
        assert engine.objects._mapped_reads() is mapped
        if reads == "cold-direct":
            for f in (tmp_path / "disk").rglob("*"):
                if f.is_file():
                    _drop(f)

        out = [np.zeros_like(p) for p in pages]
        assert engine.read_chunks_into(keys, [_token_major(o) for o in out], prefix=True) == [True, False, False, False]
        assert np.array_equal(out[0], pages[0])
        assert not any(o.any() for o in out[1:]), "a page at or after the miss was written"
        assert engine.counters.get("retrieve_corrupt", 0) >= 1 or damage == "truncate"

        out = [np.zeros_like(p) for p in pages]
        assert engine.read_chunks_into(keys, [_token_major(o) for o in out]) == [True, False, True, True]
        assert not out[1].any() and all(np.array_equal(o, p) for o, p in zip(out[2:], pages[2:]))
        if reads == "cold-direct" and _cached(path) is not None and engine.store.tiers[0].cold_direct_reads:
            assert direct_reads, "no object was read with O_DIRECT"


def test_read_into_rejects_bad_destinations(tmp_path: Path) -> None:
    with make_engine(tmp_path, tiers=("disk",)) as engine:
        key = engine.object_key("x")
        assert engine.write_chunks_from([key], [_token_major(_page(3))]) == [True]
        readonly = np.zeros(LAYOUT.chunk_bytes, dtype=np.uint8)
        readonly.flags.writeable = False
        assert engine.read_chunks_into([key, key], [readonly, np.zeros(5, dtype=np.uint8)]) == [False, False]
        assert engine.counters["retrieve_rejected"] == 2
        with pytest.raises(ValueError, match="destinations"):
            engine.read_chunks_into([key], [])


@pytest.mark.parametrize("tiers", [("disk",), ("memory", "disk")])
def test_reused_object_buffers_never_change_a_stored_object(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    """Encoded objects are built in recycled buffers where the store is done with them once put
    returns (one disk tier); with write_through to a lower tier the background put still holds
    its buffer, which must then not be recycled: every object on disk stays intact."""
    with make_engine(tmp_path, tiers=tiers) as engine:
        batches = [[_page(100 * b + i) for i in range(6)] for b in range(4)]
        for b, pages in enumerate(batches):
            keys = [engine.object_key(f"r{b}-{i}") for i in range(6)]
            assert engine.write_chunks_from(keys, [_token_major(p) for p in pages]) == [True] * 6
        recycled = len(engine.objects._free_buffers)
        assert (recycled > 0) == (tiers == ("disk",))
        engine.flush()
    with make_engine(tmp_path, tiers=("disk",)) as reader:  # the disk alone, after a restart
        for b, pages in enumerate(batches):
            keys = [reader.object_key(f"r{b}-{i}") for i in range(6)]
            out = [np.zeros_like(p) for p in pages]
            assert reader.read_chunks_into(keys, [_token_major(o) for o in out]) == [True] * 6
            assert all(np.array_equal(o, p) for o, p in zip(out, pages))


@pytest.mark.parametrize("direct_reads", [False, True], ids=["mmap", "direct"])
def test_disk_sections_are_sliced_in_place_from_the_header_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 direct_reads: bool) -> None:
    """Reading through mmap, a retrieve asks the disk once for every chunk's header (one call,
    one worker hop) and slices every section from those mappings: no call per section. O_DIRECT
    reads return pooled buffers that hold only what was asked, so there every header and
    section is its own read. Bytes and the tier's read counter are the same either way."""
    tokens = np.arange(48)
    kv = random_kv(48, seed=4)
    with make_engine(tmp_path, tiers=("disk",), disk_direct_reads=direct_reads) as engine:
        assert engine.store_kv(tokens, source_of(kv)).result(30) == 3
        disk = engine.store.tiers[0]
        calls: list[str] = []
        inner = disk.get_ranges

        async def counting(key, ranges):  # type: ignore[no-untyped-def]
            calls.append(key)
            return await inner(key, ranges)

        batches: list[int] = []
        inner_many = disk.get_ranges_many

        async def counting_many(requests):  # type: ignore[no-untyped-def]
            batches.append(len(requests))
            return await inner_many(requests)

        monkeypatch.setattr(disk, "get_ranges", counting)
        monkeypatch.setattr(disk, "get_ranges_many", counting_many)
        before = disk.counters.bytes_read
        hit, layers = streamed(engine, tokens)
        assert hit == 48 and layers is not None
        for layer in range(LAYOUT.num_layers):
            assert np.array_equal(layers[layer][0], kv[layer][0]) and np.array_equal(layers[layer][1], kv[layer][1])
        chunks = len(engine.keys(tokens))
        assert batches[0] == chunks  # the headers, asked together
        assert batches[1:] == ([1] * chunks * LAYOUT.num_layers if direct_reads else [])
        assert len(calls) == (chunks * (1 + LAYOUT.num_layers) if direct_reads else 0)
        from streamkv.format import header_size
        assert disk.counters.bytes_read - before == chunks * (header_size(LAYOUT.num_layers) + LAYOUT.chunk_bytes)


@pytest.mark.parametrize("tiers", [("disk",), ("memory",), ("memory", "disk")])
def test_local_objects_are_read_on_the_lanes_without_a_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tiers: tuple[str, ...]) -> None:
    """Objects in this host's tiers are read by the worker lanes that verify them (Store.reader_now),
    not by a get per object through the loop; a disk hit under a memory tier is still promoted."""
    with make_engine(tmp_path, tiers=tiers) as engine:
        pages = [_page(200 + i) for i in range(6)]
        keys = [engine.object_key(f"l{i}") for i in range(6)]
        assert engine.write_chunks_from(keys, [_token_major(p) for p in pages]) == [True] * 6
        engine.flush()
        if tiers == ("memory", "disk"):  # half of them on disk only
            memory = engine.store.tiers[0]
            for k in keys[::2]:
                assert engine.runtime.call(memory.delete, k)

        async def no_gets(key: str) -> None:
            raise AssertionError(f"a get of {key}")

        monkeypatch.setattr(engine.store, "get", no_gets)
        out = [np.zeros_like(p) for p in pages]
        assert engine.read_chunks_into(keys, [_token_major(o) for o in out], prefix=True) == [True] * 6
        assert all(np.array_equal(o, p) for o, p in zip(out, pages))
        engine.flush()
        assert all(engine.store.tiers[0].exists_now(k) for k in keys)  # promoted back into memory


def test_disk_reader_buffers_are_reused_and_a_vanished_file_is_a_miss(tmp_path: Path) -> None:
    """Small objects are read into pooled buffers that come back once the caller drops them."""
    import gc

    from streamkv.store import DiskStore

    async def go() -> None:
        disk = DiskStore(tmp_path, 1 << 24)
        blobs = {f"{'a' * 32}/{i:032x}": np.random.default_rng(i).bytes(100_000 + i) for i in range(20)}
        for k, v in blobs.items():
            await disk.put(k, v)
        for _ in range(3):
            for k, v in blobs.items():
                got = await anyio.to_thread.run_sync(disk.reader_now(k))
                assert bytes(memoryview(got)) == v
                del got
                gc.collect()
        assert disk._read_buffers.created <= 2  # one buffer size (rounded), reused
        k = next(iter(blobs))
        reader = disk.reader_now(k)
        (tmp_path / k).unlink()
        assert await anyio.to_thread.run_sync(reader) is None

    anyio.run(go)


def test_coalesced_views_share_memory_and_copy_alike() -> None:
    from streamkv.chunk_objects import _coalesced

    pool = np.zeros((2, 4 * C, LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_size), dtype=np.uint16)
    page = pool[:, C : 2 * C].transpose(2, 0, 1, 3, 4)  # a host-pool page, layer-first
    merged = _coalesced(page)
    assert merged.shape == (LAYOUT.num_layers, 2, C, LAYOUT.num_kv_heads * LAYOUT.head_size)
    assert np.shares_memory(merged, pool)
    src = np.random.default_rng(0).integers(0, 2**16, page.shape, dtype=np.uint16)
    np.copyto(merged, src.reshape(merged.shape))
    assert np.array_equal(page, src) and not pool[:, :C].any() and not pool[:, 2 * C :].any()
    flat = np.zeros((LAYOUT.num_layers, 64), dtype=np.uint8)
    assert _coalesced(flat) is flat  # nothing to merge: the array itself
