"""Chunk objects: round trips, ranged decode, each kind of damage, adaptive lz4."""

from __future__ import annotations

import os

import numpy as np
import pytest

from streamkv.format import (
    CODEC_LZ4, CODEC_RAW, BadMagic, ChecksumMismatch, LayoutMismatch, NamespaceMismatch, Truncated,
    UnsupportedVersion, decode_chunk, decode_section, encode_chunk, header_size, parse_header, seal_raw_chunk,
)
from streamkv.keys import Namespace
from streamkv.layout import KVLayout

LAYOUT = KVLayout(6, 2, 16, "float16", 32)
NS = Namespace("model-a", LAYOUT)


def random_sections(layout: KVLayout = LAYOUT) -> list[bytes]:
    return [os.urandom(layout.section_bytes) for _ in range(layout.num_layers)]


def test_round_trip_every_section() -> None:
    sections = random_sections()
    obj = encode_chunk(NS, LAYOUT, sections)
    header, decoded = decode_chunk(obj, NS, LAYOUT)
    assert [bytes(d) for d in decoded] == sections
    assert header.num_tokens == LAYOUT.chunk_size and header.layout == LAYOUT


def test_single_section_by_byte_range() -> None:
    sections = random_sections()
    obj = bytes(encode_chunk(NS, LAYOUT, sections))
    header = parse_header(obj[: header_size(LAYOUT.num_layers)], NS, LAYOUT)
    for layer in range(LAYOUT.num_layers):
        off, n = header.section_range(layer)
        assert bytes(decode_section(header, layer, obj[off : off + n])) == sections[layer]


def test_bit_flip_in_a_section_is_a_checksum_mismatch() -> None:
    obj = encode_chunk(NS, LAYOUT, random_sections())
    header = parse_header(obj)
    off, n = header.section_range(3)
    obj[off + n // 2] ^= 0x10
    with pytest.raises(ChecksumMismatch):
        decode_chunk(obj, NS, LAYOUT)
    # the other sections still decode on their own
    off0, n0 = header.section_range(0)
    decode_section(header, 0, obj[off0 : off0 + n0])


def test_bit_flip_in_the_header() -> None:
    obj = encode_chunk(NS, LAYOUT, random_sections())
    obj[60] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        parse_header(obj)


def test_truncated_object() -> None:
    obj = encode_chunk(NS, LAYOUT, random_sections())
    with pytest.raises(Truncated):
        decode_chunk(obj[:-100], NS, LAYOUT)
    with pytest.raises(Truncated):
        parse_header(obj[:20])
    with pytest.raises(Truncated):
        parse_header(obj[: header_size(LAYOUT.num_layers) - 1])


def test_bad_magic_and_version() -> None:
    obj = encode_chunk(NS, LAYOUT, random_sections())
    bad = bytearray(obj)
    bad[:4] = b"NOPE"
    with pytest.raises(BadMagic):
        parse_header(bad)
    newer = bytearray(obj)
    newer[4] = 99
    with pytest.raises(UnsupportedVersion):
        parse_header(newer)


def test_other_namespace_and_layout() -> None:
    obj = encode_chunk(NS, LAYOUT, random_sections())
    with pytest.raises(NamespaceMismatch):
        parse_header(obj, Namespace("model-b", LAYOUT))
    with pytest.raises(LayoutMismatch):
        parse_header(obj, NS, LAYOUT.with_chunk_size(64))


def test_lz4_only_where_it_pays() -> None:
    zeros = [bytes(LAYOUT.section_bytes)] * LAYOUT.num_layers
    noise = random_sections()
    mixed = [zeros[0], noise[1]] * (LAYOUT.num_layers // 2)
    for compression in ("auto", "lz4"):
        h_zero = parse_header(encode_chunk(NS, LAYOUT, zeros, compression=compression))
        assert all(s.codec == CODEC_LZ4 for s in h_zero.sections)
        assert all(s.stored_len < 0.9 * s.raw_len for s in h_zero.sections)
        h_noise = parse_header(encode_chunk(NS, LAYOUT, noise, compression=compression))
        assert all(s.codec == CODEC_RAW for s in h_noise.sections)
        h_mixed = parse_header(encode_chunk(NS, LAYOUT, mixed, compression=compression))
        assert [s.codec for s in h_mixed.sections] == [CODEC_LZ4, CODEC_RAW] * (LAYOUT.num_layers // 2)
    h_off = parse_header(encode_chunk(NS, LAYOUT, zeros, compression="off"))
    assert all(s.codec == CODEC_RAW for s in h_off.sections)
    _, decoded = decode_chunk(encode_chunk(NS, LAYOUT, mixed), NS, LAYOUT)
    assert [bytes(d) for d in decoded] == mixed


def test_wrong_section_size_rejected() -> None:
    sections = random_sections()
    sections[2] = sections[2][:-2]
    with pytest.raises(ValueError, match="section 2"):
        encode_chunk(NS, LAYOUT, sections)


def test_mla_layout_round_trip() -> None:
    mla = KVLayout(3, 1, 576, "bfloat16", 16, mla=True)
    ns = Namespace("deepseek-like", mla)
    sections = [np.random.default_rng(i).integers(0, 2**16, mla.section_bytes // 2, dtype=np.uint16).tobytes()
                for i in range(3)]
    _, decoded = decode_chunk(encode_chunk(ns, mla, sections), ns, mla)
    assert [bytes(d) for d in decoded] == sections


def test_sealing_a_chunk_built_in_place_is_encode_chunk_byte_for_byte() -> None:
    sections = random_sections()
    buf = bytearray(header_size(LAYOUT.num_layers)) + b"".join(sections)
    seal_raw_chunk(buf, NS, LAYOUT)
    assert bytes(buf) == bytes(encode_chunk(NS, LAYOUT, sections, compression="off"))
    _, decoded = decode_chunk(buf, NS, LAYOUT)
    assert [bytes(d) for d in decoded] == sections
    with pytest.raises(ValueError, match="raw chunk needs"):
        seal_raw_chunk(bytearray(len(buf) - 1), NS, LAYOUT)
