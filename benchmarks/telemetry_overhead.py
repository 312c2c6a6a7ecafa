"""Telemetry overhead on the cache-hit path: exporter none (default) vs metrics vs file.

One engine per mode (memory tier, SmolLM2's KV layout, float32), the same
prompt stored in each; a request is ``retrieve`` + ``wait`` for every layer,
with no model compute in between, so the retrieve is as short as it gets and
the overhead as large a share as it gets. Modes are interleaved round by
round so machine noise hits them alike. On a shared machine wall times
swing by tens of percent, so the overhead is stated three ways: median and
10th-percentile wall time per request, and process CPU time per request (all
threads: the telemetry work done on the loop thread after a request returns is
counted too), which other tenants do not inflate.

- ``none``: the default; the hooks in the core see ``telemetry.active`` is False.
- ``metrics``: an SDK meter with an in-memory reader (what a Prometheus scrape costs
  on the request path), no spans.
- ``file``: spans and metrics to a JSON-lines file (batch span processor).

``--model`` also measures SmolLM2's cache-hit TTFT (prefix from the memory tier
plus a 32-token suffix computed) with exporter none and file, to state the
overhead as a share of a real TTFT. Prints a table, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.telemetry import Telemetry

MODES = ("none", "metrics", "file")


def make_telemetry(mode: str, workdir: Path) -> Telemetry:
    if mode == "none":
        return Telemetry.disabled()
    if mode == "metrics":
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        return Telemetry(metric_readers=[InMemoryMetricReader()])
    cfg = StreamKVConfig(telemetry_exporter="file", telemetry_file=str(workdir / "telemetry.jsonl"))
    return Telemetry.create(cfg)


def source(layout: KVLayout, n: int) -> Callable[[int], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    planes = [rng.standard_normal((n, layout.num_kv_heads, layout.head_size)).astype(np.float32) for _ in range(2)]
    return lambda layer: planes


def one_request(engine: StreamKVEngine, tokens: np.ndarray, layers: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one retrieve + wait for every layer."""
    cpu, start = time.process_time(), time.perf_counter()
    handle = engine.retrieve(tokens)
    assert handle.hit_tokens > 0
    for layer in range(layers):
        handle.wait(layer)
    return time.perf_counter() - start, time.process_time() - cpu


def synthetic(prompt: int, rounds: int, per_round: int, workdir: Path, progress: bool) -> dict[str, Any]:
    layout = KVLayout(num_layers=30, num_kv_heads=3, head_size=64, dtype="float32", chunk_size=256)
    config = StreamKVConfig(chunk_size=256, tiers=("memory",), memory_gb=1.0, compression="off")
    tokens = np.arange(prompt, dtype=np.int64) + 1000
    engines, tels = {}, {}
    for mode in MODES:
        tels[mode] = make_telemetry(mode, workdir)
        engines[mode] = StreamKVEngine(config, layout, Namespace("overhead-bench", layout), telemetry=tels[mode])
        engines[mode].store_kv(tokens, source(layout, prompt)).result()
        one_request(engines[mode], tokens, layout.num_layers)  # warm-up
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for r in tqdm(range(rounds), desc="hit path, interleaved modes", disable=not progress):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            for _ in range(per_round):
                w, c = one_request(engines[mode], tokens, layout.num_layers)
                wall[mode].append(w)
                cpu[mode].append(c)
    for mode in MODES:
        engines[mode].close()
        if mode != "none":
            tels[mode].shutdown()
    stats = {
        "median_wall_s": {m: statistics.median(wall[m]) for m in MODES},
        "p10_wall_s": {m: float(np.percentile(wall[m], 10)) for m in MODES},
        "mean_cpu_s": {m: statistics.fmean(cpu[m]) for m in MODES},
    }
    return {
        "prompt_tokens": prompt, "hit_tokens": prompt // 256 * 256, "layers": layout.num_layers,
        "requests_per_mode": rounds * per_round, **stats,
        "overhead_pct": {k: {m: 100 * (v[m] - v["none"]) / v["none"] for m in MODES} for k, v in stats.items()},
    }


