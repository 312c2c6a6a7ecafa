"""The chunk object: a fixed header, then one section per layer.

Header (little endian): magic, format version, header length, layout fields,
the 16-byte namespace digest, and per layer (offset, stored length, raw
length, xxh3-64 checksum, codec); it ends with its own checksum. Its size
depends only on the number of layers, so a reader that knows the layout can
fetch the header and any one section with byte ranges. A section is stored
lz4-compressed only where that saves at least ``MIN_SAVING`` of its bytes.

Decoding never returns bytes it could not verify: each kind of damage raises
its own ``FormatError`` subclass, and callers turn those into misses."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple, Sequence

import lz4.block
import xxhash

from streamkv.layout import DTYPE_SIZES, KVLayout

if TYPE_CHECKING:
    from streamkv.keys import Namespace

MAGIC = b"SKVC"
FORMAT_VERSION = 1
MIN_SAVING = 0.10  # compress a section only where lz4 saves at least this fraction
_PROBE_BYTES = 64 * 1024

CODEC_RAW = 0
CODEC_LZ4 = 1

_FIXED = struct.Struct("<4sHHIIII16sIIBB2x")
_ENTRY = struct.Struct("<QQQQB7x")
_TAIL = struct.Struct("<Q")
_DTYPE_CODES = {name: i for i, name in enumerate(sorted(DTYPE_SIZES))}
_DTYPE_NAMES = {i: name for name, i in _DTYPE_CODES.items()}


class FormatError(Exception):
    """A chunk object that cannot be trusted; always treated as a miss."""


class BadMagic(FormatError):
    pass


class UnsupportedVersion(FormatError):
    pass


class Truncated(FormatError):
    pass


class ChecksumMismatch(FormatError):
    pass


class NamespaceMismatch(FormatError):
    pass


class LayoutMismatch(FormatError):
    pass


def header_size(num_layers: int) -> int:
    """Bytes of a chunk header for a layout with ``num_layers`` layers."""
    return _FIXED.size + num_layers * _ENTRY.size + _TAIL.size


class Section(NamedTuple):  # a tuple: built 30-80 times per object read, at tuple speed
    offset: int
    stored_len: int
    raw_len: int
    checksum: int
    codec: int


@dataclass(frozen=True)
class ChunkHeader:
    """A parsed, verified header."""

    version: int
    num_tokens: int
    namespace_digest: bytes
    layout: KVLayout
    sections: tuple[Section, ...]

    @property
    def size(self) -> int:
        return header_size(len(self.sections))

    @property
    def total_len(self) -> int:
        last = self.sections[-1]
        return last.offset + last.stored_len

    def section_range(self, layer: int) -> tuple[int, int]:
        """(offset, length) of a layer's stored bytes inside the object."""
        s = self.sections[layer]
        return s.offset, s.stored_len

    def layers_range(self, first: int, last: int) -> tuple[int, int]:
        """(offset, length) covering layers ``first..last`` inclusive, for one coalesced read."""
        start = self.sections[first].offset
        end = self.sections[last].offset + self.sections[last].stored_len
        return start, end - start


def _maybe_compress(raw: memoryview, compression: str) -> tuple[bytes | memoryview, int]:
    if compression == "off" or len(raw) < 1024:
        return raw, CODEC_RAW
    if compression == "auto":
        probe = raw[:_PROBE_BYTES]
        if len(lz4.block.compress(probe, store_size=False)) > (1 - MIN_SAVING) * len(probe):
            return raw, CODEC_RAW
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) <= (1 - MIN_SAVING) * len(raw):
        return packed, CODEC_LZ4
    return raw, CODEC_RAW


def encode_chunk(
    namespace: Namespace,
    layout: KVLayout,
    sections: Sequence[object],
    num_tokens: int | None = None,
    compression: str = "auto",
) -> bytearray:
    """Serialize one chunk: ``sections[l]`` is the raw bytes of layer ``l``.

    ``compression`` is ``auto`` (lz4 where it pays, judged on a probe),
    ``lz4`` (try every section) or ``off``."""
    if compression not in ("auto", "lz4", "off"):
        raise ValueError(f"compression={compression!r}: expected auto, lz4 or off")
    if len(sections) != layout.num_layers:
        raise ValueError(f"got {len(sections)} sections for a {layout.num_layers}-layer layout")
    tokens = layout.chunk_size if num_tokens is None else num_tokens
    if not 0 < tokens <= layout.chunk_size:
        raise ValueError(f"num_tokens={tokens}: must be in 1..{layout.chunk_size}")
    expect = tokens * layout.token_bytes
    stored: list[tuple[bytes | memoryview, int, int, int]] = []
    for layer, sec in enumerate(sections):
        raw = memoryview(sec).cast("B")  # type: ignore[arg-type]
        if len(raw) != expect:
            raise ValueError(f"section {layer}: {len(raw)} bytes, layout says {expect}")
        body, codec = _maybe_compress(raw, compression)
        stored.append((body, codec, len(raw), xxhash.xxh3_64_intdigest(body)))
    hsize = header_size(layout.num_layers)
    out = bytearray(hsize + sum(len(b) for b, *_ in stored))
    entries, offset = [], hsize
    for body, codec, raw_len, checksum in stored:
        entries.append((offset, len(body), raw_len, checksum, codec))
        out[offset : offset + len(body)] = body
        offset += len(body)
    _pack_header(out, namespace, layout, tokens, entries)
    return out


