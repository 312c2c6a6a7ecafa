"""Daemon vs in-process: store/retrieve bandwidth and per-call latency on the same tiers.

Starts ``streamkv serve`` as a subprocess (memory + disk tiers in a temporary
directory), builds one engine over its own in-process tiers of the same sizes
and one over ``DaemonStore``, and runs the same workload through both: store
requests of ``--chunks`` chunks (SmolLM2-135M geometry by default), layer-wise
retrieves of them, ``lookup`` calls, and control round trips (``ping``) on the
Unix socket. Prints a table and JSON (``--json-out`` writes it to a file)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np

from streamkv.client import DaemonClient, DaemonStore
from streamkv.config import StreamKVConfig
from streamkv.engine import StreamKVEngine
from streamkv.keys import Namespace
from streamkv.layout import KVLayout


def _workload(layout: KVLayout, chunks: int, requests: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    rng = np.random.default_rng(0)
    shape = (2, chunks * layout.chunk_size, layout.num_kv_heads, layout.head_size)
    out = []
    for _ in range(requests):
        tokens = rng.integers(0, 32000, chunks * layout.chunk_size)
        kv = [rng.integers(0, 65536, size=shape, dtype=np.uint16) for _ in range(layout.num_layers)]
        out.append((tokens, kv))
    return out


def _daemon_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the daemon process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Meter:
    """Wall time, this process's CPU time and the daemon's CPU time of one call."""

    def __init__(self, daemon_pid: int) -> None:
        self.pid = daemon_pid
        self.wall: list[float] = []
        self.cpu = 0.0

    def __call__(self, fn: Callable[[], Any]) -> None:
        cpu0, d0, t0 = time.process_time(), _daemon_cpu_s(self.pid), time.perf_counter()
        fn()
        self.wall.append(time.perf_counter() - t0)
        self.cpu += time.process_time() - cpu0 + _daemon_cpu_s(self.pid) - d0


def _retrieve(eng: StreamKVEngine, tokens: np.ndarray) -> None:
    handle = eng.retrieve(tokens)
    assert handle.hit_tokens == len(tokens)
    assert all(handle.wait(layer) for layer in range(eng.layout.num_layers))


def _compare(engines: dict[str, StreamKVEngine], work: list, repeat: int, daemon_pid: int,
             flush_daemon: Callable[[], None]) -> dict[str, Any]:
    """Store, retrieve and lookup through each engine, interleaved so load drift hits both alike."""
    layout = next(iter(engines.values())).layout
    nbytes = work[0][1][0].nbytes * layout.num_layers
    meters = {(name, what): _Meter(daemon_pid) for name in engines for what in ("store", "retrieve", "lookup")}
    for tokens, kv in work:
        for name, eng in engines.items():
            meters[name, "store"](lambda e=eng, t=tokens, kv=kv: e.store_kv(t, lambda l: (kv[l][0], kv[l][1])).result())
            eng.flush()  # untimed: the write-through to disk of one store must not overlap the next
            flush_daemon()
    for _ in range(repeat):
        for tokens, _kv in work:
            for name, eng in engines.items():
                for tier in eng.store.tiers:  # cold: no object still lent from the last retrieve
                    if isinstance(tier, DaemonStore):
                        tier.forget_lent()
                meters[name, "retrieve"](lambda e=eng, t=tokens: _retrieve(e, t))
    for _ in range(50):
        for tokens, _kv in work:
            for name, eng in engines.items():
                meters[name, "lookup"](lambda e=eng, t=tokens: e.lookup(t))
    out: dict[str, Any] = {}
    for name in engines:
        st, rt, lk = meters[name, "store"], meters[name, "retrieve"], meters[name, "lookup"]
        out[name] = {
            "store_gbps": nbytes / statistics.median(st.wall) / 1e9,
            "retrieve_gbps": nbytes / statistics.median(rt.wall) / 1e9,
            "retrieve_ms": statistics.median(rt.wall) * 1e3,
            "retrieve_ms_min": min(rt.wall) * 1e3,
            "retrieve_cpu_s_per_gb": rt.cpu / (nbytes * len(rt.wall) / 1e9),
            "store_cpu_s_per_gb": st.cpu / (nbytes * len(st.wall) / 1e9),
            "lookup_us": statistics.median(lk.wall) * 1e6,
        }
    return out


def _ping_async(sock: str, n: int) -> list[float]:
    async def go() -> list[float]:
        store = DaemonStore(sock)
        await store.control("ping")
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await store.control("ping")
            out.append(time.perf_counter() - start)
        await store.aclose()
        return out
    return anyio.run(go)


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--chunks", type=int, default=16, help="chunks per request (16 x 256 = 4096 tokens)")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pings", type=int, default=2000)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    layout = KVLayout(args.layers, args.kv_heads, args.head_size, "bfloat16", args.chunk_size)
    ns = Namespace("bench-model", layout)
    root = Path(tempfile.mkdtemp(prefix="skvb"))
    sock = str(root / "sock")
    daemon = subprocess.Popen([sys.executable, "-m", "streamkv.server", "--socket", sock,
                               "--disk-dir", str(root / "daemon-disk"), "--memory-gb", "4", "--disk-gb", "8"],
                              stderr=subprocess.DEVNULL)
    try:
        client = DaemonClient(sock, timeout_s=2)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("daemon did not start") from None
                time.sleep(0.1)
        work = _workload(layout, args.chunks, args.requests)
        base = StreamKVConfig(chunk_size=args.chunk_size, memory_gb=4, disk_gb=8, socket=sock)
        inproc = StreamKVEngine(base.replace(disk_dir=str(root / "inproc-disk")), layout, ns)
        remote = StreamKVEngine(base.replace(mode="daemon"), layout, ns, tiers=[DaemonStore(sock)])
        try:
            results = _compare({"inprocess": inproc, "daemon": remote}, work, args.repeat, daemon.pid, client.flush)
        finally:
            inproc.close()
            remote.close()
        sync_ping = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            client.ping()
            sync_ping.append(time.perf_counter() - t0)
        client.close()
        raw_ping = _ping_async(sock, args.pings)
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    d, i = results["daemon"], results["inprocess"]
    report = {
        "layout": layout.describe(), "request_mb": round(work[0][1][0].nbytes * layout.num_layers / 1e6, 1),
        "requests": args.requests, "repeat": args.repeat, **results,
        "ratio": {"store": d["store_gbps"] / i["store_gbps"], "retrieve": d["retrieve_gbps"] / i["retrieve_gbps"]},
        "control_rtt_us": {"async_p50": statistics.median(raw_ping) * 1e6,
                           "async_p99": float(np.percentile(raw_ping, 99)) * 1e6,
                           "sync_client_p50": statistics.median(sync_ping) * 1e6},
    }
    print(f"{'':<12}{'store GB/s':>12}{'retrieve GB/s':>15}{'retrieve ms':>13}{'min ms':>8}"
          f"{'CPU s/GB (r)':>14}{'lookup us':>11}")
    for name in ("inprocess", "daemon"):
        r = results[name]
        print(f"{name:<12}{r['store_gbps']:>12.2f}{r['retrieve_gbps']:>15.2f}{r['retrieve_ms']:>13.1f}"
              f"{r['retrieve_ms_min']:>8.1f}{r['retrieve_cpu_s_per_gb']:>14.2f}{r['lookup_us']:>11.0f}")
    print(f"daemon/in-process: store {report['ratio']['store']:.0%}, retrieve {report['ratio']['retrieve']:.0%}")
    rtt = report["control_rtt_us"]
    print(f"control round trip (ping, Unix socket): p50 {rtt['async_p50']:.0f} us, p99 {rtt['async_p99']:.0f} us;"
          f" sync client p50 {rtt['sync_client_p50']:.0f} us")
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    measure(argv)
    return 0


if __name__ == "__main__":
    main()
