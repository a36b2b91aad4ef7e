"""The generated MicroPython codec (shared_protocol/mp_codec.py): golden frames decode to the
manifest's fields and re-encode byte-exactly, bad input raises the same error class as the host
codec, under CPython and inside real MicroPython (the WebAssembly build, run by node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol import MsgType, StreamFramer, decode_frame, mp_codec
from tpfed.protocol.golden_data import GOLDEN_DIR, entries, from_json, read

ROOT = Path(__file__).resolve().parents[2]
MP_DIR = ROOT / "tests" / "mp"
CODEC = ROOT / "shared_protocol" / "mp_codec.py"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(MP_DIR))
sys.modules.setdefault("mp_codec", mp_codec)  # the name the board-side script imports
import gen_mp_codec  # noqa: E402
import golden_roundtrip  # noqa: E402

MP_PACKAGE = "@micropython/micropython-webassembly-pyscript"
MP_VERSION = "1.27.0"  # keep in step with tools/test.sh


def mp_package_dir() -> Path:
    """Where tools/test.sh installs the MicroPython WebAssembly package (or $TPFED_MP_WASM_DIR)."""
    if os.environ.get("TPFED_MP_WASM_DIR"):
        return Path(os.environ["TPFED_MP_WASM_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tpfed" / "npm" / "node_modules" / MP_PACKAGE


def header_kwargs(h: dict) -> dict:
    """encode_frame's keyword arguments from a decoded header (the AUTH trailer included)."""
    return {k: h[k] for k in ("src", "dst", "seq", "session", "flags", "counter", "tag") if k in h}


def with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


def error_name(data: bytes, decode, max_payload: int = 0xFFFF) -> str:
    try:
        decode(data, max_payload)
    except ValueError as e:
        return type(e).__name__
    return "OK"


# --- generator -----------------------------------------------------------------------------


def test_generated_codec_is_current() -> None:
    assert CODEC.read_text() == gen_mp_codec.generate(), "run: python tools/gen_mp_codec.py"


def test_codec_imports_nothing_but_struct_binascii_and_hashlib() -> None:
    lines = [ln.strip() for ln in CODEC.read_text().splitlines()]
    imports = sorted({ln for ln in lines if ln.startswith(("import ", "from "))})
    assert imports == ["from binascii import crc32 as _hw_crc32", "from hashlib import sha256 as _sha256",
                       "import struct"]


# --- CPython: golden frames ----------------------------------------------------------------


@pytest.mark.parametrize("entry", entries("frame"), ids=lambda e: e["file"])
def test_golden_frame_decodes_and_reencodes(entry: dict) -> None:
    data = read(entry["file"])
    h, payload = mp_codec.decode_frame(data)
    assert {k: h[k] for k in entry["header"]} == entry["header"]
    assert mp_codec.TYPE_NAMES[h["type"]] == entry["type"]
    want = from_json(entry["payload"])
    assert payload == want
    assert json.dumps(payload, default=bytes.hex) == json.dumps(want, default=bytes.hex)  # types
    assert payload == decode_frame(data).payload  # the construct codec agrees
    if entry["reencode"]:
        assert mp_codec.encode_frame(h["type"], payload, **header_kwargs(h)) == data
        # count fields are recomputed when left out
        assert mp_codec.encode_frame(h["type"], without_counts(payload), **header_kwargs(h)) == data


COUNT_FIELDS = {"n", "n_entries", "n_kv_groups", "n_mlp_ranges"}  # the schema's Rebuild fields


def without_counts(v):
    if isinstance(v, dict):
        return {k: without_counts(x) for k, x in v.items() if k not in COUNT_FIELDS}
    if isinstance(v, list):
        return [without_counts(x) for x in v]
    return v


@pytest.mark.parametrize("entry", entries("invalid"), ids=lambda e: e["file"])
def test_golden_invalid_frame_raises_the_host_error(entry: dict) -> None:
    data = read(entry["file"])
    mp = entry.get("max_payload", 0xFFFF)
    with pytest.raises(mp_codec.ProtocolError) as ei:
        mp_codec.decode_frame(data, mp)
    assert type(ei.value).__name__ == entry["error"]
    assert ei.value.status == getattr(mp_codec, "STATUS_" + entry["status"])
    assert isinstance(ei.value, ValueError) and str(ei.value)


