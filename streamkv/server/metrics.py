"""Prometheus text metrics of the daemon on ``127.0.0.1:<metrics_port>``.

A minimal HTTP responder: every request gets the current counters of the
daemon, each tier and the shared-memory pool, in the Prometheus text format.
It binds to loopback only; expose it further with a proxy if needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import SocketStream, TaskGroup

if TYPE_CHECKING:
    from streamkv.server.daemon import Daemon

log = structlog.get_logger(__name__)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render(daemon: Daemon) -> str:
    lines = []
    for name, value in sorted(daemon.counters.items()):
        lines.append(f"streamkv_daemon_{name}_total {value}")
    lines.append(f"streamkv_daemon_open_connections {daemon.open_connections}")
    lines.append(f"streamkv_daemon_uptime_seconds {daemon.describe()['uptime_s']}")
    for name, value in sorted(daemon.shm.stats().items()):
        lines.append(f"streamkv_shm_{name} {value}")
    if daemon.store is not None:
        stats = daemon.store.stats()
        for name in ("hits", "misses", "pending"):
            lines.append(f"streamkv_store_{name} {stats.get(name, 0)}")
        for tier in stats.get("tiers", []):
            for name, value in sorted(tier.items()):
                if _number(value):
                    lines.append(f'streamkv_tier_{name}{{tier="{tier["tier"]}"}} {value}')
    return "\n".join(lines) + "\n"


async def start_metrics(daemon: Daemon, port: int, group: TaskGroup) -> int:
    """Listen on loopback; returns the bound port (``port`` may be 0)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)

    async def handle(stream: SocketStream) -> None:
        try:
            async with stream:
                request = b""
                with anyio.move_on_after(5):
                    while b"\r\n\r\n" not in request and len(request) < 16384:
                        request += await stream.receive(4096)
                body = render(daemon).encode()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
                await stream.send(head + body)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("metrics request dropped", error=repr(exc))

    bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    group.start_soon(listener.serve, handle)
    log.info("metrics endpoint ready", port=bound)
    return bound