def direct_cost(mode: str, workdir: Path, layers: int = 30, chunks: int = 8, repeats: int = 300) -> float:
    """CPU seconds per request of the telemetry work alone, as the core does it for one hit.

    One request's hooks are replayed against a real ``RetrieveHandle``: the recorder,
    the context binding, a ``streamkv.tier.get`` span per chunk header, the suppressed
    ``tier_span`` check per section read, the per-layer stamps, and the emission of the
    span tree and histograms; exporters included (span export is flushed inside the
    timed loop). The same loop without any telemetry call is subtracted. Noise from
    other tenants cannot make this figure, which is why it backs the overhead claim."""
    import contextvars
    from concurrent.futures import Future

    from opentelemetry import context as otel_context

    from streamkv.pipeline.handle import RetrieveHandle
    from streamkv.telemetry import retrieve_recorder, suppress_tier_spans

    tel = make_telemetry(mode, workdir) if mode != "bare" else Telemetry.disabled()
    done: Future[None] = Future()
    done.set_result(None)
    tokens = list(range(chunks * 256))

    async def task() -> None:
        return None

    def sections() -> None:
        suppress_tier_spans()
        for _ in range(layers * chunks):
            tel.tier_span("get", "ns/key")

    def one() -> None:
        handle = RetrieveHandle(layers, 256, chunks)
        if mode == "bare":
            handle.set_hit(chunks)
            for layer in range(layers):
                handle.layer_done(layer)
            for layer in range(layers):
                handle.wait(layer)
            return
        rec = handle.trace = retrieve_recorder(tel, handle, tokens, "ns", {})
        ctx = rec.context if rec is not None else None
        tel.bind(task, ctx)
        token = otel_context.attach(ctx) if ctx is not None else None
        for _ in range(chunks):
            span = tel.tier_span("get", "ns/key")
            if span is not None:
                tel.end_tier_span(span, "memory", 4096, "hit")
        handle.set_hit(chunks)
        contextvars.copy_context().run(sections)
        for layer in range(layers):
            if rec is not None:
                rec.layer_fetch(layer)
            handle.layer_done(layer)
        if token is not None:
            otel_context.detach(token)
        for layer in range(layers):
            handle.wait(layer)
            if rec is not None:
                rec.layer_taken(layer)
        if rec is not None:
            rec.producer_done(done)

    for _ in range(20):
        one()
    start = time.process_time()
    for _ in range(repeats):
        one()
    tel.force_flush()
    cost = (time.process_time() - start) / repeats
    if mode not in ("bare", "none"):
        tel.shutdown()
    return cost


def direct(workdir: Path, layers: int, chunks: int) -> dict[str, float]:
    """Per-request telemetry CPU cost by mode (median of 3 interleaved measurements, bare subtracted)."""
    runs: dict[str, list[float]] = {m: [] for m in ("bare", *MODES)}
    for _ in range(3):
        for mode in runs:
            runs[mode].append(direct_cost(mode, workdir, layers, chunks))
    bare = statistics.median(runs["bare"])
    return {m: max(0.0, statistics.median(runs[m]) - bare) for m in MODES}


