"""The daemon over a real S3 API (moto's server): chunks written through to S3 survive
a daemon restart with an empty memory tier and come back byte for byte."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("moto")
pytest.importorskip("obstore")

from tests.daemon_helpers import DaemonProcess, engine, expected_prefix, retrieve, short_tmp, store  # noqa: E402
from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY, MotoS3  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmp()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_daemon_with_an_s3_tier_serves_hits_after_restart(root: Path) -> None:
    with MotoS3() as s3:
        bucket = s3.create_bucket()
        env = {"STREAMKV_S3_ACCESS_KEY_ID": ACCESS_KEY, "STREAMKV_S3_SECRET_ACCESS_KEY": SECRET_KEY,
               "STREAMKV_S3_REGION": REGION}
        d = DaemonProcess(root, "--tiers", "memory,s3", "--s3-url", f"s3://{bucket}/kv",
                          "--s3-endpoint", s3.endpoint, env=env).start()
        try:
            with engine(d.socket) as eng:
                assert store(eng, 61, 3) == 3
            with d.client() as c:
                c.flush()
                assert all(t == ["memory", "s3"] for t in c.lookup(c.list_keys())["tiers"])
                health = c.health()
                assert health["ok"] and [t["tier"] for t in health["tiers"]] == ["memory", "s3"]
            assert d.stop(signal.SIGTERM) == 0
            d.start()  # empty memory tier: the hit comes from S3
            with engine(d.socket) as eng:
                hit, layers = retrieve(eng, 61, 3)
                assert hit == 48 and layers is not None
                assert all(np.array_equal(a, b) for a, b in zip(layers, expected_prefix(61, 3, 48)))
        finally:
            d.stop()
