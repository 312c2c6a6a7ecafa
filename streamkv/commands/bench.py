"""``streamkv bench NAME``: one entry point for every benchmark.

The scripts live beside the package in the repository (benchmarks/, not part
of the installed library); each has ``main(argv)``, prints a table, and
``--json`` prints JSON instead. ``streamkv bench e2e --trace FILE`` is the
trace replay built in here: it needs only the library, SmolLM2 and a trace,
and writes a ``--report`` folder of PNGs drawn from the run's own spans."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamkv.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
BENCHMARKS = {
    "e2e": "e2e_ttft.py",
    "keys": "keys.py",
    "tiers": "tiers.py",
    "pipeline": "pipeline.py",
    "daemon": "daemon.py",
    "telemetry": "telemetry_overhead.py",
    "sglang": "sglang_backend.py",
    "vllm": "vllm_connector.py",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints a table; --json for JSON)",
                       description="NAME is one of: " + ", ".join(sorted(BENCHMARKS)) +
                       ". `streamkv bench e2e --trace traces/chat.jsonl` replays a workload trace.")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    argv = list(args.args)
    if args.name == "e2e" and any(a == "--trace" or a.startswith("--trace=") for a in argv):
        return trace_main(argv)
    return run_script(args.name, argv)


def run_script(name: str, argv: list[str]) -> int:
    path = BENCH_DIR / BENCHMARKS[name]
    if not path.exists():
        raise ConfigError("bench", name, f"{path} is not here (benchmarks ship with the repository)")
    spec = importlib.util.spec_from_file_location(f"streamkv_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


# -- streamkv bench e2e --trace --------------------------------------------------------
def trace_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="streamkv bench e2e --trace",
                                description="Replay a workload trace on SmolLM2 without and with streamkv: "
                                            "TTFT p50/p90, tokens saved, hit rate.")
    p.add_argument("--trace", type=Path, required=True, help="JSONL trace (see traces/README.md)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--tiers", default="memory", help="comma-separated tiers (default memory)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--report", type=Path, default=None, help="folder for results.json, spans.jsonl and PNGs")
    p.add_argument("--workdir", type=Path, default=None, help="disk tier folder (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamkv-bench-") as tmp:
        result, spans = replay_trace(args.trace, chunk_size=args.chunk_size, tiers=args.tiers,
                                     limit=args.limit, dtype=args.dtype, workdir=args.workdir or Path(tmp),
                                     progress=not args.json)
    if args.report is not None:
        from streamkv.report import write_e2e_report

        result["report"] = [str(p) for p in write_e2e_report(result, spans, args.report)]
    print(json.dumps(result, indent=2) if args.json else trace_table(result))
    return 0 if result["summary"]["first_tokens_identical"] else 1


def replay_trace(trace: Path, *, chunk_size: int = 256, tiers: str = "memory", limit: int | None = None,
                 dtype: str = "float32", workdir: Path, progress: bool = True,
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each request in trace order: the plain model (cold), then the model through streamkv
    (warm: reuse what earlier requests stored, store what is new). Returns the result
    and the spans of the streamkv side (for the stall timeline)."""
    import torch
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from tqdm import tqdm

    from streamkv.adapters.transformers import CachedModel
    from streamkv.adapters.transformers.session import layout_for
    from streamkv.adapters.transformers.smollm2 import load_smollm2
    from streamkv.config import StreamKVConfig
    from streamkv.engine import StreamKVEngine
    from streamkv.fingerprint import fingerprint_model
    from streamkv.keys import Namespace
    from streamkv.report import percentile
    from streamkv.telemetry import Telemetry, span_to_dict
    from streamkv.traces import prompt_tokens, read_trace, reusable_tokens

    requests = read_trace(trace)[:limit]
    if not requests:
        raise ConfigError("trace", str(trace), "has no requests to replay")
    bar = tqdm(total=2 * len(requests) + 1, desc="loading SmolLM2", unit="step", disable=not progress)
    model, _ = load_smollm2(dtype)
    vocab = int(model.config.vocab_size)
    config = StreamKVConfig(chunk_size=chunk_size, tiers=tuple(t for t in tiers.split(",") if t),
                            disk_dir=str(workdir / "disk"), memory_gb=2.0, disk_gb=8.0)
    layout = layout_for(model, chunk_size)
    exporter = InMemorySpanExporter()
    tel = Telemetry(span_exporters=[exporter], batch=False)
    engine = StreamKVEngine(config, layout, Namespace(model=fingerprint_model(model), layout=layout), telemetry=tel)
    prompts = [torch.as_tensor(prompt_tokens(r, vocab)) for r in requests]
    reusable = reusable_tokens(requests, chunk_size)
    with torch.inference_mode():
        model(prompts[0][:16].unsqueeze(0), use_cache=True)  # first-call allocations out of the timings
    bar.update()
    rows = []
    with CachedModel(model, config, engine=engine) as cm:
        for i, (req, ids) in enumerate(zip(requests, prompts)):
            bar.set_description(f"request {i + 1}/{len(requests)}: without streamkv")
            with torch.inference_mode():
                start = time.perf_counter()
                cold_logits = model(ids.unsqueeze(0), use_cache=True).logits[:, -1, :]
                cold_s = time.perf_counter() - start
            bar.update()
            bar.set_description(f"request {i + 1}/{len(requests)}: with streamkv")
            with tel.tracer.start_as_current_span("bench.request", attributes={"bench.request": i}):
                warm = cm.prefill(ids)
            if warm.stored is not None:
                warm.stored.result()  # the next request sees this one's chunks
            bar.update()
            rows.append({
                "request": i, "session": req.session, "kind": req.kind, "prompt_tokens": len(ids),
                "hit_tokens": warm.hit_tokens, "reusable_tokens": reusable[i],
                "ttft_cold_s": cold_s, "ttft_warm_s": warm.ttft_s,
                "first_token_identical": bool(torch.equal(cold_logits.argmax(-1), warm.logits.argmax(-1))),
            })
        engine.flush()
    bar.close()
    tel.force_flush()
    spans = [span_to_dict(s) for s in exporter.get_finished_spans()]
    tel.shutdown()
    _attach_stalls(rows, spans)
    prompt_total = sum(r["prompt_tokens"] for r in rows)
    saved = sum(r["hit_tokens"] for r in rows)
    summary = {
        "requests": len(rows), "prompt_tokens": prompt_total, "tokens_saved": saved,
        "hit_rate": saved / prompt_total if prompt_total else 0.0,
        "reusable_tokens": sum(reusable), "ttft_cold_p50_s": percentile((r["ttft_cold_s"] for r in rows), 50),
        "ttft_cold_p90_s": percentile((r["ttft_cold_s"] for r in rows), 90),
        "ttft_warm_p50_s": percentile((r["ttft_warm_s"] for r in rows), 50),
        "ttft_warm_p90_s": percentile((r["ttft_warm_s"] for r in rows), 90),
        "first_tokens_identical": all(r["first_token_identical"] for r in rows),
    }
    result = {"benchmark": "e2e_trace", "trace": str(trace), "chunk_size": chunk_size, "tiers": list(config.tiers),
              "model": "SmolLM2-135M-Instruct", "dtype": dtype, "summary": summary, "requests": rows}
    return result, spans


