"""``streamkv trace generate|validate|show``: make and inspect workload traces."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamkv.traces import KINDS, GenerateOptions, dumps, generate, read_trace, reusable_tokens, write_trace


def register(sub: Any) -> None:
    parser = sub.add_parser("trace", help="generate and check workload traces (JSONL)")
    tsub = parser.add_subparsers(dest="trace_command", required=True, metavar="ACTION")

    gen = tsub.add_parser("generate", help="write a seeded trace of chat, rag or agent requests")
    gen.add_argument("--kind", choices=KINDS, required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--requests", type=int, default=12, help="number of requests (default 12)")
    gen.add_argument("--sessions", type=int, default=3, help="conversations / users / agents (default 3)")
    gen.add_argument("--max-context", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    gen.add_argument("--docs", type=int, default=4, help="rag: documents in the pool (default 4)")
    gen.add_argument("--rate", type=float, default=0.5, help="mean arrivals per second (default 0.5)")
    gen.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    gen.set_defaults(func=_generate)

    val = tsub.add_parser("validate", help="check a trace file against the schema")
    val.add_argument("path")
    val.add_argument("--chunk-size", type=int, default=256)
    val.set_defaults(func=_validate)


def _generate(args: argparse.Namespace) -> int:
    opts = GenerateOptions(kind=args.kind, seed=args.seed, requests=args.requests, sessions=args.sessions,
                           max_context=args.max_context, docs=args.docs, rate=args.rate)
    requests = generate(opts)
    if args.output:
        write_trace(requests, args.output)
        print(f"wrote {len(requests)} requests to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(dumps(requests))
    return 0


def _validate(args: argparse.Namespace) -> int:
    requests = read_trace(args.path)
    prompt = sum(r.prompt_len for r in requests)
    reuse = sum(reusable_tokens(requests, args.chunk_size))
    kinds = sorted({r.kind for r in requests})
    print(f"{args.path}: {len(requests)} requests, kinds {kinds}, {prompt} prompt tokens, "
          f"longest {max((r.prompt_len for r in requests), default=0)}, "
          f"reusable at chunk {args.chunk_size}: {reuse} ({reuse / max(prompt, 1):.0%})")
    return 0