@pytest.mark.parametrize("entry", entries("frame"), ids=lambda e: e["file"])
def test_malformed_variants_of_golden_frames(entry: dict) -> None:
    data = read(entry["file"])
    for cut in range(len(data)):
        with pytest.raises(mp_codec.TruncatedFrame):
            mp_codec.decode_frame(data[:cut])
    with pytest.raises(mp_codec.BadLength):
        mp_codec.decode_frame(data + b"\x00")
    for bit in range(32):
        bad = bytearray(data)
        bad[len(data) - 4 + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(mp_codec.BadCrc):
            mp_codec.decode_frame(bytes(bad))
    with pytest.raises(mp_codec.BadMagic):
        mp_codec.decode_frame(with_crc(b"\xa6" + data[1:-4]))
    for major in (0, 2, 15):
        other = with_crc(data[:1] + bytes([major << 4 | (data[1] & 15)]) + data[2:-4])
        with pytest.raises(mp_codec.VersionMismatch, match="major versions must match"):
            mp_codec.decode_frame(other)


def test_every_golden_entry_passes_the_micropython_script_under_cpython(capsys) -> None:
    """Control run of the very script MicroPython runs: a failure inside MicroPython then
    points at MicroPython, not at the script."""
    golden_roundtrip.main(str(GOLDEN_DIR))
    check_report(capsys.readouterr().out)


# --- CPython: the host codec agrees on arbitrary input --------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_raw_bytes_same_error_as_host(data: bytes) -> None:
    assert error_name(data, mp_codec.decode_frame) == error_name(data, decode_frame)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(MsgType) + [0, 0x7F]), st.binary(max_size=120),
       st.sampled_from([0x10, 0x1A, 0x20]))
