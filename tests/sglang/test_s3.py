"""Replicas share one S3 bucket (a real S3 API: moto's server on 127.0.0.1).

Each "replica" is its own backend with its own memory tier, configured only through
extra_config, exactly as ``--hicache-storage-backend-extra-config`` would carry it."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402

from .conftest import LOAD_KEYS  # noqa: E402
from .controller import backup, prefetch  # noqa: E402
from .pools import fill_random, mha_pool, mla_pool, page_hashes, page_kv  # noqa: E402

pytest.importorskip("obstore", reason="the S3 tier needs the s3 extra (obstore)")


def _s3_extra(bucket: Any, tiers: str) -> dict[str, Any]:
    return {
        **LOAD_KEYS,
        "interface_v1": 1,
        "tiers": tiers,
        "memory_gb": 0.05,
        "s3_url": bucket.url,
        "s3_endpoint": bucket.endpoint,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "s3_timeout_s": 5.0,
        "s3_retries": 1,
    }


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_one_replica_writes_another_hits(kind: str, s3_bucket: Any, make_backend: Any) -> None:
    extra = _s3_extra(s3_bucket, "memory,s3")
    mla = kind == "mla"
    new_pool = mla_pool if mla else mha_pool
    a_pool = new_pool(page_size=4)
    fill_random(a_pool, seed=31)
    replica_a = make_backend(extra, a_pool, mla=mla)
    keys = page_hashes(6, f"s3-{kind}")
    a_idx = a_pool.alloc(6 * 4)
    assert backup(replica_a, a_pool, keys, a_idx, zero_copy=True)
    replica_a.flush()  # the S3 write is write-through, in the background
    assert len(s3_bucket.object_keys()) == 6

    b_pool = new_pool(page_size=4)
    replica_b = make_backend(extra, b_pool, mla=mla)
    assert replica_b.batch_exists(keys) == 6
    b_idx = b_pool.alloc(6 * 4)
    assert prefetch(replica_b, b_pool, keys, b_idx, zero_copy=True) == 6
    for i in range(6):
        assert torch.equal(page_kv(a_pool, int(a_idx[i * 4])), page_kv(b_pool, int(b_idx[i * 4])))
    # B now holds the pages in its own memory tier too (promoted on hit).
    assert replica_b.stats()["sglang"]["pages_read"] == 6


def test_other_model_in_the_same_bucket_misses(s3_bucket: Any, make_backend: Any) -> None:
    extra = _s3_extra(s3_bucket, "s3")
    pool = mha_pool(page_size=4)
    fill_random(pool)
    keys = page_hashes(2, "s3-ns")
    writer = make_backend(extra, pool, model="org/a")
    assert writer.batch_set_v1(keys, pool.alloc(8)) == [True, True]
    assert make_backend(extra, mha_pool(page_size=4), model="org/b").batch_exists(keys) == 0
    assert make_backend(extra, mha_pool(page_size=4), model="org/a").batch_exists(keys) == 2


def test_corrupt_object_in_s3_is_a_miss(s3_bucket: Any, make_backend: Any) -> None:
    extra = _s3_extra(s3_bucket, "s3")
    pool = mha_pool(page_size=4)
    fill_random(pool, seed=33)
    keys = page_hashes(3, "s3-corrupt")
    writer = make_backend(extra, pool)
    idx = pool.alloc(12)
    assert writer.batch_set_v1(keys, idx) == [True] * 3
    name = writer.engine.object_key(keys[1]).split("/", 1)[1]
    (s3_key,) = [k for k in s3_bucket.object_keys() if k.endswith(name)]
    client = s3_bucket.server.client()
    body = bytearray(client.get_object(Bucket=s3_bucket.name, Key=s3_key)["Body"].read())
    body[-10] ^= 0xFF
    client.put_object(Bucket=s3_bucket.name, Key=s3_key, Body=bytes(body))

    reader_pool = mha_pool(page_size=4)
    reader = make_backend(extra, reader_pool)
    into = reader_pool.alloc(12)
    assert reader.batch_get_v1(keys, into) == [True, False, False]
    assert torch.equal(page_kv(pool, int(idx[0])), page_kv(reader_pool, int(into[0])))
    assert not page_kv(reader_pool, int(into[4])).any()
