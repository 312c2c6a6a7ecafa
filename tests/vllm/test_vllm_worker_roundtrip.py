"""Worker half on CPU tensors in vLLM's real paged layouts: save, then load, bytes equal.

Pages are allocated by vLLM's own ``create_kv_cache_views``; request A's KV is written
by vLLM's CPU kernel (``cpu_attn_reshape_and_cache``) or through the logical view
(GPU-packed K|V, MLA latent), saved through ``save_kv_layer`` for every layer. Request
B shares A's first two chunks: it loads them through ``start_load_kv`` +
``wait_for_layer_load`` into other blocks, which must equal A's pages byte for byte."""

from __future__ import annotations

import pytest
from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.vllm.vllm_helpers import make_kv_cache_config, make_request, make_vllm_config, prompt_tokens
from tests.vllm.vllm_sim import Sim

CASES = {
    "mha-cpu-LBHNC": dict(writer="cpu_kernel", layout=KVCacheLayout.LBHNC, mla=False, backend=None),
    "mha-gpu-packed-LBNHC": dict(writer="packed", layout=KVCacheLayout.LBNHC, mla=False, backend="FLASH_ATTN"),
    "mha-gpu-packed-BLNHC": dict(writer="packed", layout=KVCacheLayout.BLNHC, mla=False, backend="FLASH_ATTN"),
    "mla-latent": dict(writer="latent", layout=KVCacheLayout.LBHNC, mla=True, backend=None),
    # vLLM splits each 32-token scheduler block into two 16-token kernel blocks.
    "mha-cpu-kernel-blocks-16": dict(writer="cpu_kernel", layout=KVCacheLayout.LBHNC, mla=False, backend=None,
                                     kernel_block_size=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_then_load_gives_identical_pages(case, model_dir, store_extra):
    c = CASES[case]
    extra = dict(store_extra)
    if c["backend"]:
        extra["attn_backend"] = c["backend"]
    cfg = make_vllm_config(model_dir, extra)
    kvc = make_kv_cache_config(96, 32, mla=c["mla"], num_layers=8 if c["mla"] else 30)
    sim = Sim(cfg, kvc, writer=c["writer"], layout=c["layout"], seed=1,
              kernel_block_size=c.get("kernel_block_size"))
    try:
        prompt = prompt_tokens(600, seed=11)
        sim.add(make_request("A", prompt, max_tokens=2))
        sim.step()
        a_pages = sim.page_bytes(sim.block_ids("A")[:16])  # tokens 0..511: two chunks
        sim.run_until_done()
        sim.flush()
        sim.scramble_pages()  # whatever B reads back can only come from the store

        sim.add(make_request("B", prompt[:512] + prompt_tokens(90, seed=12), max_tokens=1))
        loaded = {}

        def check_after_load(so):
            # Before B's own forward writes anything: the loaded pages only.
            for name in sim.layer_names:
                sim.worker.wait_for_layer_load(name)
            loaded["pages"] = sim.page_bytes(sim.block_ids("B")[:16])

        sim.before_forward_hook = check_after_load
        so, _ = sim.step()
        assert so.num_scheduled_tokens["B"] == 602 - 512  # 512 tokens came from streamkv
        assert sim.load_errors[-1] == set()
        assert loaded["pages"] == a_pages
        stats = sim.outputs[-1][1].kv_connector_output.kv_connector_stats
        assert stats is not None and stats.data["loaded_tokens"] == 512
        sim.run_until_done()
    finally:
        sim.close()


def test_whole_request_async_load(model_dir, store_extra):
    """``load_mode=async``: the load runs between steps and ``get_finished`` reports it."""
    cfg = make_vllm_config(model_dir, dict(store_extra, load_mode="async"))
    sim = Sim(cfg, make_kv_cache_config(96, 32), seed=2)
    try:
        prompt = prompt_tokens(600, seed=13)
        sim.add(make_request("A", prompt, max_tokens=2))
        sim.step()
        a_pages = sim.page_bytes(sim.block_ids("A")[:16])
        sim.run_until_done()
        sim.flush()
        sim.scramble_pages()

        b = make_request("B", prompt[:512] + prompt_tokens(90, seed=14), max_tokens=2)
        assert sim.sched_conn.get_num_new_matched_tokens(b, 0) == (512, True)
        sim.add(b)
        seen = {}

        def first_forward_of_b(so):
            if "B" in so.num_scheduled_tokens and "pages" not in seen:
                seen["pages"] = sim.page_bytes(sim.block_ids("B")[:16])
                seen["scheduled"] = so.num_scheduled_tokens["B"]

        sim.before_forward_hook = first_forward_of_b
        sim.run_until_done()
        recving = [r for _, mro in sim.outputs for r in (mro.kv_connector_output.finished_recving or ())]
        assert recving == ["B"]
        assert seen["scheduled"] == 602 - 512
        assert seen["pages"] == a_pages
        assert not any(sim.load_errors)
    finally:
        sim.close()


def test_hit_ending_inside_the_last_chunk(model_dir, store_extra):
    """A prompt that is exactly two chunks loads all but its last block (vLLM computes that)."""
    sim = Sim(make_vllm_config(model_dir, store_extra), make_kv_cache_config(96, 32), seed=3)
    try:
        prompt = prompt_tokens(600, seed=15)
        sim.add(make_request("A", prompt, max_tokens=2))
        sim.step()
        a_pages = sim.page_bytes(sim.block_ids("A")[:15])
        sim.run_until_done()
        sim.flush()
        sim.scramble_pages()
        sim.add(make_request("B", prompt[:512], max_tokens=2))
        seen = {}

        def grab(so):
            for name in sim.layer_names:
                sim.worker.wait_for_layer_load(name)
            seen["pages"] = sim.page_bytes(sim.block_ids("B")[:15])

        sim.before_forward_hook = grab
        so, _ = sim.step()
        [load] = so.kv_connector_metadata.loads
        assert (load.start, load.end) == (0, 480) and so.num_scheduled_tokens["B"] == 32
        assert seen["pages"] == a_pages and sim.load_errors[-1] == set()
        sim.before_forward_hook = None
        sim.run_until_done()
    finally:
        sim.close()
