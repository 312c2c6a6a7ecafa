"""``streamkv serve``: the tiers in a process of their own.

The daemon owns a ``TieredStore`` built from the configuration and serves
chunk objects by key to any number of engine processes, of any model: keys
carry the namespace and objects verify themselves, so the daemon never needs
a layout. It listens on a Unix socket (mode 0600, peers of another user
refused) and optionally on TCP with a shared token. On SIGTERM/SIGINT it
stops accepting, lets in-flight requests finish, flushes background writes
to the lower tiers, closes the tiers and removes its socket and shared memory."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import anyio
import structlog
from anyio.abc import SocketStream, TaskGroup

from streamkv import control
from streamkv.config import StreamKVConfig
from streamkv.errors import ConfigError, StreamKVError
from streamkv.server.leases import DaemonTieredStore, LeaseTable, ShmMemoryStore
from streamkv.server.metrics import start_metrics
from streamkv.server.session import Session
from streamkv.server.shm import ShmPool
from streamkv.store.limits import Limits
from streamkv.store.tiered import TieredStore
from streamkv.store.base import Store
from streamkv.store.memory import MemoryStore
from streamkv.telemetry import Telemetry

log = structlog.get_logger(__name__)
MAX_CONNECTIONS = 512


class DaemonAlreadyRunning(StreamKVError):
    pass


def daemon_tiers(config: StreamKVConfig, limits: Limits, tier_shm: ShmPool | None) -> list[Store]:
    """The configured tiers. The memory tier lives in shared memory (``tier_shm``) so reads
    are handed out by reference; it is never page-locked: the daemon never copies to a GPU,
    so pinning gigabytes here would only take them from the engines."""
    from streamkv.store.disk import DiskStore

    tiers: list[Store] = []
    for name in config.tiers or ():
        if name == "memory":
            tiers.append(ShmMemoryStore(config.memory_bytes, tier_shm) if tier_shm is not None
                         else MemoryStore(config.memory_bytes, pinned=False))
        elif name == "disk":
            tiers.append(DiskStore(config.disk_dir, config.disk_bytes, fsync=config.disk_fsync, limits=limits))
        elif name == "s3":
            from streamkv.store.s3 import S3Store

            tiers.append(S3Store.from_config(config, limits))
    return tiers


def _warn_if_shm_small(want: int, path: str = "/dev/shm") -> None:
    try:
        st = os.statvfs(path)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < want:
        log.warning("/dev/shm is smaller than the memory tier and staging pools; objects that do "
                    "not fit there are kept in plain memory and served by copy",
                    shm_free_bytes=free, wanted_bytes=want)


def parse_tcp(value: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT``; the host defaults to 127.0.0.1."""
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
    except ValueError as exc:
        raise ConfigError("tcp", value, "expected PORT or HOST:PORT") from exc
    if not 0 <= number < 65536:
        raise ConfigError("tcp", value, "port out of range")
    return host or "127.0.0.1", number


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0700 when we make it); refuse a live daemon, drop a stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        log.info("stale socket removed", socket=str(path))
        return
    finally:
        probe.close()
    raise DaemonAlreadyRunning(f"socket={str(path)!r}: a daemon is already listening there")


