"""TTFT of SmolLM2 on this CPU: recompute vs a hit from the memory tier vs the disk tier.

For each shared prefix length (default 1024, 2048, 4096) plus a 32-token
suffix: recompute (the whole prompt computed), a hit from the memory tier,
a hit from the disk tier (a fresh engine whose only tier is disk, with the
chunk files dropped from the page cache first, so reads come from the
device), and the floor: the suffix alone computed against the prefix KV
already in the model's cache (loaded before the clock starts). Memory, floor
and disk runs are interleaved, round by round. One run, side by side; ratios matter, not
absolute times (the machine is shared). Prints a table, or JSON with --json."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamkv.adapters.transformers import CachedModel
from streamkv.adapters.transformers.cache import cache_kwargs, layer_tensors
from streamkv.adapters.transformers.smollm2 import load_smollm2
from streamkv.config import StreamKVConfig
from streamkv.fingerprint import fingerprint_model
from streamkv.store.disk import drop_page_cache

SUFFIX = 32


@torch.inference_mode()
def floor_ttft(model: Any, cm: CachedModel, ids: torch.Tensor, prefix: int, repeats: int) -> float:
    """The suffix alone, against the prefix KV already in the model's cache (loaded before the clock starts)."""
    times = []
    for _ in range(repeats):
        handle = cm.engine.retrieve(ids, max_tokens=prefix)
        assert handle.hit_tokens == prefix and all(handle.wait(l) for l in range(cm.layout.num_layers))
        cache = DynamicCache(config=model.config)
        for layer, array in enumerate(handle.sink.layers):
            k, v = layer_tensors(array, cm.layout, ids.device)
            cache.update(k.contiguous(), v.contiguous(), layer)
        start = time.perf_counter()
        model(ids[prefix:].unsqueeze(0), **cache_kwargs(model, cache), use_cache=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(prefixes: list[int], repeats: int, workdir: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Per prefix: one cold run, then ``repeats`` rounds of memory hit, floor and disk hit,
    interleaved so that a busy machine slows all three alike."""
    model, _ = load_smollm2("float32")
    fingerprint = fingerprint_model(model)
    rows = []
    bar = tqdm(total=len(prefixes) * (1 + repeats), disable=not progress, desc="e2e TTFT")
    for prefix in prefixes:
        ids = torch.randint(1000, 40000, (prefix + SUFFIX,), generator=torch.Generator().manual_seed(prefix))
        cfg = StreamKVConfig(disk_dir=str(workdir / f"disk-{prefix}"), memory_gb=2, disk_gb=4)
        memory, disk, floors = [], [], []
        with CachedModel(model, cfg, fingerprint=fingerprint) as cm:
            cold = cm.prefill(ids, reuse=False)
            cold.stored.result()
            cm.engine.flush()
            bar.update()
            for _ in range(repeats):
                memory.append(cm.prefill(ids, store=False))
                floors.append(floor_ttft(model, cm, ids, prefix, 1))
                drop_page_cache(workdir / f"disk-{prefix}")
                with CachedModel(model, cfg.replace(tiers=("disk",)), fingerprint=fingerprint) as disk_cm:
                    disk.append(disk_cm.prefill(ids, store=False))
                bar.update()
        mem_s = statistics.median(r.ttft_s for r in memory)
        disk_s = statistics.median(r.ttft_s for r in disk)
        floor = statistics.median(floors)
        identical = all(torch.equal(r.logits, memory[0].logits) for r in memory + disk)
        rows.append({
            "prefix_tokens": prefix, "suffix_tokens": SUFFIX, "hit_tokens": memory[0].hit_tokens,
            "ttft_recompute_s": cold.ttft_s, "ttft_memory_s": mem_s, "ttft_disk_s": disk_s,
            "ttft_floor_s": floor, "speedup_memory": cold.ttft_s / mem_s, "speedup_disk": cold.ttft_s / disk_s,
            "memory_over_floor": mem_s / floor, "disk_over_floor": disk_s / floor, "logits_identical": identical,
            "samples": {"memory_s": [r.ttft_s for r in memory], "disk_s": [r.ttft_s for r in disk],
                        "floor_s": floors},
        })
    bar.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'prefix':>6} {'recompute':>10} {'memory':>8} {'disk':>8} {'floor':>8} {'x mem':>6} {'x disk':>6} {'mem/floor':>9} {'disk/floor':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['prefix_tokens']:>6} {r['ttft_recompute_s'] * 1e3:>8.0f}ms {r['ttft_memory_s'] * 1e3:>6.0f}ms "
            f"{r['ttft_disk_s'] * 1e3:>6.0f}ms {r['ttft_floor_s'] * 1e3:>6.0f}ms {r['speedup_memory']:>5.1f}x "
            f"{r['speedup_disk']:>5.1f}x {r['memory_over_floor']:>8.2f}x {r['disk_over_floor']:>9.2f}x"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamkv bench e2e", description=__doc__)
    p.add_argument("--prefixes", default="1024,2048,4096", help="comma-separated prefix lengths")
    p.add_argument("--repeats", type=int, default=5, help="warm runs per tier (median is reported)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    prefixes = [int(x) for x in args.prefixes.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="streamkv-e2e-") as tmp:
        rows = run(prefixes, args.repeats, args.workdir or Path(tmp), progress=not args.json)
    if args.json:
        print(json.dumps({"benchmark": "e2e_ttft", "rows": rows}, indent=2))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
