"""SGLang ranks are separate processes: with ``"mode": "daemon"`` they share one ``streamkv serve``.

The daemon is a real subprocess (tests/daemon_helpers.py). An MLA model's rank 0 writes, rank 1
(another backend, another engine) reads at once: no shared-directory index to rebuild."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402

from tests.daemon_helpers import DaemonProcess, short_tmp  # noqa: E402

from .conftest import LOAD_KEYS  # noqa: E402
from .pools import fill_random, mla_pool, page_hashes, page_kv  # noqa: E402


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    proc = DaemonProcess(short_tmp()).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_mla_ranks_share_pages_through_the_daemon(daemon: DaemonProcess, make_backend: Any) -> None:
    extra = {**LOAD_KEYS, "interface_v1": 1, "mode": "daemon", "socket": daemon.socket}
    src = mla_pool(page_size=4)
    fill_random(src, seed=41)
    rank0 = make_backend(extra, src, mla=True, tp_rank=0, tp_size=2)
    pool1 = mla_pool(page_size=4)
    rank1 = make_backend(extra, pool1, mla=True, tp_rank=1, tp_size=2)
    keys = page_hashes(3, "daemon")
    assert rank1.batch_exists(keys) == 0
    idx = src.alloc(12)
    assert rank0.batch_set_v1(keys, idx) == [True] * 3
    assert rank1.batch_exists(keys) == 3
    into = pool1.alloc(12)
    assert rank1.batch_get_v1(keys, into) == [True] * 3
    for i in range(3):
        assert torch.equal(page_kv(src, int(idx[i * 4])), page_kv(pool1, int(into[i * 4])))
    assert Path(daemon.disk).exists()
