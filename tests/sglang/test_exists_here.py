"""``batch_exists`` (and the set path's "already stored?") answered on SGLang's thread from the
tiers' in-memory indexes (``engine.exists_now``), without a hop onto the engine's event loop;
the engine is asked only where a tier cannot answer here."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("sglang", reason="needs the sglang environment (.venv-sglang, `make test-sglang`)")

from .pools import fill_random, mha_pool, page_hashes  # noqa: E402


def _no_engine_lookups(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any lookup through the engine fail loudly (the backend would turn it into a 0)."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("asked the engine")

    monkeypatch.setattr(backend.engine, "exists_many", refuse)
    monkeypatch.setattr(backend.engine, "exists_prefix", refuse)


@pytest.mark.parametrize("tiers", ["disk", "memory,disk", "memory"])
def test_fresh_instance_answers_from_the_indexes(tiers: str, extra: dict, make_backend: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    extra.update(tiers=tiers, memory_gb=0.05, exists_cache_ttl_s=0)  # no existence cache either
    pool = mha_pool(page_size=4)
    fill_random(pool, seed=5)
    writer = make_backend(extra, pool)
    keys = page_hashes(6, f"local-{tiers}")
    assert writer.batch_set_v1(keys[:4], pool.alloc(16)) == [True] * 4
    writer.flush()

    reader = writer if tiers == "memory" else make_backend(extra, pool)  # a restart sees the disk
    _no_engine_lookups(reader, monkeypatch)
    assert reader.batch_exists(keys) == 4
    assert reader.batch_exists(keys[1:3]) == 2
    assert reader.batch_exists(keys[4:]) == 0
    assert reader.exists(keys[0]) and not reader.exists(keys[5])
    assert reader.stats()["sglang"]["exists_answered_locally"] >= 7
    assert "errors.batch_exists" not in reader.stats()["sglang"]
    # the set path's "already stored?" question too: nothing is written again
    assert reader.batch_set_v1(keys[:4], pool.alloc(16)) == [True] * 4
    assert reader.stats()["sglang"]["pages_already_stored"] == 4


def test_a_page_another_process_wrote_is_found_on_disk(extra: dict, make_backend: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes share one disk_dir: pages the other wrote after this one indexed the
    directory are not in its index, but their files are (the disk tier's own exists does so)."""
    extra["exists_cache_ttl_s"] = 0
    pool = mha_pool(page_size=4)
    fill_random(pool, seed=6)
    reader = make_backend(extra, pool)
    other = make_backend(extra, pool)
    keys = page_hashes(3, "other-process")
    assert other.batch_set_v1(keys, pool.alloc(12)) == [True] * 3
    _no_engine_lookups(reader, monkeypatch)
    assert reader.batch_exists(keys) == 3


def test_tiers_that_cannot_answer_here_go_through_the_engine(extra: dict, make_backend: Any) -> None:
    """A key no in-process tier holds is "unknown" when a tier that cannot answer here (S3, the
    daemon) is configured: batch_exists then asks the engine, which asks every tier."""
    extra.update(tiers="memory", exists_cache_ttl_s=0)
    pool = mha_pool(page_size=4)
    fill_random(pool, seed=7)
    backend = make_backend(extra, pool)
    keys = page_hashes(3, "unknown-here")
    assert backend.batch_set_v1(keys[:2], pool.alloc(8)) == [True] * 2
    asked: list[list[str]] = []
    engine = backend.engine
    exists_prefix = engine.exists_prefix
    engine.store.tiers[0].exists_now = lambda key: None  # as S3's tier answers
    engine.exists_prefix = lambda ks: asked.append(list(ks)) or exists_prefix(ks)
    assert backend.batch_exists(keys) == 2
    assert len(asked) == 1 and len(asked[0]) == 3
