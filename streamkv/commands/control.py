"""Control subcommands against a running daemon: status, lookup, pin, unpin,
clear, move, compress, health, stats.

Chunks are named by ``--key`` (store keys, repeatable) or by ``--tokens`` with
the namespace they were stored under (``--model`` and ``--layout`` as the
engine describes it, e.g. ``mha:L30:H3:D64:bfloat16:C256``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable

from streamkv.errors import ConfigError

COMMANDS = ("status", "lookup", "pin", "unpin", "clear", "move", "compress", "health", "stats")
_LAYOUT = re.compile(r"^(mha|mla):L(\d+):H(\d+):D(\d+):([a-z0-9_]+):C(\d+)$")


def _endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file (socket, tcp, token)")
    p.add_argument("--socket", help="daemon Unix socket")
    p.add_argument("--tcp", help="daemon TCP address HOST:PORT")
    p.add_argument("--token", help="token for TCP")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _key_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--key", action="append", default=[], help="a store key (repeatable)")
    p.add_argument("--tokens", help="token ids, comma-separated, or @FILE with ids separated by spaces/commas")
    p.add_argument("--model", help="model fingerprint of the namespace (with --tokens)")
    p.add_argument("--layout", help="layout as the engine describes it, e.g. mha:L30:H3:D64:bfloat16:C256")
    p.add_argument("--tp-rank", type=int, default=0)
    p.add_argument("--tp-size", type=int, default=1)
    p.set_defaults(keys_required=required)


def register(sub: Any) -> None:
    specs: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
        "status": ("summary of a running daemon", lambda p: None),
        "lookup": ("hit length and the tiers holding each chunk", lambda p: _key_args(p, True)),
        "pin": ("keep chunks in the memory tier (never evicted)", lambda p: _key_args(p, True)),
        "unpin": ("let pinned chunks be evicted again", lambda p: _key_args(p, True)),
        "clear": ("delete chunks: --all, --namespace or --prefix", _clear_args),
        "move": ("promote or demote chunks to a tier", _move_args),
        "compress": ("re-encode stored chunks with lz4 where it pays", _compress_args),
        "health": ("is the daemon and each tier answering", lambda p: None),
        "stats": ("per-tier usage, hit rate, bytes in and out", lambda p: None),
    }
    for name, (text, extra) in specs.items():
        p = sub.add_parser(name, help=text, description=text)
        _endpoint_args(p)
        extra(p)
        p.set_defaults(func=lambda args, name=name: run(name, args))


def _clear_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every chunk of every namespace")
    p.add_argument("--namespace", help="one namespace id (32 hex characters)")
    p.add_argument("--prefix", help="keys starting with this prefix")


def _move_args(p: argparse.ArgumentParser) -> None:
    _key_args(p, True)
    p.add_argument("--to", required=True, dest="tier", help="target tier: memory, disk or s3")


def _compress_args(p: argparse.ArgumentParser) -> None:
    _key_args(p)
    p.add_argument("--namespace", help="only this namespace id")


def parse_layout(text: str) -> Any:
    from streamkv.layout import KVLayout

    m = _LAYOUT.match(text or "")
    if not m:
        raise ConfigError("layout", text, "expected e.g. mha:L30:H3:D64:bfloat16:C256")
    kind, layers, heads, head, dtype, chunk = m.groups()
    return KVLayout(int(layers), int(heads), int(head), dtype, int(chunk), kind == "mla")


def _read_tokens(text: str) -> list[int]:
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    try:
        return [int(t) for t in re.split(r"[\s,]+", text.strip()) if t]
    except ValueError as exc:
        raise ConfigError("tokens", text[:40], "expected integer token ids") from exc


def selected_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --key, plus the chunk keys of --tokens under --model/--layout."""
    from streamkv.keys import Namespace, chunk_keys

    keys = list(args.key)
    if args.tokens:
        if not args.model or not args.layout:
            raise ConfigError("tokens", args.tokens[:40], "--tokens needs --model and --layout")
        layout = parse_layout(args.layout)
        ns = Namespace(args.model, layout, args.tp_rank, args.tp_size)
        keys += chunk_keys(_read_tokens(args.tokens), layout.chunk_size, ns)
    if not keys and getattr(args, "keys_required", False):
        raise ConfigError("key", None, "name chunks with --key or --tokens/--model/--layout")
    return keys


