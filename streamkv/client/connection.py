"""One client connection to the daemon: hello, request/reply, the staging region.

Requests on one connection are strictly one at a time (the store keeps a pool
of connections for concurrency), so the staging region the daemon gave this
connection is the connection's alone between a request and its reply."""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import anyio
import numpy as np
from anyio.abc import ByteStream

from streamkv.errors import StreamKVError
from streamkv.server.protocol import PROTOCOL_VERSION, FrameReader, ProtocolError, pack
from streamkv.server.shm import ShmAttachments
from streamkv.telemetry import inject_traceparent


class DaemonUnavailable(StreamKVError):
    """The daemon cannot be reached (or refused us); data calls turn this into misses."""


class DaemonRefused(DaemonUnavailable):
    """The endpoint is not one we trust (socket permissions, token)."""


class DaemonError(StreamKVError):
    """The daemon answered a request with an error (a bad argument)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket path, or TCP ``host:port`` with a token."""

    socket: str | None = None
    tcp: str | None = None
    token: str | None = None

    def describe(self) -> str:
        return f"tcp://{self.tcp}" if self.tcp else f"unix://{self.socket}"


def check_socket(path: str) -> None:
    """Refuse a socket that another user owns or that others may write to."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise DaemonUnavailable(f"socket={path!r}: no daemon listening (file missing)") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonRefused(f"socket={path!r}: not a socket")
    if st.st_uid != os.getuid():
        raise DaemonRefused(f"socket={path!r}: owned by uid {st.st_uid}, not us ({os.getuid()})")
    if st.st_mode & 0o077:
        raise DaemonRefused(f"socket={path!r}: mode {oct(st.st_mode & 0o777)} lets other users in; want 0600")


class _LeaseDone:
    """Counts down the parts of one lease; the last one queues the lease for freeing."""

    def __init__(self, lease: int, parts: int, releases: deque[int]) -> None:
        self.lease = lease
        self.left = parts
        self.releases = releases
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.releases.append(self.lease)


class Connection:
    def __init__(self, stream: ByteStream, attachments: ShmAttachments) -> None:
        self.stream = stream
        self.reader = FrameReader(stream)
        self.attachments = attachments
        self.staging: tuple[str, int, int] | None = None
        self.daemon_pid: int | None = None
        self.put_by_reference = False  # the daemon takes objects written into its memory tier
        self._next = 0
        self.broken = False
        self.releases: deque[int] = deque()  # lease ids to free, sent with the next request

    @classmethod
    async def open(cls, endpoint: Endpoint, attachments: ShmAttachments) -> Connection:
        try:
            if endpoint.tcp:
                host, _, port = endpoint.tcp.rpartition(":")
                stream: ByteStream = await anyio.connect_tcp(host or "127.0.0.1", int(port))
            else:
                assert endpoint.socket is not None
                check_socket(endpoint.socket)
                stream = await anyio.connect_unix(endpoint.socket)
        except DaemonUnavailable:
            raise
        except OSError as exc:
            raise DaemonUnavailable(f"{endpoint.describe()}: {exc.strerror or exc}") from exc
        conn = cls(stream, attachments)
        try:
            reply = await conn._roundtrip({"op": "hello", "version": PROTOCOL_VERSION, "token": endpoint.token})
        except BaseException:
            await conn.aclose()
            raise
        if not reply.get("ok"):
            await conn.aclose()
            raise DaemonRefused(f"{endpoint.describe()}: hello refused ({reply.get('error')})")
        conn.daemon_pid = reply.get("pid")
        conn.put_by_reference = reply.get("put_by_reference") is True
        conn._set_staging(reply.get("staging"))
        return conn

    def _set_staging(self, wire: Any) -> None:
        if isinstance(wire, list) and len(wire) == 3:
            self.staging = (str(wire[0]), int(wire[1]), int(wire[2]))

    async def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        message["id"] = self._next
        try:
            await self.stream.send(pack(message))
            reply = await self.reader.read()
        except BaseException:
            self.broken = True
            raise
        if reply.get("id") != self._next:
            self.broken = True
            raise ProtocolError(f"reply id {reply.get('id')} for request {self._next}")
        return reply

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; DaemonError for an answered error."""
        message = {"op": op, **args}
        inject_traceparent(message)  # W3C traceparent: the daemon's spans join the caller's trace
        if self.releases:
            freed = []
            while self.releases and len(freed) < 4096:
                freed.append(self.releases.popleft())
            message["free"] = freed
        reply = await self._roundtrip(message)
        self._set_staging(reply.get("staging"))
        if not reply.get("ok"):
            raise DaemonError(f"{op}: {reply.get('error')}")
        return reply.get("result")

    @property
    def staging_size(self) -> int:
        return 0 if self.staging is None else self.staging[2]

    def write_staging(self, objects: Sequence[memoryview]) -> list[tuple[int, int]]:
        """Copy objects back to back into staging; returns (offset, length) of each."""
        assert self.staging is not None
        seg, off, size = self.staging
        view = self.attachments.view(seg, off, size)
        spans, pos = [], 0
        try:
            for obj in objects:
                n = len(obj)
                view[pos : pos + n] = obj
                spans.append((pos, n))
                pos += n
        finally:
            view.release()
        return spans

    def write_regions(self, regions: Sequence[Any], objects: Sequence[memoryview]) -> None:
        """Copy each object into the region of the daemon's memory tier allocated for it."""
        for (seg, off, n), obj in zip(regions, objects):
            if n != len(obj):
                raise ProtocolError(f"alloc answered {n} bytes for an object of {len(obj)}")
            view = self.attachments.view(seg, off, n)
            try:
                view[:] = obj
            finally:
                view.release()

    def read_staging(self, spans: Sequence[Any]) -> list[list[memoryview] | None]:
        """Copy a reply's parts out of staging with one copy (the region is reused by the
        next request); ``spans[i]`` is ``[offset, [lengths]]`` or None. Parts are views of
        one private buffer."""
        assert self.staging is not None
        seg, off, size = self.staging
        try:
            ends = [int(s[0]) + sum(int(n) for n in s[1]) for s in spans if isinstance(s, list)]
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ProtocolError(f"malformed get reply: {exc}") from exc
        total = max(ends, default=0)
        if total > size or any(int(s[0]) < 0 for s in spans if isinstance(s, list)):
            raise ProtocolError(f"reply ranges end at {total}, outside staging of {size} bytes")
        buf = np.empty(total, dtype=np.uint8)
        if total:
            view = self.attachments.view(seg, off, total)
            try:
                buf[:] = np.frombuffer(view, dtype=np.uint8)
            finally:
                view.release()
        whole = memoryview(buf)
        out: list[list[memoryview] | None] = []
        for span in spans:
            if span is None:
                out.append(None)
                continue
            if isinstance(span, dict):
                out.append(self._by_reference(span))
                continue
            pos, parts = int(span[0]), []
            for n in span[1]:
                parts.append(whole[pos : pos + int(n)])
                pos += int(n)
            out.append(parts)
        return out

    def _by_reference(self, span: dict[str, Any]) -> list[memoryview]:
        """Views of the daemon's own objects; the lease is freed once every view is gone."""
        try:
            refs = [(str(seg), int(off), int(n)) for seg, off, n in span["refs"]]
            done = _LeaseDone(int(span["lease"]), len(refs), self.releases)
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"malformed reference in a get reply: {exc}") from exc
        try:
            return [self.attachments.array(seg, off, n, done) for seg, off, n in refs]
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"cannot map a referenced region: {exc}") from exc

    async def aclose(self) -> None:
        self.broken = True
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except Exception:
                pass
