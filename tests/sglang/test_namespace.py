"""SGLang's page hashes cover tokens only: everything else that changes the KV bytes must miss.

Each test stores a page as one rank/model and asks for the same page hash as another."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

import torch  # noqa: E402

from .pools import fill_random, mha_pool, mla_pool, page_hashes, page_kv  # noqa: E402


def _store(make_backend: Any, extra: dict, pool: Any, keys: list[str], **rank: Any) -> Any:
    fill_random(pool, seed=len(keys))
    backend = make_backend(extra, pool, **rank)
    assert backend.batch_set_v1(keys, pool.alloc(len(keys) * pool.page_size)) == [True] * len(keys)
    backend.flush()
    return backend


@pytest.mark.parametrize(
    "reader_pool,reader_rank",
    [
        (lambda: mha_pool(), {"model": "org/model-b"}),  # another model
        (lambda: mha_pool(dtype=torch.float16), {}),  # another KV dtype, same size
        (lambda: mha_pool(), {"tp_rank": 0, "tp_size": 2}),  # another TP size
        (lambda: mha_pool(), {"tp_rank": 1, "tp_size": 2}),  # another TP rank
        (lambda: mha_pool(), {"pp_rank": 1, "pp_size": 2}),  # another PP stage
        (lambda: mha_pool(page_size=8), {}),  # another page size
        (lambda: mha_pool(heads=1, head_dim=16), {}),  # another head shape, same bytes per token
    ],
    ids=["model", "kv_dtype", "tp_size", "tp_rank", "pp", "page_size", "heads"],
)
def test_same_hash_elsewhere_is_a_miss(reader_pool: Any, reader_rank: dict, extra: dict, make_backend: Any) -> None:
    keys = page_hashes(3, "ns")
    _store(make_backend, extra, mha_pool(), keys, tp_rank=0, tp_size=1)
    same = make_backend(extra, mha_pool())
    assert same.batch_exists(keys) == 3  # control: the identical rank hits
    other_pool = reader_pool()
    other = make_backend(extra, other_pool, **reader_rank)
    assert other.batch_exists(keys) == 0
    assert other.batch_get_v1(keys, other_pool.alloc(3 * other_pool.page_size)) == [False] * 3


def test_model_fingerprint_separates_same_named_models(extra: dict, make_backend: Any) -> None:
    keys = page_hashes(2, "fp")
    _store(make_backend, {**extra, "model_fingerprint": "rev-1"}, mha_pool(), keys)
    assert make_backend({**extra, "model_fingerprint": "rev-1"}, mha_pool()).batch_exists(keys) == 2
    assert make_backend({**extra, "model_fingerprint": "rev-2"}, mha_pool()).batch_exists(keys) == 0


def test_mla_rank_zero_writes_and_every_rank_reads(extra: dict, make_backend: Any) -> None:
    """MLA KV is replicated across TP ranks: one shared copy, written by the storage writer only."""
    keys = page_hashes(4, "mla")
    src = mla_pool()
    fill_random(src, seed=5)
    rank0 = make_backend(extra, src, mla=True, tp_rank=0, tp_size=2)
    src_idx = src.alloc(4 * src.page_size)
    assert rank0.batch_set_v1(keys[:3], src_idx[: 3 * src.page_size]) == [True] * 3
    rank0.flush()

    pool1 = mla_pool()
    fill_random(pool1, seed=6)
    rank1 = make_backend(extra, pool1, mla=True, tp_rank=1, tp_size=2)
    assert not rank1.writer
    # A non-writer reports success (SGLang must not retry) but stores nothing.
    assert rank1.batch_set_v1(keys[3:], pool1.alloc(pool1.page_size)) == [True]
    assert rank1.batch_set(keys[3:], [pool1.get_data_page(0)]) is True
    assert rank1.batch_exists(keys) == 3
    assert rank0.batch_exists(keys) == 3
    assert rank1.stats()["sglang"]["pages_skipped_not_writer"] == 2

    into = pool1.alloc(3 * pool1.page_size)
    assert rank1.batch_get_v1(keys[:3], into) == [True] * 3
    P = src.page_size
    for i in range(3):
        assert torch.equal(page_kv(src, int(src_idx[i * P])), page_kv(pool1, int(into[i * P])))

    # MLA pages do not depend on the TP size either: a TP=4 deployment reads them too.
    rank_tp4 = make_backend(extra, mla_pool(), mla=True, tp_rank=3, tp_size=4)
    assert rank_tp4.batch_exists(keys) == 3


def test_mha_and_mla_pages_never_mix(extra: dict, make_backend: Any) -> None:
    keys = page_hashes(2, "mix")
    _store(make_backend, extra, mha_pool(), keys)
    assert make_backend(extra, mla_pool(), mla=True).batch_exists(keys) == 0
