"""Chunk-key hashing cost for long prompts: streamkv's chained xxh3-128 vs chained SHA-256.

SHA-256 chaining over the token bytes is what SGLang's page hashes and vLLM's
block hashes do (sha256 of parent + tokens); streamkv uses xxh3-128, which is
not cryptographic but collision-resistant enough for a cache whose objects also
carry the namespace and checksums. Prints JSON and a table."""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time

import numpy as np

from streamkv.keys import Namespace, chunk_keys
from streamkv.layout import KVLayout


def sha256_chain(tokens: np.ndarray, chunk: int) -> list[str]:
    data = memoryview(np.ascontiguousarray(tokens, dtype=np.uint32)).cast("B")
    parent = b""
    out = []
    for i in range(len(tokens) // chunk):
        parent = hashlib.sha256(parent + bytes(data[i * chunk * 4 : (i + 1) * chunk * 4])).digest()
        out.append(parent.hex())
    return out


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamkv bench keys", description=__doc__)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tokens = np.random.default_rng(0).integers(0, 128000, args.tokens)
    ns = Namespace("bench", KVLayout(32, 8, 128, "bfloat16", args.chunk_size))
    chunks = args.tokens // args.chunk_size
    ours = timed(lambda: chunk_keys(tokens, args.chunk_size, ns), args.repeats)
    base = timed(lambda: sha256_chain(tokens, args.chunk_size), args.repeats)
    result = {
        "benchmark": "keys", "tokens": args.tokens, "chunk_size": args.chunk_size, "chunks": chunks,
        "streamkv_total_ms": ours * 1e3, "streamkv_us_per_chunk": ours / chunks * 1e6,
        "sha256_total_ms": base * 1e3, "sha256_us_per_chunk": base / chunks * 1e6, "speedup": base / ours,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'method':<22} {'total':>10} {'per chunk':>11}")
        print(f"{'streamkv xxh3-128':<22} {ours * 1e3:>8.2f}ms {ours / chunks * 1e6:>9.2f}us")
        print(f"{'chained sha256':<22} {base * 1e3:>8.2f}ms {base / chunks * 1e6:>9.2f}us")
        print(f"{args.tokens} tokens, {chunks} chunks; streamkv is {base / ours:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
