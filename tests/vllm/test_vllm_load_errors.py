"""Load failures: a corrupt chunk's blocks are reported to vLLM, which recomputes them
(``kv_load_failure_policy="recompute"``) or fails the request (``"fail"``); a stopped S3
server makes misses, never an exception out of a connector method."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.v1.request import RequestStatus

from tests.vllm.vllm_helpers import make_kv_cache_config, make_request, make_vllm_config, prompt_tokens
from tests.vllm.vllm_sim import Sim


def _corrupt_chunk(disk_dir: Path, key: str) -> None:
    """Flip bytes in the middle of the object's last layer section (its header stays valid)."""
    path = disk_dir / key
    data = bytearray(path.read_bytes())
    at = len(data) - 1000
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(bytes(data))


def _stored_prefix(model_dir: Path, tmp_path: Path, policy: str) -> tuple[Sim, list[int], list[str]]:
    extra = {"tiers": ["disk"], "disk_dir": str(tmp_path / "disk"), "disk_gb": 1.0}
    sim = Sim(make_vllm_config(model_dir, extra, kv_load_failure_policy=policy), make_kv_cache_config(96, 32))
    prompt = prompt_tokens(600, seed=21)
    sim.add(make_request("A", prompt, max_tokens=2))
    so, _ = sim.step()
    keys = so.kv_connector_metadata.saves[0].rank_keys[0]
    sim.run_until_done()
    sim.flush()
    return sim, prompt, keys


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_corrupt_chunk_blocks_are_reported(policy, model_dir, tmp_path):
    sim, prompt, keys = _stored_prefix(model_dir, tmp_path, policy)
    try:
        _corrupt_chunk(tmp_path / "disk", keys[1])
        b = make_request("B", prompt[:512] + prompt_tokens(50, seed=22), max_tokens=2)
        sim.add(b)
        so, _ = sim.step()
        [load] = so.kv_connector_metadata.loads
        assert (load.start, load.end) == (0, 512)
        # Chunk 0 loaded; chunk 1 (tokens 256..511 = blocks 8..15 of B) failed its checksum.
        assert sim.load_errors[-1] == set(load.block_ids[8:16])
        if policy == "recompute":
            sim.run_until_done()
            assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED
            # vLLM rescheduled the failed tokens: some later step computed from token 256.
            starts = [s for so, _ in sim.outputs[-6:] for s in [so.num_scheduled_tokens.get("B")] if s]
            assert 562 - 256 in starts
        else:
            assert b.status == RequestStatus.FINISHED_ERROR
    finally:
        sim.close()


def test_stopped_s3_server_means_misses(model_dir, tmp_path):
    pytest.importorskip("moto")
    from tests.s3_server import MotoS3  # its own server: this test stops it

    server = MotoS3().start()
    try:
        bucket = server.create_bucket()
        extra = {"tiers": ["s3"], "s3_url": f"s3://{bucket}/kv", "s3_endpoint": server.endpoint,
                 "s3_access_key_id": "testing", "s3_secret_access_key": "testing", "s3_timeout_s": 2.0,
                 "s3_retries": 0}
        sim = Sim(make_vllm_config(model_dir, extra), make_kv_cache_config(96, 32))
        try:
            prompt = prompt_tokens(600, seed=31)
            sim.add(make_request("A", prompt, max_tokens=2))
            sim.run_until_done()
            sim.flush()
            server.stop()
            fresh = make_request("U", prompt_tokens(600, seed=32), max_tokens=2)
            assert sim.sched_conn.get_num_new_matched_tokens(fresh, 0) == (0, False)
            b = make_request("B", prompt[:512] + prompt_tokens(40, seed=33), max_tokens=2)
            sim.add(b)
            sim.run_until_done()  # no exception out of any connector method
            # The scheduler had heard the prefix was saved; the load found S3 gone and
            # reported the blocks, so vLLM recomputed them.
            assert any(sim.load_errors)
            assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED
        finally:
            sim.close()
    finally:
        server.stop()
