"""The C SHA-256 (firmware/lib/tpfed/src/sha256.c) against hashlib, through the CFFI build."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.compute._native import ffi, lib


def c_sha256(data: bytes) -> bytes:
    out = ffi.new("uint8_t[32]")
    lib.tpfed_sha256(out, data, len(data))
    return bytes(out)


def c_sha256_chunked(data: bytes, cuts: list[int]) -> bytes:
    ctx = ffi.new("tpfed_sha256_ctx *")
    lib.tpfed_sha256_init(ctx)
    prev = 0
    for cut in sorted(cuts) + [len(data)]:
        lib.tpfed_sha256_update(ctx, data[prev:cut], cut - prev)
        prev = cut
    out = ffi.new("uint8_t[32]")
    lib.tpfed_sha256_final(ctx, out)
    return bytes(out)


def test_fips_180_4_vectors():
    assert c_sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert c_sha256(b"").hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    two_block = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
    assert c_sha256(two_block).hex() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"


def test_padding_boundaries():
    for n in (55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000):
        data = bytes((i * 7 + 3) & 0xFF for i in range(n))
        assert c_sha256(data) == hashlib.sha256(data).digest(), n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700), st.lists(st.integers(0, 700), max_size=6))
def test_matches_hashlib_in_any_chunking(data, cuts):
    cuts = [min(c, len(data)) for c in cuts]
    want = hashlib.sha256(data).digest()
    assert c_sha256(data) == want
    assert c_sha256_chunked(data, cuts) == want
