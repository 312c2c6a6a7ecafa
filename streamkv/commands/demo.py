"""``streamkv demo``: the main job on an embedded default (memory + disk tier, no server)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="replay a chat + document workload on SmolLM2, cold then warm")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="scale the workload so the longest prompt has this many tokens (default: as in the trace)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate per request")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the disk tier lives (default ~/.cache/streamkv/demo)")
    p.add_argument("--trace", type=Path, default=None, help="a JSONL workload trace (default traces/demo.jsonl)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamkv.demo import DEFAULT_TRACE, format_table, run_demo

    rows = run_demo(args.cache_dir, args.trace or DEFAULT_TRACE, args.prompt_tokens, args.new_tokens,
                    progress=not args.json)
    if args.json:
        print(json.dumps({"rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(format_table(rows))
        hit = sum(r.hit_tokens for r in rows)
        total = sum(r.prompt_tokens for r in rows)
        print(f"\n{hit} of {total} prompt tokens served from the cache; "
              f"outputs identical: {all(r.outputs_identical for r in rows)}")
    return 0 if all(r.outputs_identical for r in rows) else 1
