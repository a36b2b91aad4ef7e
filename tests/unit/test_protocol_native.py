"""The generated C codec and the C COBS, through tpfed.compute._native (CFFI) and under ASan/UBSan:
golden frames round-trip byte-exactly, bad input gives the same verdict as Python, never a
crash, never an access outside the buffers."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol import MsgType, ProtocolError, StreamFramer, decode_frame
from tpfed.protocol.golden_data import GOLDEN_DIR, entries, from_json, read
from tpfed.protocol.schema import Status

try:
    from tpfed.compute._native import ffi, lib
except ImportError as e:  # pragma: no cover - the build is part of the install
    pytest.fail(f"tpfed.compute._native is not built ({e}); run: python setup.py build_ext --inplace",
                pytrace=False)
if not hasattr(lib, "tpfed_frame_decode") or not hasattr(lib, "tpfed_cobs_encode"):
    pytest.fail("tpfed.compute._native predates the protocol codec; run: python setup.py build_ext --inplace",
                pytrace=False)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_protocol_c  # noqa: E402

MODEL, C_NAME = gen_protocol_c.build_model()


def c_status(data: bytes, max_payload: int = 0xFFFF) -> Status:
    return Status(lib.tpfed_frame_validate(ffi.from_buffer(data), len(data), max_payload))


def py_status(data: bytes, max_payload: int = 0xFFFF) -> Status:
    try:
        decode_frame(data, max_payload)
    except ProtocolError as e:
        return e.status
    return Status.OK


def decode_c(data: bytes):
    """Frame -> (header, payload struct) through the C decoders."""
    h = ffi.new("tpfed_header_t *")
    pl = ffi.new("const uint8_t **")
    buf = ffi.from_buffer(data)
    assert lib.tpfed_frame_decode(buf, len(data), 0xFFFF, h, pl) == Status.OK
    name = C_NAME[h.type]
    m = ffi.new(f"tpfed_{name}_t *")
    assert getattr(lib, f"tpfed_{name}_decode")(pl[0], h.length, m) == Status.OK
    return h, name, m, buf


def u16s(ptr, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}H", ffi.buffer(ptr, 2 * n)))


@pytest.mark.parametrize("entry", entries("frame"), ids=lambda e: e["file"])
def test_golden_frames_roundtrip_through_c(entry: dict) -> None:
    data = read(entry["file"])
    h, name, m, _keep = decode_c(data)
    payload = from_json(entry["payload"])
    for key, want in payload.items():
        if isinstance(want, int | float) and not isinstance(want, bool):
            assert getattr(m, key) == want, key
        elif isinstance(want, str):
            assert ffi.buffer(getattr(m, key), getattr(m, key + "_len"))[:].decode() == want
        elif isinstance(want, bytes) and hasattr(m, key + "_len"):
            assert ffi.buffer(getattr(m, key), getattr(m, key + "_len"))[:] == want
        elif isinstance(want, bytes):
            assert ffi.buffer(getattr(m, key), len(want))[:] == want
    if name == "activation":
        assert u16s(m.scales, len(payload["scales"])) == payload["scales"]
        assert list(ffi.unpack(m.qs, m.n)) == payload["qs"]
    if name == "assign":
        check_assign_entries(m, payload["entries"])
    if not entry["reencode"]:
        return
    out = ffi.new("uint8_t[]", len(data) + 8)
    n = ffi.new("size_t *")
    rc = getattr(lib, f"tpfed_{name}_encode")(out + 12, len(data) - 16, m, n)
    assert rc == Status.OK and n[0] == h.length
    flen = ffi.new("size_t *")
    a = entry.get("auth")
    if a is None:
        assert lib.tpfed_frame_finish(out, len(data), h, n[0], flen) == Status.OK
        assert ffi.buffer(out, flen[0])[:] == data
    else:  # sealed: re-sealed with the manifest's session key and counter
        ks = ffi.new("tpfed_hmac_key *")
        key = bytes.fromhex(a["key"])
        lib.tpfed_hmac_key_init(ks, key, len(key))
        h.flags &= ~lib.TPFED_FLAG_AUTH  # tpfed_auth_finish sets it
        assert lib.tpfed_auth_finish(out, len(data), h, n[0], ks, a["counter"], flen) == Status.OK
        got = ffi.buffer(out, flen[0])[:]
        if a["valid"]:
            assert got == data
        else:  # the golden frame's tag was tampered with: only the tag (and CRC) differ
            assert got[:-20] == data[:-20] and got[-20:-4] != data[-20:-4]
    # Every smaller output buffer: TPFED_E_NO_SPACE, and nothing written past the capacity.
    step = max(1, h.length // 64)
    for cap in range(0, h.length, step):
        guard = ffi.new("uint8_t[]", [0xEE] * (cap + 16))
        rc = getattr(lib, f"tpfed_{name}_encode")(guard, cap, m, n)
        assert rc == Status.NO_SPACE
        assert bytes(ffi.buffer(guard + cap, 16)) == b"\xee" * 16


def check_assign_entries(m, want: list[dict]) -> None:
    e = ffi.new("tpfed_layer_entry_t *")
    r = ffi.new("tpfed_mlp_range_t *")
    used = ffi.new("size_t *")
    off = 0
    for w in want:
        assert lib.tpfed_layer_entry_decode(m.entries + off, m.entries_len - off, e, used) == 0
        off += used[0]
        assert e.layer == w["layer"] and u16s(e.kv_groups, e.n_kv_groups) == w["kv_groups"]
        ranges = []
        for i in range(e.n_mlp_ranges):
            assert lib.tpfed_mlp_range_decode(e.mlp_ranges + 8 * i, 8, r, used) == 0
            ranges.append({"start": r.start, "end": r.end})
        assert ranges == w["mlp_ranges"]
    assert off == m.entries_len and m.n_entries == len(want)


@pytest.mark.parametrize("entry", entries("invalid"), ids=lambda e: e["file"])
def test_golden_invalid_frames_get_the_same_status_in_c(entry: dict) -> None:
    data = read(entry["file"])
    mp = entry.get("max_payload", 0xFFFF)
    assert c_status(data, mp).name == entry["status"] == py_status(data, mp).name


def test_c_and_python_agree_on_every_truncation() -> None:
    for entry in entries("frame"):
        data = read(entry["file"])
        step = max(1, len(data) // 200)
        for cut in range(0, len(data), step):
            assert c_status(data[:cut]) == py_status(data[:cut]) == Status.TRUNCATED


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_raw_bytes(data: bytes) -> None:
    assert c_status(data) == py_status(data)


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(sorted(MsgType) + [0, 0x7F]), st.binary(max_size=120),
       st.sampled_from([0x10, 0x1A, 0x20]), st.sampled_from([0, 1, 2]))
def test_fuzz_payloads_with_valid_crc(t: int, payload: bytes, version: int, mangle: int) -> None:
    body = bytes([0xA7, version, t, 0, 1, 2, 3, 0, 4, 0]) + len(payload).to_bytes(2, "little") + payload
    data = _with_crc(body)
    if mangle == 1:
        data = data[:-1]
    elif mangle == 2:
        data = data + b"\x00"
    assert c_status(data) == py_status(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([e["file"] for e in entries("frame") if e["file"] != "weights_max_payload.bin"
                        and e["file"] != "activation_max.bin"]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_golden_payloads(name: str, edits: list) -> None:
    data = bytearray(read(name))
    for pos, val in edits:
        data[12 + pos % max(1, len(data) - 16)] = val
    fixed = _with_crc(bytes(data[:-4]))
    assert c_status(fixed) == py_status(fixed)


def test_crc_matches_zlib() -> None:
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert lib.tpfed_crc32(0, data, len(data)) == zlib.crc32(data)
    half = lib.tpfed_crc32(0, b"hello ", 6)
    assert lib.tpfed_crc32(half, b"world", 5) == zlib.crc32(b"hello world")


def test_utf8_validator_matches_python() -> None:
    samples = [b"", b"abc", "Küche ✓ 需要 😀".encode(), b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
               b"\xf4\x90\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xc3", b"\xe2\x82", b"\x80", b"\xff",
               b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf"]
    for s in samples:
        try:
            s.decode("utf-8")
            ok = 1
        except UnicodeDecodeError:
            ok = 0
        assert lib.tpfed_utf8_valid(s, len(s)) == ok, s


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12))
def test_utf8_validator_fuzz(s: bytes) -> None:
    try:
        s.decode("utf-8")
        ok = 1
    except UnicodeDecodeError:
        ok = 0
    assert lib.tpfed_utf8_valid(s, len(s)) == ok


# --- COBS --------------------------------------------------------------------------------------


def c_cobs_encode(data: bytes) -> bytes:
    cap = lib.tpfed_cobs_max_encoded(len(data))
    out = ffi.new("uint8_t[]", cap)
    n = lib.tpfed_cobs_encode(out, cap, data, len(data))
    assert n > 0
    return ffi.buffer(out, n)[:]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.builds(lambda n: b"\x01" * n, st.integers(250, 520))))
def test_c_cobs_matches_python(data: bytes) -> None:
    enc = c_cobs_encode(data)
    assert enc == cobs.encode(data)
    out = ffi.new("uint8_t[]", len(enc))
    assert lib.tpfed_cobs_decode(out, len(data) + 1, enc, len(enc)) == len(data)
    assert ffi.buffer(out, len(data))[:] == data
    if data:  # too small an output: refused, not overrun
        assert lib.tpfed_cobs_decode(out, len(data) - 1, enc, len(enc)) == -1
        assert lib.tpfed_cobs_encode(out, len(enc) - 1, data, len(data)) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_c_cobs_decode_agrees_on_garbage(seg: bytes) -> None:
    out = ffi.new("uint8_t[]", 100)
    n = lib.tpfed_cobs_decode(out, 100, seg, len(seg))
    try:
        want = cobs.decode(seg)
    except cobs.DecodeError:
        assert n == -1
        return
    assert n == len(want) and ffi.buffer(out, n)[:] == want


@pytest.mark.parametrize("entry", entries("cobs_stream"), ids=lambda e: e["file"])
def test_c_stream_decoder_on_golden_streams(entry: dict) -> None:
    data = read(entry["file"])
    cap = lib.tpfed_cobs_max_encoded(65551)
    buf = ffi.new("uint8_t[]", cap)
    s = ffi.new("tpfed_cobs_stream_t *")
    lib.tpfed_cobs_stream_init(s, buf, cap)
    got = []
    for b in data:
        n = lib.tpfed_cobs_stream_feed(s, b)
        if n > 0:
            got.append(ffi.buffer(buf, n)[:])
    want = StreamFramer(check=False).feed(data)  # COBS layer only, CRC not checked
    assert got == want
    valid = [g for g in got if lib.tpfed_frame_validate(g, len(g), 0xFFFF) == 0]
    assert valid == [read(f) for f in entry["frames"]]


# --- sanitizers -------------------------------------------------------------------------------

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tpfed_proto.h"
#include "tpfed_cobs.h"
// Every golden file given on the command line: validate it cut at every length and with
// every byte flipped (CRC repaired), each time from an exactly-sized heap copy so that ASan
// catches any read past the end; COBS-decode it too.
static void check(const uint8_t *src, size_t n) {
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, src, n);
    (void)tpfed_frame_validate(copy, n, 0xFFFF);
    uint8_t *out = malloc(n ? n : 1);
    (void)tpfed_cobs_decode(out, n, copy, n);
    free(out);
    free(copy);
}
int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        if (!f) return 2;
        static uint8_t data[70000];
        size_t n = fread(data, 1, sizeof data, f);
        fclose(f);
        size_t step = n > 4000 ? n / 500 : 1;
        for (size_t cut = 0; cut <= n; cut += step) check(data, cut);
        for (size_t i = 12; i + 4 < n && i < 200; i++) {
            uint8_t keep = data[i];
            for (int v = 0; v < 256; v += 85) {
                data[i] = (uint8_t)v;
                uint32_t c = tpfed_crc32(0, data, n - 4);
                uint8_t crc[4] = {(uint8_t)c, (uint8_t)(c >> 8), (uint8_t)(c >> 16), (uint8_t)(c >> 24)};
                uint8_t old[4];
                memcpy(old, data + n - 4, 4);
                memcpy(data + n - 4, crc, 4);
                check(data, n);
                memcpy(data + n - 4, old, 4);
            }
            data[i] = keep;
        }
    }
    puts("ok");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_codec_under_address_sanitizer(tmp_path: Path) -> None:
    lib_dir = ROOT / "firmware" / "lib" / "tpfed"
    (tmp_path / "driver.c").write_text(DRIVER)
    exe = tmp_path / "fuzz"
    subprocess.run(
        ["gcc", "-std=c99", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-I", str(lib_dir / "include"), str(tmp_path / "driver.c"),
         str(lib_dir / "src" / "tpfed_proto.c"), str(lib_dir / "src" / "cobs.c"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    files = [str(GOLDEN_DIR / e["file"]) for e in entries() if e["kind"] in ("frame", "invalid")]
    r = subprocess.run([str(exe), *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc")
def test_c_compiles_clean_for_cortex_m3(tmp_path: Path) -> None:
    lib_dir = ROOT / "firmware" / "lib" / "tpfed"
    for src in ("tpfed_proto.c", "cobs.c"):
        r = subprocess.run(
            ["arm-none-eabi-gcc", "-mcpu=cortex-m3", "-mthumb", "-std=c99", "-Wall", "-Wextra",
             "-Werror", "-Os", "-I", str(lib_dir / "include"), "-c", str(lib_dir / "src" / src),
             "-o", str(tmp_path / (src + ".o"))],
            capture_output=True, text=True,
        )
        assert r.returncode == 0, r.stderr
