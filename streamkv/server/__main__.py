"""``python -m streamkv.server [serve flags]``: the daemon without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys

from streamkv.commands import serve
from streamkv.errors import StreamKVError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamkv.server")
    sub = parser.add_subparsers(dest="command")
    serve.register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return serve.run(args)
    except StreamKVError as exc:
        print(f"streamkv serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
