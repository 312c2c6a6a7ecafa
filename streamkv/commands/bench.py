"""``streamkv bench NAME``: one entry point for the scripts in benchmarks/.

The scripts live beside the package in the repository (they are not part of
the installed library); each has ``main(argv)`` and prints JSON and a table."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

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
    p = sub.add_parser("bench", help="run a benchmark (prints a table; --json for JSON)")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = BENCH_DIR / BENCHMARKS[args.name]
    if not path.exists():
        raise ConfigError("bench", args.name, f"{path} is not here (benchmarks ship with the repository)")
    spec = importlib.util.spec_from_file_location(f"streamkv_bench_{args.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)