def _client(args: argparse.Namespace) -> Any:
    from streamkv.client import DaemonClient
    from streamkv.config import StreamKVConfig

    config = StreamKVConfig.load(args.config, socket=args.socket, tcp=args.tcp, token=args.token)
    if args.tcp and not args.socket:
        return DaemonClient(tcp=config.tcp, token=config.token)
    return DaemonClient.from_config(config)


def run(name: str, args: argparse.Namespace) -> int:
    from streamkv.client import DaemonError, DaemonUnavailable

    try:
        client = _client(args)
    except ConfigError:
        raise
    try:
        result = _dispatch(name, args, client)
    except (DaemonUnavailable, DaemonError) as exc:
        print(f"streamkv {name}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_render(name, result))
    if name == "health" and not result.get("ok"):
        return 1
    return 0


def _dispatch(name: str, args: argparse.Namespace, client: Any) -> Any:
    if name == "status":
        return {"health": client.health(), "stats": client.stats()}
    if name in ("health", "stats"):
        return client.call(name)
    if name == "clear":
        if not (args.all or args.namespace or args.prefix):
            raise ConfigError("clear", None, "say what to clear: --all, --namespace NS or --prefix P")
        return {"deleted": client.clear(None if args.all else args.namespace, args.prefix)}
    if name == "compress":
        keys = selected_keys(args)
        return client.compress(args.namespace, keys or None)
    keys = selected_keys(args)
    if name == "lookup":
        return {"keys": keys, **client.lookup(keys)}
    if name == "move":
        return {"moved": client.move(keys, args.tier), "requested": len(keys)}
    return {name + "ned": getattr(client, name)(keys), "requested": len(keys)}  # pinned / unpinned


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _render(name: str, r: Any) -> str:
    if name == "lookup":
        lines = [f"hit: {r['hit_chunks']} of {len(r['keys'])} chunks"]
        lines += [f"  {k}  {','.join(t) or '-'}" for k, t in zip(r["keys"], r["tiers"])]
        return "\n".join(lines)
    if name in ("health", "status"):
        h = r["health"] if name == "status" else r
        lines = [f"daemon pid {h.get('pid')}  up {h.get('uptime_s', 0):.0f}s  socket {h.get('socket')}"
                 + (f"  tcp {h['tcp']}" if h.get("tcp") else ""),
                 f"health: {'ok' if h.get('ok') else 'DEGRADED'}"]
        lines += [f"  {t['tier']:<7} {'ok' if t['ok'] else 'FAIL'}  probe {t.get('probe_ms')} ms"
                  + (f"  circuit {t['circuit']}" if "circuit" in t else "") for t in h.get("tiers", [])]
        if name == "status":
            lines.append(_render("stats", r["stats"]))
        return "\n".join(lines)
    if name == "stats":
        s, d = r["store"], r["counters"]
        rate = "n/a" if s.get("hit_rate") is None else f"{100 * s['hit_rate']:.1f}%"
        lines = [f"hits {s.get('hits', 0)}  misses {s.get('misses', 0)}  hit rate {rate}  "
                 f"pending writes {s.get('pending', 0)}",
                 f"bytes in {_size(d.get('bytes_in'))}  out {_size(d.get('bytes_out'))}  requests {d.get('requests')}"
                 f"  connections {d.get('connections')}  protocol errors {d.get('protocol_errors')}"
                 f"  auth failures {d.get('auth_failures')}"]
        for t in s.get("tiers", []):
            used = f"{_size(t.get('used_bytes'))} / {_size(t.get('capacity_bytes'))}" if "used_bytes" in t else ""
            lines.append(f"  {t['tier']:<7} {t.get('objects', '?')} objects  {used}  hits {t.get('hits', 0)}"
                         f"  misses {t.get('misses', 0)}  evictions {t.get('evictions', 0)}"
                         + (f"  pinned {_size(t['pinned_bytes'])}" if t.get("pinned_bytes") else ""))
        sh = r.get("shm", {})
        lines.append(f"  shm     {sh.get('segments')} segments  {_size(sh.get('used_bytes'))} used"
                     f" of {_size(sh.get('mapped_bytes'))} mapped")
        return "\n".join(lines)
    if name in ("pin", "unpin", "move"):
        done = r.get("pinned", r.get("unpinned", r.get("moved")))
        return f"{name}: {done} of {r['requested']} chunks"
    if name == "clear":
        return f"deleted {r['deleted']} chunks"
    if name == "compress":
        return (f"examined {r['examined']} objects, recompressed {r['recompressed']} "
                f"({_size(r['bytes_before'])} -> {_size(r['bytes_after'])}), corrupt {r['corrupt']}")
    return json.dumps(r, default=str)