def test_fuzz_payloads_same_verdict_as_host(t: int, payload: bytes, version: int) -> None:
    data = with_crc(bytes([0xA7, version, t, 0, 1, 2, 3, 0, 4, 0])
                    + len(payload).to_bytes(2, "little") + payload)
    assert error_name(data, mp_codec.decode_frame) == error_name(data, decode_frame)
    if error_name(data, decode_frame) == "OK":
        assert mp_codec.decode_frame(data)[1] == decode_frame(data).payload


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([e["file"] for e in entries("frame") if len(read(e["file"])) < 4096]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_golden_payloads_same_verdict(name: str, edits: list) -> None:
    data = bytearray(read(name))
    for pos, val in edits:
        data[12 + pos % max(1, len(data) - 16)] = val
    fixed = with_crc(bytes(data[:-4]))
    assert error_name(fixed, mp_codec.decode_frame) == error_name(fixed, decode_frame)


# --- CPython: encoding refuses bad values ---------------------------------------------------


def golden_payload(name: str) -> tuple[int, dict]:
    e = next(e for e in entries("frame") if e["file"] == name)
    return int(MsgType[e["type"]]), from_json(e["payload"])


@pytest.mark.parametrize(("name", "change", "match"), [
    ("hello_esp32s3.bin", {"ram_kb": -1}, r"HELLO\.ram_kb: -1 is not an integer"),
    ("hello_esp32s3.bin", {"cores": 256}, r"HELLO\.cores: 256"),
    ("hello_esp32s3.bin", {"int8_macs": 1 << 64}, r"int8_macs"),
    ("hello_esp32s3.bin", {"name": "x" * 256}, r"HELLO\.name: 256 UTF-8 bytes"),
    ("hello_esp32s3.bin", {"name": b"bytes"}, r"expected str"),
    ("hello_esp32s3.bin", {"features": 1.5}, r"features"),
    ("assign_no_entries.bin", {"norm_eps": 1e39}, r"norm_eps: .* does not fit a float32"),
    ("assign_no_entries.bin", {"n_entries": 3}, r"ASSIGN\.n_entries is 3 but the data holds 0"),
    ("weights_chunk.bin", {"sha256": b"\x00" * 31}, r"sha256: needs exactly 32 bytes, got 31"),
    ("weights_chunk.bin", {"data": [1, 2]}, r"WEIGHTS\.data: expected bytes"),
    ("activation_n33.bin", {"scales": [1]}, r"scales: expected a list of 2 items"),
    ("activation_n33.bin", {"qs": [128] * 33}, r"qs: 128 is not an integer in -128\.\.127"),
    ("partial_f32_dim64.bin", {"encoding": 9}, r"no layout for encoding=9"),
    ("ready.bin", {"arena_free": None}, r"arena_free"),
])
def test_encode_refuses_bad_values(name: str, change: dict, match: str) -> None:
    t, payload = golden_payload(name)
    with pytest.raises(mp_codec.BadPayload, match=match):
        mp_codec.encode_frame(t, {**payload, **change})


def test_encode_refuses_bad_frames() -> None:
    t, payload = golden_payload("ready.bin")
    del payload["arena_used"]
    with pytest.raises(mp_codec.BadPayload, match="missing field 'arena_used'"):
        mp_codec.encode_frame(t, payload)
    with pytest.raises(mp_codec.UnknownType):
        mp_codec.encode_frame(0x7F, {})
    _, bye = golden_payload("bye.bin")
    for kw in ({"src": 256}, {"dst": -1}, {"seq": 1 << 16}, {"session": "1"}):
        with pytest.raises(mp_codec.ProtocolError, match="header"):
            mp_codec.encode_frame(MsgType.BYE, bye, **kw)
    with pytest.raises(mp_codec.ProtocolError, match="reserved bits"):
        mp_codec.encode_frame(MsgType.BYE, bye, flags=0x80)
    _, w = golden_payload("weights_chunk.bin")
    with pytest.raises(mp_codec.OversizeFrame):
        mp_codec.encode_frame(MsgType.WEIGHTS, {**w, "data": b"\x01" * 0xFFFF})


def test_partial_count_is_rebuilt_for_every_encoding() -> None:
    for name in ("partial_f32_dim64.bin", "partial_f16_n33.bin", "partial_q8_n33.bin"):
        t, payload = golden_payload(name)
        del payload["n"]
        assert mp_codec.encode_frame(t, payload, src=0) == mp_codec.encode_frame(
            t, golden_payload(name)[1], src=0)


# --- CPython: CRC and COBS ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700), st.integers(0, 0xFFFFFFFF))
def test_crc32_soft_matches_zlib(data: bytes, start: int) -> None:
    assert mp_codec.crc32_soft(data) == zlib.crc32(data)
    assert mp_codec.crc32_soft(data, start) == zlib.crc32(data, start)


def test_codec_falls_back_to_its_own_crc_without_binascii(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "binascii", types.ModuleType("binascii"))  # no crc32
    ns: dict = {"__name__": "mp_codec_nocrc"}
    exec(compile(CODEC.read_text(), str(CODEC), "exec"), ns)
    assert ns["crc32"] is ns["crc32_soft"]
    for name in ("hello_esp32s3.bin", "assign_extremes.bin", "probe_reply_pad.bin"):
        data = read(name)
        h, payload = ns["decode_frame"](data)
        assert ns["encode_frame"](h["type"], payload, **header_kwargs(h)) == data
    with pytest.raises(ns["BadCrc"]):
        ns["decode_frame"](read("bad_crc.bin"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.builds(lambda n, z: b"\x01" * n + b"\x00" * z, st.integers(250, 520),
                           st.integers(0, 2))))
def test_cobs_matches_the_cobs_package(data: bytes) -> None:
    enc = mp_codec.cobs_encode(data)
    assert enc == cobs.encode(data)
    assert mp_codec.cobs_decode(enc) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_cobs_decode_agrees_on_garbage(seg: bytes) -> None:
    try:
        want = cobs.decode(seg)
    except cobs.DecodeError:
        with pytest.raises(mp_codec.CobsError):
            mp_codec.cobs_decode(seg)
        return
    assert mp_codec.cobs_decode(seg) == want


@pytest.mark.parametrize("entry", entries("cobs_stream"), ids=lambda e: e["file"])
def test_cobs_stream_matches_host_framer(entry: dict) -> None:
    data = read(entry["file"])
    s = mp_codec.CobsStream()
    got = [f for i in range(0, len(data), 61) for f in s.feed(data[i:i + 61])]
    host = StreamFramer()
    assert got == host.feed(data) == [read(f) for f in entry["frames"]]
    assert s.dropped == host.stats.dropped == entry["dropped"]


def test_cobs_stream_bounds_its_buffer() -> None:
    s = mp_codec.CobsStream(max_frame=64)
    frame = read("ack.bin")
    assert s.feed(b"\x01" * 500) == [] and len(s.buf) == 0 and s.dropped == 1
    assert s.feed(b"\x02" * 10 + b"\x00" + mp_codec.cobs_encode(frame) + b"\x00") == [frame]


# --- real MicroPython -----------------------------------------------------------------------


def check_report(out: str) -> None:
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("SUMMARY"), out[-2000:]
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    passed = {ln.split(" ", 1)[1] for ln in lines if ln.startswith("PASS ")}
    want = {e.get("file", e["kind"]) for e in entries()
            if e["kind"] in ("frame", "invalid", "cobs_stream", "auth_vectors")}
    # Sealed frames' tags and the handshake vectors are checked where the port has SHA-256.
    assert "SHA256 hashlib" in lines, "mp_codec found no hashlib.sha256: tags were not checked"
    assert passed == want
    assert lines[-1] == f"SUMMARY pass={len(want)} fail=0"


def test_golden_frames_under_real_micropython() -> None:
    pkg = mp_package_dir()
    node = shutil.which("node")
    if node is None or not (pkg / "micropython.wasm").is_file():
        pytest.fail(f"MicroPython WebAssembly ({MP_PACKAGE}@{MP_VERSION}) or node not found at "
                    f"{pkg}: run tools/test.sh (it installs it), or set TPFED_MP_WASM_DIR",
                    pytrace=False)
    version = json.loads((pkg / "package.json").read_text())["version"]
    assert version == MP_VERSION, f"{pkg} holds {version}; run tools/test.sh to install {MP_VERSION}"
    r = subprocess.run(
        [node, str(MP_DIR / "run_mp.mjs"), str(pkg), str(GOLDEN_DIR), str(CODEC), "--",
         str(MP_DIR / "golden_roundtrip.py"), "main('/golden')"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("IMPL micropython 1.27.0\n"), r.stdout[:500]
    check_report(r.stdout)
