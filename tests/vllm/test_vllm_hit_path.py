"""What keeps a fresh-engine hit fast on a small CPU, and vLLM's Prometheus hook.

- streamkv's threads in a CPU worker run off the cores vLLM bound its OpenMP team to
  (else they inherit the forward's single core: ``cpu_threads.py``);
- a load from a slower tier is copied up into the faster tiers only once the load is
  over (the store's own promote-on-hit copies whole objects while the forward waits
  for their sections), and not at all when the user turned promotion off;
- ``build_prom_metrics`` feeds ``vllm:streamkv_*`` metrics through vLLM's real
  ``PrometheusStatLogger``.
"""

from __future__ import annotations

import os
import threading
import time

import anyio
import pytest

from streamkv.adapters.vllm.cpu_threads import helper_cpus, omp_bound_cpus, online_cpus, parse_cpu_ids
from tests.vllm.vllm_helpers import make_kv_cache_config, make_request, make_vllm_config, prompt_tokens
from tests.vllm.vllm_sim import Sim


# -- thread placement -----------------------------------------------------------------
def test_parse_openmp_binding_strings():
    assert parse_cpu_ids("{0,1}") == {0, 1}  # OMP_PLACES as vLLM writes it
    assert parse_cpu_ids("0 1 4-6") == {0, 1, 4, 5, 6}  # GOMP_CPU_AFFINITY
    assert parse_cpu_ids("granularity=fine,explicit,proclist=[2,3]") == {2, 3}  # KMP_AFFINITY
    assert omp_bound_cpus({"OMP_PLACES": "{3}"}) == {3}
    assert omp_bound_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[0,7]"}) == {0, 7}
    assert omp_bound_cpus({}) == set()


def test_helper_cpus_are_the_cores_openmp_does_not_use():
    assert helper_cpus(omp={0}, online={0, 1}) == {1}  # vLLM reserved core 1
    assert helper_cpus(omp={0, 1}, online={0, 1}) == {0, 1}  # the team has all: let the OS choose
    assert helper_cpus(omp=set(), online={0, 1}) is None  # no binding (GPU worker): leave alone


@pytest.fixture
def bound_like_a_cpu_worker(monkeypatch):
    """This thread pinned to one core and OMP_PLACES naming it, as vLLM's CPU worker is."""
    allowed = os.sched_getaffinity(0)
    if len(allowed & online_cpus()) < 2:
        pytest.skip("needs two CPUs")
    core = min(allowed)
    monkeypatch.setenv("OMP_PLACES", f"{{{core}}}")
    os.sched_setaffinity(0, {core})
    try:
        yield core, (allowed & online_cpus()) - {core}
    finally:
        os.sched_setaffinity(0, allowed)


def test_worker_threads_run_off_the_openmp_core(bound_like_a_cpu_worker, model_dir, store_extra):
    core, others = bound_like_a_cpu_worker
    sim = Sim(make_vllm_config(model_dir, store_extra), make_kv_cache_config(96, 32))
    try:
        side = sim.worker.worker_side
        assert side.helper_cpus == others
        assert os.sched_getaffinity(0) == {core}  # the forward's own thread is untouched

        async def loop_thread_mask() -> set[int]:
            return os.sched_getaffinity(0)

        async def io_thread_mask() -> set[int]:  # a thread the loop starts for tier I/O
            return await anyio.to_thread.run_sync(os.sched_getaffinity, 0)

        assert side.engine.runtime.call(loop_thread_mask) == others
        assert side.engine.runtime.call(io_thread_mask) == others
        for pool in (side._copy_pool, side._wait_pool, side._write_pool):
            assert pool.submit(os.sched_getaffinity, 0).result() == others
    finally:
        sim.close()


# -- promotion after the load ---------------------------------------------------------
def _store_prefix(model_dir, extra) -> list[int]:
    sim = Sim(make_vllm_config(model_dir, extra), make_kv_cache_config(96, 32), seed=3)
    try:
        prompt = prompt_tokens(600, seed=41)
        sim.add(make_request("A", prompt, max_tokens=2))
        sim.run_until_done()
        sim.flush()
    finally:
        sim.close()
    return prompt


class _PutLog:
    """Wraps a tier's ``put``: when each key arrived."""

    def __init__(self, tier) -> None:
        self.times: dict[str, float] = {}
        inner = tier.put

        async def put(key, data):
            self.times[key] = time.perf_counter()
            return await inner(key, data)

        tier.put = put


