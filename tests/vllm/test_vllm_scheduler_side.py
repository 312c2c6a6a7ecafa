"""Scheduler half with a real VllmConfig, real Requests and vLLM's real Scheduler."""

from __future__ import annotations

import pytest

from tests.vllm.vllm_helpers import make_kv_cache_config, make_request, make_vllm_config, prompt_tokens
from tests.vllm.vllm_sim import Sim

CHUNK = 256


@pytest.fixture
def sim(model_dir, store_extra):
    s = Sim(make_vllm_config(model_dir, store_extra), make_kv_cache_config(160, 32))
    yield s
    s.close()


def _store_prompt(sim: Sim, req_id: str, prompt: list[int]) -> None:
    sim.add(make_request(req_id, prompt, max_tokens=2))
    sim.run_until_done()
    sim.flush()


def test_connector_is_built_from_vllm_config(sim):
    conn = sim.sched_conn
    assert type(conn).__name__ == "StreamKVConnector"
    assert conn.layout.chunk_size == CHUNK and conn.layout.num_layers == 30
    assert conn.layout.num_kv_heads == 3 and conn.layout.head_size == 64
    assert conn.requires_kv_delivery is False
    assert type(conn).requires_piecewise_for_cudagraph({}) is True
    assert type(conn).requires_piecewise_for_cudagraph({"load_mode": "async"}) is False


def test_matched_tokens_for_stored_prefix(sim):
    prompt = prompt_tokens(600, seed=1)
    _store_prompt(sim, "A", prompt)
    same_prefix = make_request("B", prompt[:512] + prompt_tokens(100, seed=2))
    assert sim.sched_conn.get_num_new_matched_tokens(same_prefix, 0) == (512, False)
    # Tokens vLLM already has locally are not counted again.
    assert sim.sched_conn.get_num_new_matched_tokens(same_prefix, 64) == (448, False)
    assert sim.sched_conn.get_num_new_matched_tokens(same_prefix, 512) == (0, False)
    # A prompt diverging inside chunk 1 only hits chunk 0.
    diverged = prompt[:300] + prompt_tokens(300, seed=3)
    assert sim.sched_conn.get_num_new_matched_tokens(make_request("C", diverged), 0) == (256, False)


def test_unknown_prompt_and_partial_chunk_never_match(sim):
    prompt = prompt_tokens(600, seed=1)
    _store_prompt(sim, "A", prompt)
    assert sim.sched_conn.get_num_new_matched_tokens(make_request("U", prompt_tokens(700, seed=9)), 0) == (0, False)
    # 600 stored tokens = 2 full chunks; the 88-token tail was never stored.
    longer = make_request("L", prompt + prompt_tokens(300, seed=4))
    assert sim.sched_conn.get_num_new_matched_tokens(longer, 0) == (512, False)
    # A prompt of exactly 512 tokens: vLLM must compute its last token, so the hit stops at
    # the last whole block before it (480 = 15 blocks of 32), inside chunk 1.
    exact = make_request("E", prompt[:512])
    assert sim.sched_conn.get_num_new_matched_tokens(exact, 0) == (480, False)


def test_build_connector_meta_carries_blocks_and_slots(sim):
    prompt = prompt_tokens(600, seed=1)
    sim.add(make_request("A", prompt, max_tokens=2))
    so, _ = sim.step()
    meta = so.kv_connector_metadata
    blocks = sim.block_ids("A")
    assert meta.loads == []
    [save] = meta.saves
    assert save.req_id == "A" and save.first_chunk == 0 and len(save.rank_keys[0]) == 2
    assert save.block_ids == blocks[: 512 // 32]
    sim.run_until_done()
    sim.flush()

    sim.add(make_request("B", prompt[:512] + prompt_tokens(100, seed=2), max_tokens=2))
    so, _ = sim.step()
    [load] = so.kv_connector_metadata.loads
    assert (load.req_id, load.start, load.end, load.first_chunk) == ("B", 0, 512, 0)
    assert load.block_ids[:16] == sim.block_ids("B")[:16]
    assert load.rank_keys[0] == save.rank_keys[0]
    # Loaded chunks are not saved again; B's tail is a partial chunk, so nothing to save.
    assert so.kv_connector_metadata.saves == []
    # The scheduler counted the 512 tokens as computed and scheduled only the rest.
    assert so.num_scheduled_tokens["B"] == 612 - 512
    from streamkv.adapters.vllm.paged_layout import slots_for_tokens

    slots = slots_for_tokens(load.block_ids, 32, load.start, load.end)
    assert slots[0].item() == load.block_ids[0] * 32 and slots[-1].item() == load.block_ids[15] * 32 + 31
    sim.run_until_done()


def test_chunked_prefill_saves_each_chunk_once(model_dir, store_extra):
    sim = Sim(make_vllm_config(model_dir, store_extra, max_num_batched_tokens=192), make_kv_cache_config(160, 32))
    try:
        sim.add(make_request("A", prompt_tokens(800, seed=5), max_tokens=2))
        sim.run_until_done()
        saved = [(s.first_chunk, len(s.rank_keys[0])) for so, _ in sim.outputs for s in so.kv_connector_metadata.saves]
        # 800 tokens in 192-token steps: chunk 0 completes at step 2 (384), chunk 1 at step 3 (576),
        # chunk 2 at step 4 (768); the tail never forms a chunk.
        assert saved == [(0, 1), (1, 1), (2, 1)]
    finally:
        sim.close()