def seal_raw_chunk(buf: object, namespace: Namespace, layout: KVLayout) -> None:
    """Finish a whole raw chunk built in place: ``buf`` holds ``header_size`` bytes of room,
    then every layer's section in order; checksum them and write the header. The result is
    byte for byte ``encode_chunk(..., compression="off")`` of those sections, without the
    copy into a new object (adapters copy a caller's pages straight into ``buf``)."""
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    hsize, n = header_size(layout.num_layers), layout.section_bytes
    if len(view) < hsize + layout.chunk_bytes:
        raise ValueError(f"buffer of {len(view)} bytes; a raw chunk needs {hsize + layout.chunk_bytes}")
    entries = []
    for layer in range(layout.num_layers):
        offset = hsize + layer * n
        entries.append((offset, n, n, xxhash.xxh3_64_intdigest(view[offset : offset + n]), CODEC_RAW))
    _pack_header(view, namespace, layout, layout.chunk_size, entries)


def _pack_header(out: object, namespace: Namespace, layout: KVLayout, tokens: int,
                 entries: Sequence[tuple[int, int, int, int, int]]) -> None:
    """The header (fixed part, ``(offset, stored_len, raw_len, checksum, codec)`` per layer,
    then the header's own checksum) into the start of ``out``."""
    _FIXED.pack_into(
        out, 0, MAGIC, FORMAT_VERSION, 0, header_size(layout.num_layers), layout.num_layers, tokens,
        layout.chunk_size, namespace.digest, layout.num_kv_heads, layout.head_size,
        _DTYPE_CODES[layout.dtype], int(layout.mla),
    )
    pos = _FIXED.size
    for entry in entries:
        _ENTRY.pack_into(out, pos, *entry)
        pos += _ENTRY.size
    _TAIL.pack_into(out, pos, xxhash.xxh3_64_intdigest(memoryview(out)[:pos]))  # type: ignore[arg-type]


def parse_header(
    buf: object, namespace: Namespace | None = None, layout: KVLayout | None = None
) -> ChunkHeader:
    """Parse and verify a header from the first bytes of an object."""
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    if len(view) < _FIXED.size:
        raise Truncated(f"object is {len(view)} bytes, shorter than a header")
    (magic, version, _flags, hsize, layers, tokens, chunk_size, digest, heads, head_size,
     dtype_code, mla) = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagic(f"magic {bytes(magic)!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"format version {version}; this build reads {FORMAT_VERSION}")
    if hsize != header_size(layers) or layers == 0:
        raise ChecksumMismatch(f"header length {hsize} does not fit {layers} layers")
    if len(view) < hsize:
        raise Truncated(f"object is {len(view)} bytes, header needs {hsize}")
    tail = hsize - _TAIL.size
    (checksum,) = _TAIL.unpack_from(view, tail)
    if checksum != xxhash.xxh3_64_intdigest(view[:tail]):
        raise ChecksumMismatch("header checksum mismatch")
    if namespace is not None and bytes(digest) != namespace.digest:
        raise NamespaceMismatch("object belongs to another namespace")
    if dtype_code not in _DTYPE_NAMES:
        raise ChecksumMismatch(f"unknown dtype code {dtype_code}")
    fields = (layers, heads, head_size, dtype_code, chunk_size, mla)
    if layout is not None and fields == _layout_fields(layout):
        stored_layout = layout  # the expected layout: no new KVLayout per object read
    else:
        stored_layout = KVLayout(layers, heads, head_size, _DTYPE_NAMES[dtype_code], chunk_size, bool(mla))
        if layout is not None:
            raise LayoutMismatch(f"object layout {stored_layout.describe()} != {layout.describe()}")
    entries = view[_FIXED.size : _FIXED.size + layers * _ENTRY.size]
    sections = tuple(map(Section._make, _ENTRY.iter_unpack(entries)))
    return ChunkHeader(version, tokens, bytes(digest), stored_layout, sections)


@lru_cache(maxsize=64)
def _layout_fields(layout: KVLayout) -> tuple[int, ...]:
    """``layout`` as the header's fixed fields hold it."""
    return (layout.num_layers, layout.num_kv_heads, layout.head_size, _DTYPE_CODES[layout.dtype],
            layout.chunk_size, int(layout.mla))


def decode_section(header: ChunkHeader, layer: int, stored: object, out: object | None = None) -> memoryview:
    """Verify and decompress one layer's stored bytes; writes into ``out`` when given."""
    sec = header.sections[layer]
    view = memoryview(stored).cast("B")  # type: ignore[arg-type]
    if len(view) != sec.stored_len:
        raise Truncated(f"layer {layer}: {len(view)} bytes, header says {sec.stored_len}")
    if xxhash.xxh3_64_intdigest(view) != sec.checksum:
        raise ChecksumMismatch(f"layer {layer}: section checksum mismatch")
    if sec.codec == CODEC_LZ4:
        raw = memoryview(lz4.block.decompress(view, uncompressed_size=sec.raw_len))
        if len(raw) != sec.raw_len:
            raise ChecksumMismatch(f"layer {layer}: decompressed to {len(raw)} bytes")
    elif sec.codec == CODEC_RAW:
        raw = view
    else:
        raise ChecksumMismatch(f"layer {layer}: unknown codec {sec.codec}")
    if out is None:
        return raw
    dst = memoryview(out).cast("B")  # type: ignore[arg-type]
    dst[: sec.raw_len] = raw
    return dst[: sec.raw_len]


def decode_chunk(
    buf: object, namespace: Namespace | None = None, layout: KVLayout | None = None
) -> tuple[ChunkHeader, list[memoryview]]:
    """Verify a whole object; returns its header and every layer's raw bytes."""
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    header = parse_header(view, namespace, layout)
    if len(view) < header.total_len:
        raise Truncated(f"object is {len(view)} bytes, header says {header.total_len}")
    sections = []
    for layer in range(len(header.sections)):
        off, length = header.section_range(layer)
        sections.append(decode_section(header, layer, view[off : off + length]))
    return header, sections
