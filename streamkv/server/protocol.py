"""The daemon's wire protocol: length-prefixed msgpack frames.

A frame is a 4-byte big-endian length, then a msgpack map. Requests are
``{"id", "op", ...args}``, replies ``{"id", "ok", ...}`` or ``{"id", "ok":
False, "error"}``. The first frame of a connection is ``hello`` (protocol
version, and the token when the daemon requires one). Bulk bytes never travel
in frames: they go through the connection's shared-memory staging area. A
frame longer than ``MAX_FRAME`` or one that is not a msgpack map is a
protocol error, and the peer drops the connection."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from anyio.abc import ByteStream

PROTOCOL_VERSION = 1
MAX_FRAME = 4 << 20  # control frames only; bulk data is in shared memory
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that cannot be trusted: the connection is dropped."""


class PeerClosed(ProtocolError):
    """The other side closed the connection between frames."""


def pack(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds MAX_FRAME={MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def unpack(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"frame is a {type(message).__name__}, expected a map")
    return message


class FrameReader:
    """Reads whole frames from a byte stream, keeping any extra bytes for the next one."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def _fill(self, n: int, between_frames: bool) -> None:
        import anyio

        while len(self._buf) < n:
            try:
                chunk = await self.stream.receive(max(65536, n - len(self._buf)))
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError,
                    ConnectionError) as exc:
                if between_frames and not self._buf:
                    raise PeerClosed("connection closed") from exc
                raise ProtocolError("connection closed mid-frame") from exc
            self._buf += chunk

    async def read(self) -> dict[str, Any]:
        await self._fill(_LEN.size, between_frames=True)
        (length,) = _LEN.unpack_from(self._buf, 0)
        if length == 0 or length > MAX_FRAME:
            raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
        await self._fill(_LEN.size + length, between_frames=False)
        body = bytes(self._buf[_LEN.size : _LEN.size + length])
        del self._buf[: _LEN.size + length]
        return unpack(body)


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A typed request field, or a ProtocolError naming it."""
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"field {name!r}: expected {kind}, got {type(value).__name__}")
    return value