def _attach_stalls(rows: list[dict[str, Any]], spans: list[dict[str, Any]]) -> None:
    """Each row's consumer stall, from its retrieve span (child of its bench.request span)."""
    request_of = {s["span_id"]: s["attributes"]["bench.request"] for s in spans if s["name"] == "bench.request"}
    for span in spans:
        if span["name"] == "streamkv.retrieve" and span["parent_span_id"] in request_of:
            row = rows[request_of[span["parent_span_id"]]]
            row["stall_s"] = row.get("stall_s", 0.0) + float(span["attributes"].get("streamkv.stall_s", 0.0))


def trace_table(result: dict[str, Any]) -> str:
    head = f"{'#':>3} {'session':<10} {'prompt':>6} {'hit':>6} {'cold':>8} {'warm':>8} {'stall':>7} {'x':>5}"
    lines = [head, "-" * len(head)]
    for r in result["requests"]:
        lines.append(f"{r['request']:>3} {r['session'][:10]:<10} {r['prompt_tokens']:>6} {r['hit_tokens']:>6} "
                     f"{r['ttft_cold_s'] * 1e3:>6.0f}ms {r['ttft_warm_s'] * 1e3:>6.0f}ms "
                     f"{r.get('stall_s', 0.0) * 1e3:>5.1f}ms {r['ttft_cold_s'] / max(r['ttft_warm_s'], 1e-9):>4.1f}x")
    s = result["summary"]
    lines += ["", f"TTFT p50 {s['ttft_cold_p50_s'] * 1e3:.0f} ms -> {s['ttft_warm_p50_s'] * 1e3:.0f} ms, "
                  f"p90 {s['ttft_cold_p90_s'] * 1e3:.0f} ms -> {s['ttft_warm_p90_s'] * 1e3:.0f} ms; "
                  f"{s['tokens_saved']} of {s['prompt_tokens']} prompt tokens from the cache "
                  f"(hit rate {s['hit_rate']:.0%}, ideal {s['reusable_tokens'] / max(s['prompt_tokens'], 1):.0%}); "
                  f"first tokens identical: {s['first_tokens_identical']}"]
    return "\n".join(lines)
