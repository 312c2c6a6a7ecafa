"""Layer-wise pipeline: per-layer load vs compute, sequential vs pipelined, overlap efficiency.

KV of ``--tokens`` tokens is stored through the real engine (``StreamKVEngine.store_kv``) in
one tier (memory or disk; disk reads are cold: the page cache is dropped with
``posix_fadvise(DONTNEED)`` before each load). It is then retrieved through the real producer
into an engine-style paged KV pool (vLLM pages ``[blocks, 16, heads, dim]`` in shuffled page
order) by ``PagedPoolSink``. The compute of layer ``l`` is a real transformers
``LlamaDecoderLayer`` (random weights) on ``q`` new tokens plus their attention over the
layer's loaded KV, so compute cannot start before the layer is in place.

* load: retrieve and wait for every layer, nothing else;
* compute: every layer's compute on the loaded pool;
* sequential: load all, then compute all;
* pipelined: wait(layer) then compute(layer), while later layers load;
* overlap efficiency = (sequential - pipelined) / min(load, compute): 1.0 hides the smaller
  of the two completely, 0.0 overlaps nothing.

``--q-tokens auto`` picks ``q`` so that per-layer compute is close to per-layer load. On a
GPU it also reports the staging ring's host-to-device copy bandwidth beside a plain pinned
``copy_`` of the same bytes, and the gather/scatter kernels beside a device-to-device copy.
Prints a table; ``--json PATH`` (``-`` for stdout) writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.keys import Namespace
from streamkv.layout import KVLayout
from streamkv.store.disk import drop_page_cache
from streamkv.pipeline import paged
from streamkv.pipeline.device import Device, select_device
from streamkv.pipeline.staging import PagedPoolSink, StagingRing

BLOCK = 16
# Layer shapes of real models (random weights): SmolLM2-135M, and Llama-3-8B for a GPU.
PRESETS: dict[str, dict[str, int]] = {
    "smollm2": {"layers": 30, "kv_heads": 3, "head_dim": 64, "gqa": 3, "intermediate": 1536},
    "llama3-8b": {"layers": 32, "kv_heads": 8, "head_dim": 128, "gqa": 4, "intermediate": 14336},
}


class Bench:
    """One stored request, its paged pool on the device, and a Llama layer stack to compute."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.device: Device = select_device(args.device)
        self.tdev = self.device.torch_device
        self.dtype = getattr(torch, args.dtype)
        self.layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.dtype, args.chunk)
        self.workdir = workdir
        config = StreamKVConfig(chunk_size=args.chunk, tiers=(args.tier,), disk_dir=str(workdir / "disk"),
                                memory_gb=max(1.0, 3 * self._kv_bytes() / 2**30), compression="off",
                                max_inflight_layers=args.inflight, log_level="error")
        self.engine = StreamKVEngine(config, self.layout, Namespace("bench-pipeline", self.layout))
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 32000, (args.tokens,), generator=gen).numpy()
        planes = [[torch.randn(args.tokens, args.kv_heads, args.head_dim, generator=gen).to(self.dtype)
                   for _ in range(2)] for _ in range(args.layers)]
        self.stored = planes
        raw = _raw(self.dtype)
        chunks = self.engine.store_kv(self.tokens, lambda layer: [p.view(raw).numpy() for p in planes[layer]]).result()
        self.engine.flush()
        assert chunks == args.tokens // args.chunk, f"stored {chunks} chunks"
        blocks = args.tokens // BLOCK
        self.pool = [[torch.zeros(blocks, BLOCK, args.kv_heads, args.head_dim, dtype=self.dtype, device=self.tdev)
                      for _ in range(2)] for _ in range(args.layers)]
        self.segments = [paged.mha_nhd(k, v) for k, v in self.pool]
        pages = torch.randperm(blocks, generator=gen)
        self.slots = paged.slots_for_pages(pages, BLOCK).to(self.tdev)
        section = self.layout.section_bytes
        # One buffer per chunk section, enough for the layers the producer may run ahead.
        buffers = args.inflight * (args.tokens // args.chunk)
        self.ring = None if self.device.kind == "cpu" else StagingRing(self.device, buffers, section)
        self.model = _LlamaStack(args, self.dtype, self.tdev)

    def _kv_bytes(self) -> int:
        a = self.args
        return a.layers * 2 * a.tokens * a.kv_heads * a.head_dim * torch.empty((), dtype=getattr(torch, a.dtype)).element_size()

    def cold(self) -> None:
        """Drop the disk tier's files from the page cache (no effect on the memory tier); with
        ``--warm`` read them whole instead, so the page cache holds every one."""
        if not self.args.warm:
            drop_page_cache(self.workdir / "disk", sync=False)
            return
        for path in (self.workdir / "disk").rglob("*"):
            if path.is_file():
                path.read_bytes()

    def clear_pool(self) -> None:
        for k, v in self.pool:
            k.zero_()
            v.zero_()
        self.sync()

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            torch.cuda.synchronize(self.tdev)

    def start(self) -> tuple[Any, PagedPoolSink]:
        sink = PagedPoolSink(self.device, self.segments, self.slots, self.args.chunk, ring=self.ring)
        handle = self.engine.retrieve(self.tokens, sink=sink)
        return handle, sink

    def wait(self, handle: Any, sink: PagedPoolSink, layer: int) -> None:
        if not (handle.wait(layer) and sink.wait(layer)):
            raise RuntimeError(f"layer {layer} failed to load")

    def compute(self, layer: int, q: int) -> torch.Tensor:
        k, v = self.pool[layer]
        return self.model.layer(layer, q, k.view(-1, *k.shape[2:])[self.slots], v.view(-1, *v.shape[2:])[self.slots])

    def check(self) -> None:
        """The pool holds exactly the stored KV (a benchmark that moved wrong bytes is void)."""
        for layer in range(self.args.layers):
            for plane, stored in zip(self.pool[layer], self.stored[layer]):
                got = plane.view(-1, *plane.shape[2:])[self.slots].cpu()
                if not torch.equal(got.view(_raw(self.dtype)), stored.view(_raw(self.dtype))):
                    raise AssertionError(f"layer {layer}: pool differs from the stored KV")


class _LlamaStack:
    """transformers Llama decoder layers with random weights, and attention over loaded KV."""

    def __init__(self, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        q_heads = args.kv_heads * args.gqa
        hidden = q_heads * args.head_dim
        self.cfg = LlamaConfig(hidden_size=hidden, intermediate_size=args.intermediate,
                               num_attention_heads=q_heads, num_key_value_heads=args.kv_heads,
                               head_dim=args.head_dim, num_hidden_layers=args.layers, max_position_embeddings=1 << 16)
        self.cfg._attn_implementation = "sdpa"
        with torch.no_grad(), torch.device(device):  # random init on the device: fast for 8B shapes
            self.layers = [LlamaDecoderLayer(self.cfg, i).to(dtype=dtype).eval() for i in range(args.layers)]
            self.rotary = LlamaRotaryEmbedding(self.cfg)
        self.dtype, self.device, self.q_heads, self.args = dtype, device, q_heads, args
        self._inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    def _prepared(self, q: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        if q not in self._inputs:
            gen = torch.Generator().manual_seed(q)
            hidden = torch.randn(1, q, self.cfg.hidden_size, generator=gen).to(self.device, self.dtype)
            pos = torch.arange(self.args.tokens, self.args.tokens + q, device=self.device)[None]
            pe = self.rotary(hidden, pos)
            query = torch.randn(1, self.q_heads, q, self.args.head_dim, generator=gen).to(self.device, self.dtype)
            self._inputs[q] = (hidden, pe, query)
        return self._inputs[q]

    @torch.no_grad()
    def layer(self, layer: int, q: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hidden, pe, query = self._prepared(q)
        out = self.layers[layer](hidden, position_embeddings=pe)
        out = out[0] if isinstance(out, tuple) else out
        att = torch.nn.functional.scaled_dot_product_attention(
            query, k.transpose(0, 1)[None], v.transpose(0, 1)[None], enable_gqa=True)
        return out.sum() + att.sum()


def _raw(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]


def _timed(bench: Bench, fn: Callable[[], object]) -> float:
    bench.sync()
    t0 = time.perf_counter()
    fn()
    bench.sync()
    return time.perf_counter() - t0


def measure(bench: Bench, q: int) -> dict[str, float]:
    L = bench.args.layers

    def load() -> None:
        handle, sink = bench.start()
        for layer in range(L):
            bench.wait(handle, sink, layer)

    def compute() -> None:
        for layer in range(L):
            bench.compute(layer, q)

    def sequential() -> None:
        load()
        bench.sync()
        compute()

    parts: dict[str, list[float]] = {"start_s": [], "first_wait_s": [], "later_waits_s": [], "compute_s": []}

    def pipelined() -> None:
        # Where the pipelined time goes, on a CPU (on a GPU wait() only queues a stream wait):
        # starting the retrieve, the wait for layer 0 (headers, then layer 0: never hidden), the
        # waits for later layers (load not hidden) and the compute beside the loader.
        t = [time.perf_counter()]
        handle, sink = bench.start()
        t.append(time.perf_counter())
        for layer in range(L):
            bench.wait(handle, sink, layer)
            t.append(time.perf_counter())
            bench.compute(layer, q)
            t.append(time.perf_counter())
        steps = [b - a for a, b in zip(t, t[1:])]
        for name, value in zip(parts, (steps[0], steps[1], sum(steps[3::2]), sum(steps[2::2]))):
            parts[name].append(value)

    out: dict[str, list[float]] = {"load_s": [], "compute_s": [], "sequential_s": [], "pipelined_s": []}
    for i in range(bench.args.repeat + 1):  # the first round warms up and is not kept
        for name, fn in (("load_s", load), ("compute_s", compute), ("sequential_s", sequential), ("pipelined_s", pipelined)):
            if name != "compute_s":
                bench.clear_pool()
                bench.cold()
            took = _timed(bench, fn)
            if i:
                out[name].append(took)
            if name == "pipelined_s":
                bench.check()
    med: dict[str, Any] = {k: statistics.median(v) for k, v in out.items()}
    med["samples"] = out
    med["overlap_efficiency"] = (med["sequential_s"] - med["pipelined_s"]) / min(med["load_s"], med["compute_s"])
    # The same figure per round (its four runs back to back), less exposed to drift between rounds.
    rounds = [(s - p) / min(lo, c) for lo, c, s, p in
              zip(out["load_s"], out["compute_s"], out["sequential_s"], out["pipelined_s"])]
    med["overlap_efficiency_rounds"] = rounds  # their spread says how far one run's figure can be trusted
    med["overlap_efficiency_paired"] = statistics.median(rounds)
    if bench.tdev.type == "cpu":  # rounds past the warm-up one, medians
        med["pipelined_parts"] = {k: statistics.median(v[1:]) for k, v in parts.items()}
    med["load_per_layer_ms"] = 1e3 * med["load_s"] / L
    med["compute_per_layer_ms"] = 1e3 * med["compute_s"] / L
    return med


def pick_q(bench: Bench) -> int:
    """The query length whose per-layer compute is closest to the per-layer load."""
    def load() -> None:
        handle, sink = bench.start()
        for layer in range(bench.args.layers):
            bench.wait(handle, sink, layer)

    t_load = float("inf")
    for _ in range(3):
        bench.clear_pool()
        bench.cold()
        t_load = min(t_load, _timed(bench, load))
    target = t_load / bench.args.layers
    best, best_gap = 16, float("inf")
    q, probe = 16, min(4, bench.args.layers)
    while q <= 8192:

        def some_layers(q: int = q) -> None:
            for layer in range(probe):
                bench.compute(layer, q)

        some_layers()  # warm up
        per = _timed(bench, some_layers) / probe
        if abs(per - target) < best_gap:
            best, best_gap = q, abs(per - target)
        if per > target:
            break
        q *= 2
    return best


def gpu_bandwidth(bench: Bench, nbytes: int, iters: int = 20) -> dict[str, float]:
    """H2D of the ring's staging copy vs a plain pinned copy_; kernels vs a D2D copy."""
    dev, tdev = bench.device, bench.tdev
    stream = dev.new_stream(high_priority=True)
    ring = StagingRing(dev, 1, nbytes)
    slot = ring.acquire()
    staged = slot.device
    assert staged is not None
    plain_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    plain_dst = torch.empty(nbytes, dtype=torch.uint8, device=tdev)

    def gbps(fn: Callable[[], object]) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for _ in range(iters):
                fn()
            end.record(stream)
        end.synchronize()
        return nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9

    res = {
        "bytes": float(nbytes),
        "h2d_staging_GBps": gbps(lambda: dev.copy_async(staged, slot.host, stream)),
        "h2d_plain_pinned_GBps": gbps(lambda: plain_dst.copy_(plain_src, non_blocking=True)),
    }
    ring.release(slot)
    segs = bench.segments[0]
    n = nbytes // sum(s.row_bytes for s in segs)
    n = min(n, bench.slots.numel())
    moved = paged.section_nbytes(segs, n)
    staging = torch.empty(moved, dtype=torch.uint8, device=tdev)
    d2d_src = torch.empty(moved, dtype=torch.uint8, device=tdev)
    backend: paged.Backend = "kernel" if _kernels_ok() else "torch"
    res["kernel_backend"] = backend  # type: ignore[assignment]
    res["kernel_bytes"] = float(moved)  # at most one layer of the pool
    scale = moved / nbytes
    slots, chunk = bench.slots[:n], bench.args.chunk
    res["gather_GBps"] = scale * gbps(lambda: paged.gather_pages(segs, slots, staging, chunk_tokens=chunk, backend=backend))
    res["scatter_GBps"] = scale * gbps(lambda: paged.scatter_pages(segs, slots, staging, chunk_tokens=chunk, backend=backend))
    res["d2d_copy_GBps"] = scale * gbps(lambda: staging.copy_(d2d_src))
    res["h2d_ratio"] = res["h2d_staging_GBps"] / res["h2d_plain_pinned_GBps"]
    res["gather_ratio"] = res["gather_GBps"] / res["d2d_copy_GBps"]
    res["scatter_ratio"] = res["scatter_GBps"] / res["d2d_copy_GBps"]
    return res


def _kernels_ok() -> bool:
    from streamkv.pipeline import kernels

    return kernels.available()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="skv-bench-pipeline-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            q = pick_q(bench) if args.q_tokens == "auto" else int(args.q_tokens)
            result: dict[str, Any] = {
                "benchmark": "pipeline",
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "device": torch.cuda.get_device_name(bench.tdev) if bench.tdev.type == "cuda" else "cpu"},
                "config": {k: v for k, v in vars(args).items() if k != "json"} | {"q_tokens": q},
                "kv_bytes_per_layer": bench.layout.section_bytes * (args.tokens // args.chunk),
                "figures": measure(bench, q),
            }
            if bench.tdev.type == "cuda":
                result["bandwidth"] = [gpu_bandwidth(bench, size) for size in (1 << 20, 8 << 20, 64 << 20)]
        finally:
            bench.engine.close()
    return result


def table(result: dict[str, Any]) -> str:
    f, c = result["figures"], result["config"]
    lines = [
        f"pipeline  device={result['machine']['device']}  tier={c['tier']}{' (warm)' if c.get('warm') else ''}  layers={c['layers']}  tokens={c['tokens']}"
        f"  kv/layer={result['kv_bytes_per_layer'] / 2**20:.1f} MiB  q={c['q_tokens']}  repeat={c['repeat']}",
        f"{'figure':<24}{'value':>12}",
        f"{'load per layer (ms)':<24}{f['load_per_layer_ms']:>12.2f}",
        f"{'compute per layer (ms)':<24}{f['compute_per_layer_ms']:>12.2f}",
        f"{'load (s)':<24}{f['load_s']:>12.3f}",
        f"{'compute (s)':<24}{f['compute_s']:>12.3f}",
        f"{'sequential (s)':<24}{f['sequential_s']:>12.3f}",
        f"{'pipelined (s)':<24}{f['pipelined_s']:>12.3f}",
        f"{'overlap efficiency':<24}{f['overlap_efficiency']:>12.2f}",
        f"{'  (median per round)':<24}{f['overlap_efficiency_paired']:>12.2f}",
        f"{'  (rounds, min-max)':<24}{min(f['overlap_efficiency_rounds']):>7.2f}-{max(f['overlap_efficiency_rounds']):.2f}",
    ]
    split = f.get("pipelined_parts")
    if split:
        lines += [
            "pipelined, where it went:",
            f"{'  start retrieve (ms)':<24}{1e3 * split['start_s']:>12.1f}",
            f"{'  wait for layer 0 (ms)':<24}{1e3 * split['first_wait_s']:>12.1f}",
            f"{'  later waits (ms)':<24}{1e3 * split['later_waits_s']:>12.1f}",
            f"{'  compute (ms)':<24}{1e3 * split['compute_s']:>12.1f}",
        ]
    for bw in result.get("bandwidth", []):
        lines.append(
            f"{int(bw['bytes']) >> 20:>4} MiB  H2D staging {bw['h2d_staging_GBps']:.1f} GB/s vs pinned copy_ "
            f"{bw['h2d_plain_pinned_GBps']:.1f} ({bw['h2d_ratio']:.0%});  gather {bw['gather_GBps']:.1f} / scatter "
            f"{bw['scatter_GBps']:.1f} vs d2d {bw['d2d_copy_GBps']:.1f} GB/s "
            f"({bw['gather_ratio']:.0%} / {bw['scatter_ratio']:.0%}, {bw['kernel_backend']})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamkv bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tier", choices=["memory", "disk"], default="disk")
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="layer shape preset (default: smollm2 on CPU, llama3-8b on GPU); flags below override it")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokens", type=int, default=4096, help="stored tokens (a multiple of --chunk)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--gqa", type=int, default=None, help="query heads per KV head")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width")
    p.add_argument("--dtype", default=None, help="KV and compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--q-tokens", default="auto", help="new tokens computed per layer, or 'auto'")
    p.add_argument("--warm", action="store_true",
                   help="disk tier: every load reads from the page cache (default: cold, from the device)")
    p.add_argument("--inflight", type=int, default=3, help="layers the producer may run ahead")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write every figure as JSON to PATH ('-': stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    preset = PRESETS[args.model or ("smollm2" if args.device == "cpu" else "llama3-8b")]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.tokens % args.chunk or args.chunk % BLOCK:
        raise SystemExit(f"--tokens must be a multiple of --chunk, and --chunk of {BLOCK}")
    result = run(args)
    text = table(result)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
