"""Preemption with vLLM's real Scheduler and a small block budget.

Two requests prefill in 256-token steps and then decode until the pool runs out, so
the scheduler preempts one (its blocks go to the other). Saves copy out of the pages
within their step, so a preempted request's freed blocks are never read for a save;
afterwards a new request with each prefix loads it, and the loaded pages equal the
pages vLLM's CPU kernel writes for those tokens directly."""

from __future__ import annotations

import torch

from tests.vllm.vllm_helpers import make_kv_cache_config, make_kv_caches, make_request, make_vllm_config, prompt_tokens
from tests.vllm.vllm_sim import Sim


def _expected_pages(sim: Sim, kvc, prompt: list[int], n_tokens: int) -> list[bytes]:
    """Pages holding ``prompt[:n_tokens]`` at blocks 0.., written directly (no streamkv)."""
    scratch = make_kv_caches(kvc, seed=5)
    pos = torch.arange(n_tokens, dtype=torch.int64)
    toks = torch.tensor(prompt[:n_tokens], dtype=torch.int64)
    saved, sim.caches = sim.caches, scratch
    try:
        for li, name in enumerate(sim.layer_names):
            sim._write(li, scratch[name], pos.clone(), pos, toks)
        return sim.page_bytes(list(range(n_tokens // sim.block_size)))
    finally:
        sim.caches = saved


def test_preempted_request_stores_only_valid_kv(model_dir, store_extra):
    cfg = make_vllm_config(model_dir, store_extra, max_num_batched_tokens=256)
    kvc = make_kv_cache_config(52, 32)
    sim = Sim(cfg, kvc)
    try:
        a_prompt, b_prompt = prompt_tokens(600, seed=41), prompt_tokens(800, seed=42)
        sim.add(make_request("A", a_prompt, max_tokens=200))
        sim.add(make_request("B", b_prompt, max_tokens=200))
        sim.run_until_done(max_steps=600)
        preempted = set().union(*(so.preempted_req_ids or set() for so, _ in sim.outputs))
        assert preempted, "the block budget should force a preemption"
        saves = [(s.req_id, s.first_chunk) for so, _ in sim.outputs for s in so.kv_connector_metadata.saves]
        # Each full prompt chunk is saved once, even across preemption and resume.
        assert sorted(saves) == [("A", 0), ("A", 1), ("B", 0), ("B", 1), ("B", 2)]
        # The preempted request came back through a load of its own stored chunks.
        resumed_loads = [(l.req_id, l.start, l.end) for so, _ in sim.outputs for l in so.kv_connector_metadata.loads]
        assert resumed_loads and all(end % 256 == 0 and rid in preempted for rid, _, end in resumed_loads)
        sim.flush()
        sim.scramble_pages()

        for name, prompt in (("C", a_prompt), ("D", b_prompt)):
            req = make_request(name, prompt[:512] + prompt_tokens(30, seed=43), max_tokens=2)
            assert sim.sched_conn.get_num_new_matched_tokens(req, 0) == (512, False)
            sim.add(req)
            got = {}

            def grab(so, name=name):
                for layer in sim.layer_names:
                    sim.worker.wait_for_layer_load(layer)
                got["pages"] = sim.page_bytes(sim.block_ids(name)[:16])

            sim.before_forward_hook = grab
            sim.step()
            sim.before_forward_hook = None
            assert sim.load_errors[-1] == set()
            assert got["pages"] == _expected_pages(sim, kvc, prompt, 512)
            sim.run_until_done()
    finally:
        sim.close()
