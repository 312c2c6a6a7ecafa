"""Tier bandwidth and lookup latency, each beside the limit measured in the same run.

For each layout (Llama-3-8B-shaped: 32 MiB chunks of 1 MiB sections; SmolLM2:
5.6 MiB chunks of 192 KiB sections) and each tier it puts and gets whole
chunk objects and single layer sections, and measures the matching limit:

* memory: ``numpy.copyto`` of the same bytes into a preallocated buffer. The
  tier's get is zero-copy, so its get is timed as get + copy into a staging
  buffer (what the pipeline does with it).
* disk: O_DIRECT write/read (page-aligned ``mmap`` buffers) of the same sizes
  on the same filesystem. Every put round writes new objects on both sides: the
  tier a new key per object, the limit a new file per object (``dd oflag=direct``
  into a new file); both are timed up to an ``os.sync()``. Tier reads are cold
  (page cache dropped with ``posix_fadvise(DONTNEED)``). Tier and limit take
  turns in slices of each round (``tier_limits.interleaved``): this VM's disk
  speed drifts within seconds. Files are removed only when the run ends.
  ``--disk-writes buffered`` measures the tier's buffered write path instead.
* s3: plain obstore put/get/get_range of the same bytes, same concurrency,
  same server (moto in a subprocess unless ``--s3-endpoint`` is given).

Each figure is the median of paired rounds (tier and limit back to back, the
order swapped each round; for disk, in slices within each round), so a busy
machine skews both sides alike; every
sample is in the JSON. Then lookups of 512 chunk keys spread over memory,
disk and S3 through the tiered store (cold: includes the S3 LIST; warm:
answered from the index), and the S3 tier's own overhead per request.
Prints a table; ``--json PATH`` (``-`` for stdout) writes every figure."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import numpy as np

from streamkv.format import encode_chunk, parse_header
from streamkv.keys import Namespace
from streamkv.layout import KVLayout

try:
    from benchmarks.tier_limits import (ODirect, Job, MotoProcess, Side, best_rate, drive, drop_cache,
                                        interleaved, memcpy_rate, paired)
except ImportError:  # loaded by path (`streamkv bench tiers`, or a script run from benchmarks/)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tier_limits import (ODirect, Job, MotoProcess, Side, best_rate, drive,  # type: ignore[no-redef]
                             drop_cache, interleaved, memcpy_rate, paired)

LAYOUTS = {
    "llama3-8b": KVLayout(32, 8, 128, "bfloat16", 256),
    "smollm2": KVLayout(30, 3, 64, "bfloat16", 256),
}
TARGETS = {("memory", "chunk", "get"): 0.60, ("disk", "chunk", "put"): 0.70, ("disk", "chunk", "get"): 0.70,
           ("disk", "section", "put"): 0.70, ("disk", "section", "get"): 0.70}


@dataclass
class Row:
    """One tier figure beside its limit; the figures are medians of the paired rounds."""

    layout: str
    tier: str
    unit: str  # chunk | section
    op: str  # put | get
    nbytes: int
    tier_samples: list[float]
    limit: str
    limit_samples: list[float]

    @property
    def tier_mb_s(self) -> float:
        return statistics.median(self.tier_samples)

    @property
    def limit_mb_s(self) -> float:
        return statistics.median(self.limit_samples)

    @property
    def ratio(self) -> float:
        return self.tier_mb_s / self.limit_mb_s if self.limit_mb_s else float("nan")

    @property
    def target(self) -> float | None:
        return 0.90 if self.tier == "s3" else TARGETS.get((self.tier, self.unit, self.op))

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("tier_samples", "limit_samples"):
            d[k] = [round(x, 1) for x in d[k]]
        return {**d, "tier_mb_s": round(self.tier_mb_s, 1), "limit_mb_s": round(self.limit_mb_s, 1),
                "ratio": round(self.ratio, 3), "target": self.target}


def sample_chunk(layout: KVLayout, seed: int = 0) -> bytearray:
    """A chunk object of incompressible (random) KV, stored raw."""
    ns = Namespace("bench@0", layout)
    rng = np.random.default_rng(seed)
    sections = [rng.integers(0, 256, layout.section_bytes, dtype=np.uint8) for _ in range(layout.num_layers)]
    return encode_chunk(ns, layout, sections, compression="off")


def keys(tag: str, n: int) -> list[str]:
    return [f"{'b' * 32}/{tag}{i:08x}" for i in range(n)]


# -- memory --------------------------------------------------------------------

async def bench_memory(name: str, layout: KVLayout, blob: bytearray, n: int, repeat: int) -> list[Row]:
    from streamkv.store.memory import MemoryStore

    store = MemoryStore(n * len(blob) * (repeat + 2), pinned=False)
    header = parse_header(blob)
    sec = layout.section_bytes
    staging = np.zeros(len(blob), dtype=np.uint8)  # warm, as the pipeline's staging ring is
    ks = keys("m", n)

    async def get_copy(k: str) -> None:
        np.copyto(staging, np.frombuffer(await store.get(k), dtype=np.uint8))

    async def get_sections(k: str) -> None:
        for layer in range(layout.num_layers):
            off, length = header.section_range(layer)
            (part,) = await store.get_ranges(k, [(off, length)])
            np.copyto(staging[off : off + length], np.frombuffer(part, dtype=np.uint8))

    section_blob = memoryview(blob)[:sec]
    sources = [np.frombuffer(blob, dtype=np.uint8).copy() for _ in range(n)]

    async def copy_limit(size: int) -> float:
        return memcpy_rate(sources, size, 1)

    whole, nsec = n * len(blob), n * layout.num_layers * sec
    rows = []
    for unit, op, tier in [
        ("chunk", "put", lambda r: best_rate(whole, 1, lambda _: [lambda k=k: store.put(k, blob) for k in ks], 1)),
        ("chunk", "get", lambda r: best_rate(whole, 1, lambda _: [lambda k=k: get_copy(k) for k in ks], 1)),
        ("section", "get", lambda r: best_rate(nsec, 1, lambda _: [lambda k=k: get_sections(k) for k in ks], 1)),
        ("section", "put", lambda r: best_rate(nsec, 1, lambda _: [
            lambda k=k: store.put(k, section_blob) for k in keys(f"s{r}", n * layout.num_layers)], 1)),
    ]:
        size = len(blob) if unit == "chunk" else sec
        t, lim = await paired(repeat, tier, lambda r, size=size: copy_limit(size))
        rows.append(Row(name, "memory", unit, op, size, t, "numpy.copyto", lim))
    return rows


# -- disk ----------------------------------------------------------------------

async def bench_disk(name: str, layout: KVLayout, blob: bytearray, n: int, repeat: int, concurrency: int,
                     root: Path, direct_writes: bool = True) -> list[Row]:
    from streamkv.store.disk import DiskStore
    from streamkv.store.limits import Limits

    tier_dir = root / f"tier-{name}"
    store = DiskStore(tier_dir, n * len(blob) * (2 * repeat + 2), limits=Limits(disk_io=concurrency),
                      direct_writes=direct_writes)
    header = parse_header(blob)
    sec, nsec = layout.section_bytes, n * layout.num_layers
    stored = keys("c0", n)  # written by the first chunk-put round, read back by the gets
    section_blob = memoryview(blob)[:sec]
    od_chunk = ODirect(root / "od-chunk", len(blob), n, concurrency, memoryview(blob))
    od_sec = ODirect(root / "od-sec", sec, nsec, concurrency, section_blob)
    ranges = [(k, header.section_range(layer)) for k in stored for layer in range(layout.num_layers)]

    def cold() -> None:
        drop_cache(tier_dir)

    whole = n * len(blob)
    # Every round of puts writes new objects on both sides (new keys, new files), timed up to a
    # sync; gets read the same objects every round, the tier's cold (page cache dropped first).
    plan = [
        ("chunk", "put", Side(lambda r: [lambda k=k: store.put(k, blob) for k in keys(f"c{r}", n)], whole,
                              after=os.sync),
         Side(od_chunk.write_jobs, whole, after=os.sync)),
        ("chunk", "get", Side(lambda r: [lambda k=k: store.get(k) for k in stored], whole, before=cold),
         Side(od_chunk.read_jobs, whole)),
        ("section", "put", Side(lambda r: [lambda k=k: store.put(k, section_blob) for k in keys(f"s{r}", nsec)],
                                nsec * sec, after=os.sync),
         Side(od_sec.write_jobs, nsec * sec, after=os.sync)),
        ("section", "get", Side(lambda r: [lambda k=k, rg=rg: store.get_ranges(k, [rg]) for k, rg in ranges],
                                nsec * sec, before=cold),
         Side(od_sec.read_jobs, nsec * sec)),
    ]
    rows = []
    for unit, op, tier, limit in plan:
        t, lim = await interleaved(repeat, tier, limit, concurrency)
        label = "O_DIRECT write" if op == "put" else "O_DIRECT read"
        rows.append(Row(name, "disk", unit, op, len(blob) if unit == "chunk" else sec, t, label, lim))
    # The files stay until the run ends (``run`` removes the whole directory then), on both sides.
    # On ext4 without a journal, creating a file skips every inode of its group deleted in the last
    # 60 s (300 s while its inode-table block is dirty), one buffer lookup each (fs/ext4/ialloc.c,
    # recently_deleted): deleting this layout's thousands of files now would slow the next
    # layout's file creations.
    return rows


# -- s3 ------------------------------------------------------------------------

async def bench_s3(name: str, layout: KVLayout, blob: bytearray, n: int, repeat: int, concurrency: int,
                   s3: dict) -> list[Row]:
    import obstore as obs

    from streamkv.store.s3 import S3Store

    store = S3Store.from_url(s3["url"], max_concurrency=concurrency, **s3["kwargs"])
    raw = store.settings.make_store()  # plain obstore: same bucket, prefix, client settings
    header = parse_header(blob)
    sec, nsec = layout.section_bytes, n * layout.num_layers
    section_blob = memoryview(blob)[:sec]
    run = uuid.uuid4().hex[:6]

    async def plain_get(k: str) -> None:
        await (await obs.get_async(raw, k)).bytes_async()

    async def pair(unit: str, op: str, nbytes: int, tier_jobs: Callable[[int], Sequence[Job]],
                   plain_jobs: Callable[[int], Sequence[Job]]) -> Row:
        t, lim = await paired(repeat, lambda r: best_rate(nbytes, 1, lambda _: tier_jobs(r), concurrency),
                              lambda r: best_rate(nbytes, 1, lambda _: plain_jobs(r), concurrency))
        return Row(name, "s3", unit, op, len(blob) if unit == "chunk" else sec, t, "plain obstore", lim)

    def ks(tag: str, count: int, r: int) -> list[str]:
        return keys(f"{run}{tag}{r}x", count)

    for _ in range(concurrency):  # open the connection pools of both clients before timing
        await store.put(f"{'b' * 32}/warm", b"w")
        await obs.put_async(raw, f"{'b' * 32}/warm", b"w")
    rows = [
        await pair("chunk", "put", n * len(blob),
                   lambda r: [lambda k=k: store.put(k, blob) for k in ks("t", n, r)],
                   lambda r: [lambda k=k: obs.put_async(raw, k, blob) for k in ks("p", n, r)]),
        await pair("chunk", "get", n * len(blob),
                   lambda r: [lambda k=k: store.get(k) for k in ks("t", n, 0)],
                   lambda r: [lambda k=k: plain_get(k) for k in ks("t", n, 0)]),  # the same objects
    ]
    ranges = [(k, header.section_range(layer)) for k in ks("t", n, 0) for layer in range(layout.num_layers)]
    rows.append(await pair(
        "section", "get", nsec * sec,
        lambda r: [lambda k=k, rg=rg: store.get_ranges(k, [rg]) for k, rg in ranges],
        lambda r: [lambda k=k, rg=rg: obs.get_range_async(raw, k, start=rg[0], length=rg[1]) for k, rg in ranges]))
    rows.append(await pair(
        "section", "put", nsec * sec,
        lambda r: [lambda k=k: store.put(k, section_blob) for k in ks("ts", nsec, r)],
        lambda r: [lambda k=k: obs.put_async(raw, k, section_blob) for k in ks("ps", nsec, r)]))
    await store.clear("b" * 32)
    return rows


async def s3_overhead_us(s3: dict, calls: int = 20_000) -> float:
    """Microseconds the tier adds per request (limiter, deadline, breaker, classification), measured
    on a request that does nothing: a figure the machine's load barely moves, unlike bandwidth."""
    from streamkv.store.s3 import S3Store

    store = S3Store.from_url(s3["url"], **s3["kwargs"])

    async def nothing() -> None:
        return None

    t0 = time.perf_counter()
    for _ in range(calls):
        await store._call("noop", "-", nothing)
    return (time.perf_counter() - t0) / calls * 1e6