class Daemon:
    def __init__(self, config: StreamKVConfig, shm_bytes: int = 1 << 30, zero_copy: bool = True) -> None:
        if config.tcp and not config.token:
            raise ConfigError("token", None, "required when listening on TCP (--token or STREAMKV_TOKEN)")
        self.config = config
        self.socket_path = Path(config.socket).expanduser()
        self.tcp = parse_tcp(config.tcp) if config.tcp else None
        self.shm = ShmPool(shm_bytes)  # per-connection staging regions
        self.zero_copy = zero_copy
        # the memory tier's own objects; headroom for fragmentation and leased, evicted objects
        segment = min(1 << 30, max(64 << 20, config.memory_bytes // 32))
        self.tier_shm = ShmPool(config.memory_bytes + config.memory_bytes // 4 + segment, segment, addressable=True)
        self.tier_shm.quiet = True
        _warn_if_shm_small(self.tier_shm.capacity_bytes + shm_bytes)
        self.leases = LeaseTable()
        self.counters: Counter[str] = Counter(
            {k: 0 for k in ("connections", "requests", "protocol_errors", "auth_failures", "bytes_in",
                            "bytes_out", "bytes_out_by_reference", "staging_misses")})
        self.open_connections = 0
        self.started = time.time()
        self.store: TieredStore = None  # type: ignore[assignment]
        self.tcp_port: int | None = None
        self.metrics_port: int | None = None
        self._stop: anyio.Event | None = None

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
                "socket": str(self.socket_path), "tcp": None if self.tcp is None else f"{self.tcp[0]}:{self.tcp_port}",
                "open_connections": self.open_connections, "metrics_port": self.metrics_port,
                "tier_names": [t.name for t in self.store.tiers] if self.store is not None else []}

    def stop(self) -> None:
        """Ask a running daemon to shut down gracefully (from its own loop)."""
        if self._stop is not None:
            self._stop.set()

    async def serve(self, on_ready: Callable[[Daemon], None] | None = None) -> None:
        self._stop = anyio.Event()
        limits = Limits(disk_io=self.config.disk_io_threads, s3_requests=self.config.s3_max_concurrency,
                        codec=self.config.codec_threads)
        tiers = daemon_tiers(self.config, limits, self.tier_shm if self.zero_copy else None)
        prepare_socket_path(self.socket_path)
        old_umask = os.umask(0o177)
        try:
            listeners = [await anyio.create_unix_listener(self.socket_path)]
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        try:
            if self.tcp is not None:
                tcp = await anyio.create_tcp_listener(local_host=self.tcp[0], local_port=self.tcp[1])
                self.tcp_port = tcp.extra(anyio.abc.SocketAttribute.local_port)
                listeners.append(tcp)
            async with anyio.create_task_group() as background:
                self.store = DaemonTieredStore(tiers, write_policy=self.config.write_policy,
                                               promote=self.config.promote_on_hit, background=background)
                # tier spans, as children of the engine's request spans (the daemon serves
                # its own Prometheus endpoint, so none is bound here)
                self.store.telemetry = Telemetry.from_config(self.config.replace(metrics_port=None))
                async with anyio.create_task_group() as connections:
                    for listener in listeners:
                        connections.start_soon(self._accept, listener, connections)
                    connections.start_soon(self._watch_signals)
                    if self.config.metrics_port is not None:
                        self.metrics_port = await start_metrics(self, int(self.config.metrics_port), connections)
                    log.info("daemon ready", socket=str(self.socket_path), tcp=self.describe()["tcp"],
                             tiers=[t.name for t in tiers], pid=os.getpid())
                    if on_ready is not None:
                        on_ready(self)
                    await self._stop.wait()
                    log.info("daemon stopping; finishing in-flight requests")
                    connections.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    if self.config.write_policy == "write_back":
                        written = await control.drain(self.store)
                        log.info("write-back data flushed to lower tiers", objects=written)
                    await self.store.aclose()  # waits for background writes, then closes the tiers
        finally:
            for listener in listeners:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
            self.socket_path.unlink(missing_ok=True)
            self.leases.clear()
            self.shm.close()
            self.tier_shm.close()
            log.info("daemon stopped", socket=str(self.socket_path))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received", signal=signal.Signals(signum).name)
                self.stop()
                return

    async def _accept(self, listener: Any, group: TaskGroup) -> None:
        transport = "tcp" if listener is not None and self.tcp is not None and \
            listener.extra(anyio.abc.SocketAttribute.family) != socket.AF_UNIX else "unix"

        async def handle(stream: SocketStream) -> None:
            if self.open_connections >= MAX_CONNECTIONS:
                log.error("too many connections; refused", limit=MAX_CONNECTIONS)
                await stream.aclose()
                return
            self.open_connections += 1
            self.counters["connections"] += 1
            try:
                await Session(self, stream, transport).run()
            except Exception as exc:  # one bad connection never takes the daemon down
                self.counters["session_errors"] += 1
                log.exception("connection handler failed", error=repr(exc))
            finally:
                self.open_connections -= 1

        await listener.serve(handle, task_group=group)


def run_daemon(config: StreamKVConfig, shm_bytes: int = 1 << 30, zero_copy: bool = True) -> int:
    """Run in the foreground until SIGTERM/SIGINT; the exit status for the CLI."""
    daemon = Daemon(config, shm_bytes, zero_copy)
    anyio.run(daemon.serve)
    return 0
