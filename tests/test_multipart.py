"""ItemOperations multipart bodies: the real capture and malformed variants."""
from __future__ import annotations

import struct

import pytest
from conftest import REAL_SERVER
from hypothesis import given, strategies as st

from seg_fast.eas.multipart import MAX_PARTS, build_multipart, parse_multipart
from seg_fast.eas.wbxml import decode
from seg_fast.errors import MultipartError


def test_real_multipart_capture():
    body = (REAL_SERVER / "mp.bin").read_bytes()
    parts = parse_multipart(body)
    assert len(parts) == 2
    assert bytes(parts[0]) == (REAL_SERVER / "mp.part0.wbxml").read_bytes()
    assert bytes(parts[1]) == (REAL_SERVER / "attachment_getatt.bin").read_bytes()
    assert bytes(parts[1]).startswith(b"%PDF")
    # part 0 names part 1 through ItemOperations:Part
    tree = decode(parts[0])
    assert next(tree.iter("ItemOperations:Part")).text == "1"
    assert build_multipart(parts) == body


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_build_parse_roundtrip(parts):
    body = build_multipart(parts)
    assert [bytes(p) for p in parse_multipart(body)] == parts
    assert struct.unpack_from("<i", body)[0] == len(parts)


def _hdr(count, pairs):
    return struct.pack("<i", count) + b"".join(struct.pack("<ii", o, n) for o, n in pairs)


@pytest.mark.parametrize("body, words", [
    (b"", "no part count"),
    (b"\x01\x00", "no part count"),
    (_hdr(0, []), "out of range"),
    (_hdr(-1, []), "out of range"),
    (_hdr(MAX_PARTS + 1, []), "out of range"),
    (_hdr(2, [(20, 0)]), "header"),
    (_hdr(1, [(12, 5)]) + b"abc", "runs past"),
    (_hdr(1, [(-1, 0)]), "negative"),
    (_hdr(1, [(12, -3)]) + b"abc", "negative"),
    (_hdr(1, [(4, 4)]) + b"abcd", "inside the"),
    (_hdr(1, [(0x7FFFFFFF, 0x7FFFFFFF)]), "runs past"),
])
def test_malformed_multipart(body, words):
    with pytest.raises(MultipartError, match=words):
        parse_multipart(body)


@given(st.binary(max_size=64))
def test_random_bytes_only_raise_multiparterror(body):
    try:
        parts = parse_multipart(body)
    except MultipartError:
        return
    for p in parts:
        assert len(p) <= len(body)


def test_build_needs_a_part():
    with pytest.raises(MultipartError):
        build_multipart([])
