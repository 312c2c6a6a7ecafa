"""The engine over memory → disk → S3 (a real moto server), configured as a user would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.errors import ConfigError
from streamkv.keys import Namespace
from tests.engine_helpers import LAYOUT, random_kv, source_of, streamed
from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Bucket


def s3_config(bucket: S3Bucket, tmp: Path, **kw) -> StreamKVConfig:  # type: ignore[no-untyped-def]
    values = dict(chunk_size=LAYOUT.chunk_size, disk_dir=str(tmp / "disk"), memory_gb=0.01, disk_gb=0.01,
                  s3_url=bucket.url, s3_endpoint=bucket.endpoint, s3_region=REGION,
                  s3_access_key_id=ACCESS_KEY, s3_secret_access_key=SECRET_KEY, s3_timeout_s=5.0)
    values.update(kw)
    return StreamKVConfig(**values)


def test_replicas_share_kv_through_the_bucket(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    tokens = np.arange(64)
    kv = random_kv(64, seed=9)
    ns = Namespace("tiny", LAYOUT)
    cfg = s3_config(s3_bucket, tmp_path / "a")
    assert cfg.tiers == ("memory", "disk", "s3")
    with StreamKVEngine(cfg, LAYOUT, ns) as writer:
        assert writer.store_kv(tokens, source_of(kv)).result() == 4
        writer.flush()
    assert len(s3_bucket.object_keys()) == 4
    # another replica: its own memory and disk are empty, the bucket is shared
    with StreamKVEngine(s3_config(s3_bucket, tmp_path / "b"), LAYOUT, ns) as reader:
        assert reader.lookup(tokens) == 64
        hit, layers = streamed(reader, tokens)
        assert hit == 64 and layers is not None
        for layer, (k, v) in enumerate(kv):
            assert np.array_equal(layers[layer][0], k) and np.array_equal(layers[layer][1], v)
        reader.flush()
        assert reader.where(reader.keys(tokens))[0] == ["memory", "disk", "s3"]  # promoted on hit


def test_missing_bucket_fails_at_construction(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    cfg = s3_config(s3_bucket, tmp_path, s3_url=f"s3://no-such-bucket-{s3_bucket.name}/x")
    with pytest.raises(ConfigError):
        StreamKVEngine(cfg, LAYOUT, Namespace("tiny", LAYOUT))
