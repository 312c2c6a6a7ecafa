"""The ``streamkv`` command line: one subcommand per module in ``streamkv.commands``.

Each command module has ``register(subparsers)`` that adds its parser and sets
``func``; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from streamkv.errors import StreamKVError

COMMAND_MODULES = (
    "streamkv.commands.serve",
    "streamkv.commands.control",
    "streamkv.commands.demo",
    "streamkv.commands.bench",
    "streamkv.commands.trace",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamkv", description="KV-cache layer for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StreamKVError as exc:
        print(f"streamkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