def model_ttft(prefix: int, rounds: int, workdir: Path, progress: bool) -> dict[str, Any]:
    """SmolLM2 cache-hit TTFT (memory tier): exporter none twice (the noise floor) and file."""
    import torch

    from streamkv.adapters.transformers import CachedModel
    from streamkv.adapters.transformers.session import layout_for
    from streamkv.adapters.transformers.smollm2 import load_smollm2
    from streamkv.fingerprint import fingerprint_model

    model, _ = load_smollm2("float32")
    fp = fingerprint_model(model)
    ids = torch.randint(1000, 40000, (prefix + 32,), generator=torch.Generator().manual_seed(prefix))
    config = StreamKVConfig(tiers=("memory",), memory_gb=1.0)
    layout = layout_for(model, config.chunk_size)
    arms = ("none", "none_again", "file")
    cms = {}
    for arm in arms:
        tel = make_telemetry("file" if arm == "file" else "none", workdir)
        engine = StreamKVEngine(config, layout, Namespace(fp, layout), telemetry=tel)
        cms[arm] = CachedModel(model, config, engine=engine)
        cms[arm].prefill(ids, reuse=False).stored.result()
        cms[arm].prefill(ids, store=False)  # warm-up
    ttft: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in tqdm(range(rounds), desc="SmolLM2 hit TTFT", disable=not progress):
        for arm in arms[r % 3:] + arms[: r % 3]:
            ttft[arm].append(cms[arm].prefill(ids, store=False).ttft_s)
    for arm, cm in cms.items():
        tel = cm.engine.telemetry
        cm.close()
        if arm == "file":
            tel.shutdown()
    med = {a: statistics.median(v) for a, v in ttft.items()}
    low = {a: float(np.percentile(v, 10)) for a, v in ttft.items()}
    return {"prefix_tokens": prefix, "rounds": rounds, "median_ttft_s": med, "p10_ttft_s": low,
            "pct_vs_none_median": {a: 100 * (med[a] - med["none"]) / med["none"] for a in arms},
            "pct_vs_none_p10": {a: 100 * (low[a] - low["none"]) / low["none"] for a in arms}}


def table(result: dict[str, Any]) -> str:
    d = result["direct_cpu_s"]
    lines = [f"telemetry work per cache-hit request ({result['hit_tokens']} tokens x 30 layers), CPU: "
             + ", ".join(f"{m} {d[m] * 1e6:.0f} us" for m in MODES)]
    s = result["synthetic"]
    pct = s["overhead_pct"]
    lines += [f"hit path (retrieve + wait, no compute), {s['requests_per_mode']} requests per mode; "
              "vs none in brackets:",
              f"{'mode':<8} {'median wall':>20} {'p10 wall':>20} {'mean CPU':>20}"]
    for m in MODES:
        cells = [f"{s[k][m] * 1e3:7.2f}ms ({pct[k][m]:+6.1f}%)" for k in ("median_wall_s", "p10_wall_s", "mean_cpu_s")]
        lines.append(f"{m:<8} " + " ".join(f"{c:>20}" for c in cells))
    if "model" in result:
        m = result["model"]
        lines.append(f"SmolLM2 hit TTFT ({m['prefix_tokens']}+32 tokens), median / p10 (vs none):")
        for arm in m["median_ttft_s"]:
            lines.append(f"  {arm:<11} {m['median_ttft_s'][arm] * 1e3:7.1f} ms ({m['pct_vs_none_median'][arm]:+5.1f}%)"
                         f" / {m['p10_ttft_s'][arm] * 1e3:7.1f} ms ({m['pct_vs_none_p10'][arm]:+5.1f}%)")
        for mode in MODES:
            lines.append(f"  telemetry work as a share of the median hit TTFT, {mode}: "
                         f"{result['share_of_hit_ttft_pct'][mode]:.3f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamkv bench telemetry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--model", action="store_true", help="also measure SmolLM2's cache-hit TTFT (none vs file)")
    p.add_argument("--model-rounds", type=int, default=12)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    chunks = args.prompt_tokens // 256
    with tempfile.TemporaryDirectory(prefix="streamkv-telemetry-") as tmp:
        result: dict[str, Any] = {"benchmark": "telemetry_overhead", "hit_tokens": chunks * 256,
                                  "direct_cpu_s": direct(Path(tmp), 30, chunks),
                                  "synthetic": synthetic(args.prompt_tokens, args.rounds, args.per_round,
                                                         Path(tmp), not args.json)}
        if args.model:
            result["model"] = m = model_ttft(args.prompt_tokens, args.model_rounds, Path(tmp), not args.json)
            result["share_of_hit_ttft_pct"] = {
                mode: 100 * result["direct_cpu_s"][mode] / m["median_ttft_s"]["none"] for mode in MODES}
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