def test_disk_hit_is_promoted_after_its_load(model_dir, store_extra):
    prompt = _store_prefix(model_dir, store_extra)
    sim = Sim(make_vllm_config(model_dir, store_extra), make_kv_cache_config(96, 32), seed=4)  # fresh memory
    try:
        side = sim.worker.worker_side
        memory = side.engine.store.tiers[0]
        puts = _PutLog(memory)
        loaded_at = {}

        def after_layers(so):  # the forward has every layer; the load ends at wait_for_save
            for name in sim.layer_names:
                sim.worker.wait_for_layer_load(name)
            time.sleep(0.3)  # a promotion racing the load would have put by now
            loaded_at["t"] = time.perf_counter()

        sim.before_forward_hook = after_layers
        sim.add(make_request("B", prompt[:512] + prompt_tokens(40, seed=42), max_tokens=1))
        so, _ = sim.step()
        [load] = so.kv_connector_metadata.loads
        keys = load.rank_keys[0]
        assert (load.start, load.end) == (0, 512) and sim.load_errors[-1] == set()
        sim.run_until_done()
        sim.flush()
        assert set(puts.times) == set(keys)
        assert min(puts.times.values()) > loaded_at["t"], "objects were copied up while the forward ran"
        assert all(side.engine.runtime.call(memory.exists, k) for k in keys)
        reported = [o.kv_connector_output.kv_connector_stats for _, o in sim.outputs] + [side.stats.take()]
        assert sum(s.data["promoted_chunks"] for s in reported if s is not None) == len(keys)
        assert sum(s.data["promoted_bytes"] for s in reported if s is not None) > 0

        # The next load of that prefix in this engine reads the memory tier: nothing to copy up.
        puts.times.clear()
        sim.add(make_request("C", prompt[:512] + prompt_tokens(40, seed=43), max_tokens=1))
        sim.before_forward_hook = None
        sim.run_until_done()
        sim.flush()
        assert not puts.times
    finally:
        sim.close()


def test_no_promotion_when_the_user_turned_it_off(model_dir, store_extra):
    extra = dict(store_extra, promote_on_hit=False)
    prompt = _store_prefix(model_dir, extra)
    sim = Sim(make_vllm_config(model_dir, extra), make_kv_cache_config(96, 32), seed=5)
    try:
        side = sim.worker.worker_side
        assert side.promote_after_load is False and side.engine.store.promote is False
        puts = _PutLog(side.engine.store.tiers[0])
        sim.add(make_request("B", prompt[:512] + prompt_tokens(40, seed=44), max_tokens=1))
        sim.run_until_done()
        sim.flush()
        assert sim.outputs[0][1].kv_connector_output.kv_connector_stats.data["loaded_tokens"] == 512
        assert not puts.times
    finally:
        sim.close()


def test_async_load_is_promoted_after_it_is_reported(model_dir, store_extra):
    extra = dict(store_extra, load_mode="async")
    prompt = _store_prefix(model_dir, extra)
    sim = Sim(make_vllm_config(model_dir, extra), make_kv_cache_config(96, 32), seed=6)
    try:
        side = sim.worker.worker_side
        memory = side.engine.store.tiers[0]
        puts = _PutLog(memory)
        finished = {}
        get_finished = side.get_finished

        def spy(ids):
            called = time.perf_counter()
            sending, recving = get_finished(ids)
            if recving and "t" not in finished:
                finished["t"] = called  # the call that found the load done
            return sending, recving

        side.get_finished = spy
        sim.add(make_request("B", prompt[:512] + prompt_tokens(40, seed=45), max_tokens=1))
        sim.run_until_done()
        sim.flush()
        assert len(puts.times) == 2 and min(puts.times.values()) > finished["t"]
    finally:
        sim.close()


# -- Prometheus ---------------------------------------------------------------------------
def test_prometheus_metrics_through_vllms_stat_logger(model_dir, store_extra):
    from prometheus_client import REGISTRY, generate_latest
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    from streamkv.adapters.vllm.stats import StreamKVConnectorStats

    cfg = make_vllm_config(model_dir, store_extra)
    logger = PrometheusStatLogger(cfg, engine_indexes=[0])
    try:
        assert type(logger.kv_connector_prom.prom_metrics).__name__ == "StreamKVPromMetrics"
        for _ in range(2):
            data = StreamKVConnectorStats(data={"loads": 1, "loaded_tokens": 512, "loaded_bytes": 1 << 20,
                                                "hit_tokens": 512, "load_s": [0.004], "save_s": [0.02, 3.0]})
            logger.record(scheduler_stats=SchedulerStats(kv_connector_stats=data.to_dict()),
                          iteration_stats=None, engine_idx=0)
        labels = {"model_name": str(cfg.model_config.served_model_name), "engine": "0"}

        def value(name: str, **extra: str) -> float | None:
            return REGISTRY.get_sample_value(name, dict(labels, **extra))

        assert value("vllm:streamkv_loaded_tokens_total") == 1024
        assert value("vllm:streamkv_hit_tokens_total") == 1024
        assert value("vllm:streamkv_loads_total") == 2
        assert value("vllm:streamkv_saved_bytes_total") == 0
        assert value("vllm:streamkv_load_seconds_bucket", le="0.005") == 2
        assert value("vllm:streamkv_save_seconds_count") == 4
        assert value("vllm:streamkv_save_seconds_bucket", le="2.5") == 2
        assert "vllm:streamkv_promoted_bytes_total" in generate_latest(REGISTRY).decode()
    finally:
        from vllm.v1.metrics.prometheus import unregister_vllm_metrics

        unregister_vllm_metrics()


def test_thread_names_unchanged():
    """pin_threads finds the loop's I/O threads by anyio's thread name."""
    async def name() -> str:
        return await anyio.to_thread.run_sync(lambda: threading.current_thread().name)

    assert anyio.run(name).startswith("AnyIO worker thread")
