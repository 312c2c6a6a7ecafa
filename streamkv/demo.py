"""``streamkv demo``: a real model answers a workload twice, cold then from the cache.

SmolLM2-135M (float32, CPU) replays a small multi-turn chat and long-document
trace. Cold: every prompt is computed (and its KV stored). Warm: the same
prompts again, served from the memory tier, then from the disk tier alone by
a fresh engine (as after a restart). Each row compares time to first token
and checks that the generated tokens are identical."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from streamkv.config import StreamKVConfig, default_cache_dir
from streamkv.traces import TraceRequest, prompt_tokens, read_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "traces" / "demo.jsonl"


@dataclass
class DemoRow:
    request: int
    session: str
    prompt_tokens: int
    hit_tokens: int
    ttft_cold_s: float
    ttft_warm_s: float
    ttft_warm_disk_s: float
    outputs_identical: bool

    @property
    def speedup(self) -> float:
        return self.ttft_cold_s / self.ttft_warm_s if self.ttft_warm_s > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "speedup": round(self.speedup, 2)}


def scaled(requests: list[TraceRequest], max_prompt_tokens: int | None) -> list[TraceRequest]:
    """Scale context lengths so the longest prompt has ``max_prompt_tokens`` tokens."""
    if not max_prompt_tokens:
        return requests
    longest = max(r.prompt_len for r in requests)
    factor = max_prompt_tokens / longest
    return [dataclasses.replace(r, context_tokens=max(1, int(r.context_tokens * factor))) for r in requests]


def run_demo(cache_dir: Path | None = None, trace: Path = DEFAULT_TRACE, max_prompt_tokens: int | None = None,
             new_tokens: int | None = None, progress: bool = True) -> list[DemoRow]:
    from streamkv.adapters.transformers import CachedModel
    from streamkv.adapters.transformers.smollm2 import load_smollm2
    from streamkv.fingerprint import fingerprint_model

    requests = scaled(read_trace(trace), max_prompt_tokens)
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "demo"
    config = StreamKVConfig(disk_dir=str(root / "disk"), memory_gb=2.0, disk_gb=8.0)
    bar = tqdm(total=3 * len(requests) + 1, desc="loading SmolLM2", disable=not progress, unit="step")
    model, _ = load_smollm2("float32")
    fingerprint = fingerprint_model(model)
    bar.update()
    vocab = int(model.config.vocab_size)
    prompts = [prompt_tokens(r, vocab) for r in requests]
    outputs = [new_tokens or r.output_tokens for r in requests]
    cold, warm, disk = [], [], []
    with CachedModel(model, config, fingerprint=fingerprint) as cm:
        cm.engine.clear()  # a cold pass starts from an empty cache for this model
        bar.set_description("cold: computing every prompt")
        for ids, n in zip(prompts, outputs):
            cold.append(cm.generate(ids, max_new_tokens=n, reuse=False))
            bar.update()
        cm.engine.flush()
        bar.set_description("warm: from the memory tier")
        for ids, n in zip(prompts, outputs):
            warm.append(cm.generate(ids, max_new_tokens=n, store=False))
            bar.update()
    with CachedModel(model, config.replace(tiers=("disk",)), fingerprint=fingerprint) as cm:
        bar.set_description("warm: disk tier, fresh engine")
        for ids, n in zip(prompts, outputs):
            disk.append(cm.generate(ids, max_new_tokens=n, store=False))
            bar.update()
    bar.close()
    return [
        DemoRow(i, r.session, len(p), w.hit_tokens, c.ttft_s, w.ttft_s, d.ttft_s,
                c.tokens == w.tokens == d.tokens)
        for i, (r, p, c, w, d) in enumerate(zip(requests, prompts, cold, warm, disk))
    ]


def format_table(rows: list[DemoRow]) -> str:
    head = ["#", "session", "prompt", "hit", "TTFT cold", "TTFT warm", "TTFT disk", "speed-up", "identical"]
    lines = [
        [str(r.request), r.session, str(r.prompt_tokens), str(r.hit_tokens), f"{r.ttft_cold_s * 1e3:.0f} ms",
         f"{r.ttft_warm_s * 1e3:.0f} ms", f"{r.ttft_warm_disk_s * 1e3:.0f} ms", f"{r.speedup:.1f}x",
         "yes" if r.outputs_identical else "NO"]
        for r in rows
    ]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])
