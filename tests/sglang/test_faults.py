"""Failures stay inside the backend: SGLang's threads see False / None / a shorter hit, never an
exception and never wrong bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageFailureInjector  # noqa: E402

from streamkv.adapters.sglang import StreamKVStorage  # noqa: E402

from .controller import backup, prefetch  # noqa: E402
from .pools import fill_random, mha_pool, mla_pool, page_hashes, page_kv  # noqa: E402


def _object_path(extra: dict, backend: StreamKVStorage, key: str) -> Path:
    """Where the disk tier keeps the object of one SGLang page (``<disk_dir>/<namespace>/<name>``)."""
    return Path(extra["disk_dir"]) / backend.engine.object_key(key)


def _written(extra: dict, make_backend: Any, n: int, salt: str,
             mla: bool = False) -> tuple[Any, torch.Tensor, list[str]]:
    pool = (mla_pool if mla else mha_pool)(page_size=4)
    fill_random(pool, seed=11)
    writer = make_backend(extra, pool, mla=mla)
    idx = pool.alloc(n * pool.page_size)
    keys = page_hashes(n, salt)
    assert writer.batch_set_v1(keys, idx) == [True] * n
    writer.flush()
    return pool, idx, keys


def test_sglang_failure_injector_around_our_backend(extra: dict, make_backend: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE / _RANDOM_DELAY wrap the backend in SGLang's
    HiCacheStorageFailureInjector; every page SGLang counts as loaded must hold the right bytes."""
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE", "0.4")
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_DELAY", "0.002")
    src = mha_pool(page_size=4, tokens=256)
    fill_random(src, seed=21)
    backend = make_backend(extra, src)
    assert isinstance(backend, HiCacheStorageFailureInjector)
    P = src.page_size
    stored_rounds = loaded_pages = 0
    for r in range(16):
        zero_copy = r % 2 == 0
        keys = page_hashes(3, f"inject-{r}")
        idx = src.alloc(3 * P)
        stored = backup(backend, src, keys, idx, zero_copy)
        stored_rounds += stored
        hits = backend.batch_exists(keys)
        assert 0 <= hits <= 3
        into = src.alloc(3 * P)
        loaded = prefetch(backend, src, keys, into, zero_copy)
        assert loaded <= (3 if stored else 0)
        for i in range(loaded):
            assert torch.equal(page_kv(src, int(idx[i * P])), page_kv(src, int(into[i * P])))
        loaded_pages += loaded
        src.free(into)
    assert 0 < stored_rounds < 16  # the injector did fail some calls and let others through
    assert loaded_pages > 0


def test_corrupt_object_on_disk_is_a_miss_and_ends_the_hit(extra: dict, make_backend: Any) -> None:
    src, idx, keys = _written(extra, make_backend, 4, "corrupt")
    reader_pool = mha_pool(page_size=4)
    reader = make_backend(extra, reader_pool)
    path = _object_path(extra, reader, keys[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in a layer section
    path.write_bytes(bytes(data))

    reader = make_backend(extra, reader_pool)  # a fresh process: nothing cached in memory
    assert reader.batch_exists(keys) == 4  # the object is there; only reading it finds the damage
    into = reader_pool.alloc(4 * 4)
    assert reader.batch_get_v1(keys, into) == [True, False, False, False]
    assert torch.equal(page_kv(src, int(idx[0])), page_kv(reader_pool, int(into[0])))
    for i in (1, 2, 3):
        assert not page_kv(reader_pool, int(into[i * 4])).any(), f"page {i} was written after a corrupt page"
    assert prefetch(reader, reader_pool, keys, into, zero_copy=False) == 1
    assert reader.stats()["engine"].get("retrieve_corrupt", 0) >= 1


def test_truncated_and_foreign_objects_are_misses(extra: dict, make_backend: Any) -> None:
    _written(extra, make_backend, 2, "foreign", mla=False)
    reader_pool = mha_pool(page_size=4)
    reader = make_backend(extra, reader_pool)
    keys = page_hashes(2, "foreign")
    truncated = _object_path(extra, reader, keys[0])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    # Another model's object under this model's name: same size, other namespace in its header.
    other_pool, _, other_keys = _written(extra, make_backend, 1, "other-model")
    other = make_backend(extra, other_pool, model="org/other")
    assert other.batch_set_v1(other_keys, other_pool.alloc(4)) == [True]
    other.flush()
    shutil.copyfile(_object_path(extra, other, other_keys[0]), _object_path(extra, reader, keys[1]))

    reader = make_backend(extra, reader_pool)
    assert reader.batch_get_v1(keys[:1], reader_pool.alloc(4)) == [False]
    assert reader.batch_get_v1(keys[1:], reader_pool.alloc(4)) == [False]


def test_failing_disk_tier_returns_false(extra: dict, make_backend: Any) -> None:
    pool = mha_pool(page_size=4)
    fill_random(pool)
    backend = make_backend(extra, pool)
    disk = Path(extra["disk_dir"])
    shutil.rmtree(disk)
    disk.write_bytes(b"not a directory")  # every write under it now fails with an OSError
    keys = page_hashes(2, "dead-disk")
    assert backend.batch_set_v1(keys, pool.alloc(8)) == [False, False]
    assert backend.batch_set(keys, [pool.get_data_page(0), pool.get_data_page(4)]) is False
    assert backend.batch_exists(keys) == 0
    assert backend.stats()["sglang"]["pages_write_failed"] == 4
    os.unlink(disk)


def test_bad_calls_are_counted_not_raised(extra: dict, make_backend: Any) -> None:
    pool = mha_pool(page_size=4)
    backend = make_backend(extra, pool)
    keys = page_hashes(2, "bad")
    assert backend.batch_get_v1(keys, torch.arange(5)) == [False, False]  # 5 slots for 2 pages of 4
    assert backend.batch_set_v1(keys, torch.arange(3)) == [False, False]
    assert backend.batch_set(keys, [torch.zeros(3)]) is False
    assert backend.get(keys[0], torch.zeros(7)) is None
    counts = backend.stats()["sglang"]
    assert counts["errors.batch_get_v1"] == 1 and counts["errors.batch_set_v1"] == 1


def test_calls_before_a_host_pool_is_registered(extra: dict) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from .pools import storage_config

    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
    keys = page_hashes(1, "early")
    assert backend.batch_exists(keys) == 0
    assert backend.exists(keys[0]) is False
    assert backend.batch_get(keys, None) == [None]
    assert backend.batch_set_v1(keys, torch.arange(4)) == [False]
    backend.close()