# -- lookups -------------------------------------------------------------------

async def bench_lookups(root: Path, s3: dict | None, count: int = 512, warm_runs: int = 50) -> list[dict]:
    """exists_many of ``count`` keys spread over the tiers: cold (first) and warm (median)."""
    from streamkv.store.disk import DiskStore
    from streamkv.store.memory import MemoryStore
    from streamkv.store.tiered import TieredStore

    tiers: list[Any] = [MemoryStore(64 << 20, pinned=False), DiskStore(root / "lookup", 64 << 20)]
    if s3 is not None:
        from streamkv.store.s3 import S3Store

        tiers.append(S3Store.from_url(s3["url"], **s3["kwargs"]))
    ks = keys(f"l{uuid.uuid4().hex[:6]}", count)
    for i, k in enumerate(ks):  # a quarter in memory, a quarter on disk, the rest in the last tier
        await tiers[min(i * 4 // count, len(tiers) - 1)].put(k, b"v" * 64)
    out = []
    for label, store in [("tiered", TieredStore(tiers))] + [(t.name, t) for t in tiers]:
        if hasattr(store, "index"):
            store.index.forget()
        t0 = time.perf_counter()
        cold_flags = await store.exists_many(ks)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(warm_runs):
            t0 = time.perf_counter()
            await store.exists_many(ks)
            warm.append(time.perf_counter() - t0)
        out.append({"store": label, "keys": count, "present": sum(cold_flags), "cold_ms": round(cold * 1e3, 3),
                    "warm_ms": round(statistics.median(warm) * 1e3, 3), "target_ms": 5.0})
    if s3 is not None:
        s3store = tiers[-1]
        t0 = time.perf_counter()
        await drive([lambda k=k: s3store.exists(k) for k in ks], s3store.limiter.total_tokens)
        out.append({"store": "s3 (HEAD per key, no index)", "keys": count, "present": count,
                    "cold_ms": round((time.perf_counter() - t0) * 1e3, 3), "warm_ms": None, "target_ms": None})
        await s3store.clear("b" * 32)
    shutil.rmtree(root / "lookup", ignore_errors=True)
    return out


# -- report --------------------------------------------------------------------

def table(rows: list[Row], lookups: list[dict]) -> str:
    lines = [f"{'layout':<10} {'tier':<6} {'unit':<8} {'op':<4} {'size':>9} {'tier MB/s':>10} "
             f"{'limit':<15} {'limit MB/s':>10} {'ratio':>6} {'target':>6}"]
    for r in rows:
        target = f"{r.target:.0%}" if r.target else "-"
        ok = "" if r.target is None else (" ok" if r.ratio >= r.target else " LOW")
        lines.append(f"{r.layout:<10} {r.tier:<6} {r.unit:<8} {r.op:<4} {r.nbytes / 2**20:>7.2f}Mi "
                     f"{r.tier_mb_s:>10.0f} {r.limit:<15} {r.limit_mb_s:>10.0f} {r.ratio:>6.0%} {target:>6}{ok}")
    lines.append("")
    lines.append(f"{'lookup of 512 keys':<30} {'present':>7} {'cold ms':>9} {'warm ms':>9}")
    for lk in lookups:
        warm = "-" if lk["warm_ms"] is None else f"{lk['warm_ms']:.3f}"
        lines.append(f"{lk['store']:<30} {lk['present']:>7} {lk['cold_ms']:>9.3f} {warm:>9}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    n_chunks = {"llama3-8b": 2 if quick else 8, "smollm2": 4 if quick else 24}
    repeat = 2 if quick else 5
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: record it
    root = Path(tempfile.mkdtemp(prefix="streamkv-bench-", dir=args.dir))
    moto = None
    s3 = None
    try:
        if "s3" in args.tiers:
            if args.s3_endpoint is None:
                moto = MotoProcess()
                bucket = f"streamkv-bench-{uuid.uuid4().hex[:8]}"
                moto.create_bucket(bucket)
                s3 = {"url": f"s3://{bucket}/bench", "endpoint": moto.endpoint,
                      "kwargs": dict(endpoint=moto.endpoint, region="us-east-1", access_key_id="bench",
                                     secret_access_key="bench", timeout_s=120.0)}
            else:
                s3 = {"url": args.s3_url, "endpoint": args.s3_endpoint,
                      "kwargs": dict(endpoint=args.s3_endpoint, timeout_s=120.0)}
        rows: list[Row] = []
        for name in args.layouts:
            layout = LAYOUTS[name]
            blob = sample_chunk(layout)
            n = n_chunks[name]
            if "memory" in args.tiers:
                rows += await bench_memory(name, layout, blob, n, repeat)
            if "disk" in args.tiers:
                rows += await bench_disk(name, layout, blob, n, repeat, args.concurrency, root,
                                         direct_writes=args.disk_writes == "direct")
            if "s3" in args.tiers:
                rows += await bench_s3(name, layout, blob, n, repeat, args.concurrency, s3)  # type: ignore[arg-type]
        lookups = await bench_lookups(root, s3)
        overhead = await s3_overhead_us(s3) if s3 is not None else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.sync()  # clean inode tables: the next run's creates skip these inodes for 60 s, not 300 s
        if moto is not None:
            moto.close()
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
                    "disk_dir": str(Path(args.dir or tempfile.gettempdir()).resolve())},
        "settings": {"quick": quick, "repeat": repeat, "chunks": n_chunks, "concurrency": args.concurrency,
                     "disk_writes": args.disk_writes, "s3_endpoint": s3["endpoint"] if s3 else None},
        "rows": [r.as_dict() for r in rows],
        "lookups": lookups,
        "s3_tier_overhead_us_per_request": overhead,
        "table": table(rows, lookups) + (f"\n\ns3 tier overhead per request: {overhead:.1f} us" if overhead else ""),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamkv bench tiers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few chunks, two rounds (well under a minute)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS), help="comma-separated")
    p.add_argument("--tiers", type=lambda s: s.split(","), default=["memory", "disk", "s3"], help="comma-separated")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, same for tier and limit")
    p.add_argument("--disk-writes", choices=["direct", "buffered"], default="direct",
                   help="how the disk tier writes objects (buffered: the pre-O_DIRECT path, to compare)")
    p.add_argument("--dir", default=None, help="directory on the filesystem to measure (default: the temp dir)")
    p.add_argument("--s3-url", default=None, help="s3://bucket/prefix of an existing bucket (with --s3-endpoint)")
    p.add_argument("--s3-endpoint", default=None, help="an S3 endpoint instead of a local moto server")
    args = p.parse_args(argv)
    for name in args.layouts:
        if name not in LAYOUTS:
            p.error(f"--layouts: unknown layout {name!r}; one of {sorted(LAYOUTS)}")
    if bool(args.s3_url) != bool(args.s3_endpoint):
        p.error("--s3-url and --s3-endpoint go together")
    result = anyio.run(run, args)
    text = result.pop("table")
    if args.json == "-":
        print(json.dumps(result, indent=2))
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
