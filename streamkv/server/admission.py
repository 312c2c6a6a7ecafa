"""Who may talk to the daemon: the hello's protocol version, and the peer.

The Unix socket is guarded by its file mode and, where Linux tells, by the peer's uid
(the daemon's own user or root); TCP by the shared token, compared in constant time.
A refused peer gets one reply saying why; a hello of another protocol is a malformed frame."""

from __future__ import annotations

import hmac
import os
import socket
import struct
from typing import Any

import structlog
from anyio.abc import SocketAttribute, SocketStream

from streamkv.server.protocol import PROTOCOL_VERSION, ProtocolError

log = structlog.get_logger(__name__)


def peer_uid(stream: SocketStream) -> int | None:
    """The uid of a Unix-socket peer (Linux SO_PEERCRED), None elsewhere."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
        if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    except Exception:
        return None


def refusal(hello: dict[str, Any], transport: str, stream: SocketStream, token: str | None) -> str | None:
    """None when the peer may go on; else the reason to send back. Raises ``ProtocolError``
    for a frame that is not a hello of this protocol version."""
    if hello.get("op") != "hello" or hello.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"expected hello version {PROTOCOL_VERSION}, got op={hello.get('op')!r}")
    if transport == "unix":
        uid = peer_uid(stream)
        if uid is not None and uid not in (os.getuid(), 0):
            log.error("unix peer of another user refused", uid=uid)
            return "refused"
    if transport == "tcp":
        given = hello.get("token")
        if not token or not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
            log.error("wrong or missing token; connection refused", transport=transport)
            return "bad token"
    return None
