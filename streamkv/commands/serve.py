"""``streamkv serve``: run the cache daemon in the foreground."""

from __future__ import annotations

import argparse
from typing import Any

from streamkv.config import StreamKVConfig
from streamkv.logs import configure_logging

GIB = 1 << 30


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the cache daemon (tiers in their own process)",
                       description="Run the streamkv cache daemon in the foreground until SIGTERM/SIGINT.")
    p.add_argument("--config", help="YAML configuration file (flags override it)")
    p.add_argument("--memory-gb", type=float, help="memory tier capacity")
    p.add_argument("--disk-dir", help="disk tier directory")
    p.add_argument("--disk-gb", type=float, help="disk tier capacity")
    p.add_argument("--s3-url", help="s3://bucket[/prefix] for the S3 tier")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, moto, ...)")
    p.add_argument("--tiers", help="comma-separated tiers, fastest first (memory,disk,s3)")
    p.add_argument("--write-policy", choices=["write_through", "write_back"])
    p.add_argument("--eviction", choices=["lru"], default="lru", help="eviction policy (lru)")
    p.add_argument("--chunk-size", type=int,
                   help="accepted for parity with the configuration; the daemon stores chunk objects of any size")
    p.add_argument("--socket", help="Unix socket path (mode 0600)")
    p.add_argument("--tcp", help="also listen on TCP: PORT or HOST:PORT (host defaults to 127.0.0.1)")
    p.add_argument("--token", help="shared token TCP clients must present (or STREAMKV_TOKEN)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus text metrics on 127.0.0.1:PORT")
    p.add_argument("--shm-gb", type=float, default=1.0, help="shared-memory pool for bulk transfers")
    p.add_argument("--copy-reads", action="store_true",
                   help="copy every read and put through the connection's staging area instead of "
                        "sharing the memory tier's shared-memory objects with clients by reference")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["console", "json"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamkv.server.daemon import run_daemon

    overrides = {
        "memory_gb": args.memory_gb, "disk_dir": args.disk_dir, "disk_gb": args.disk_gb,
        "s3_url": args.s3_url, "s3_endpoint": args.s3_endpoint, "tiers": args.tiers,
        "write_policy": args.write_policy, "chunk_size": args.chunk_size, "socket": args.socket,
        "tcp": args.tcp, "token": args.token, "metrics_port": args.metrics_port,
        "log_level": args.log_level or "info", "log_format": args.log_format,
    }
    config = StreamKVConfig.load(args.config, **overrides)
    configure_logging(config.log_format, config.log_level)
    return run_daemon(config, shm_bytes=int(args.shm_gb * GIB), zero_copy=not args.copy_reads)
