"""The generated C codec and the golden frames are up to date with the schema."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_golden  # noqa: E402
import gen_protocol_c  # noqa: E402


@pytest.mark.parametrize("tool", ["gen_protocol_c.py", "gen_golden.py"])
def test_committed_files_are_fresh(tool: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_c_check_names_the_stale_file(tmp_path: Path, monkeypatch, capsys) -> None:
    stale = tmp_path / "tpfed_proto.h"
    stale.write_text("// edited by hand\n")
    fresh = tmp_path / "tpfed_proto.c"
    monkeypatch.setattr(gen_protocol_c, "HEADER_OUT", stale)
    monkeypatch.setattr(gen_protocol_c, "SOURCE_OUT", fresh)
    monkeypatch.setattr(gen_protocol_c, "ROOT", tmp_path)
    fresh.write_text(gen_protocol_c.generate()[fresh])
    assert gen_protocol_c.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "tpfed_proto.h" in err and "tpfed_proto.c" not in err


def test_golden_check_names_stale_and_stray_files(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gen_golden, "GOLDEN", tmp_path)
    monkeypatch.setattr(gen_golden, "ROOT", tmp_path)
    assert gen_golden.main([]) == 0
    assert gen_golden.main(["--check"]) == 0
    (tmp_path / "ack.bin").write_bytes(b"\xa7")
    (tmp_path / "old.bin").write_bytes(b"")
    capsys.readouterr()
    assert gen_golden.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "ack.bin" in err and "old.bin" in err


def test_generated_header_mirrors_the_schema() -> None:
    from tpfed.protocol import schema

    header = gen_protocol_c.HEADER_OUT.read_text()
    for t in schema.MsgType:
        assert f"TPFED_MSG_{t.name} = {int(t)}," in header
    for code in schema.ErrorCode:
        assert f"TPFED_ERR_{code.name} = {int(code)}," in header
    assert f"#define TPFED_VERSION {schema.PROTOCOL_VERSION}" in header
    assert "// cffi:begin" in header and "// cffi:end" in header


def test_generated_header_has_the_layer_share_header() -> None:
    from tpfed.protocol import schema

    header = gen_protocol_c.HEADER_OUT.read_text()
    assert f"#define TPFED_SHARE_VERSION {schema.SHARE_VERSION}" in header
    assert f"#define TPFED_SHARE_HEADER_SIZE {schema.SHARE_HEADER_SIZE}" in header
    assert "} tpfed_share_header_t;" in header
    assert '4 bytes "TPLS" (checked, no member)' in header


def test_c_string_literal_is_exact() -> None:
    assert gen_protocol_c.c_string(b"TPLS") == '"TPLS"'
    # octal escapes are exactly three digits, so a following digit is not swallowed
    assert gen_protocol_c.c_string(b'\x00"1\\?\xff') == '"\\000\\0421\\134\\077\\377"'


SHARE_FIELDS = ("version", "header_size", "layer", "dim", "hidden_dim", "head_size", "group_size",
                "n_groups", "n_ranges", "n_kv_heads", "flags", "total")


def _share_header_values(draw_int) -> dict:
    from tpfed.protocol import schema
    from tpfed.protocol.layout import field

    return {name: draw_int(0, (1 << (8 * struct.calcsize(field(schema.LayerShareHeader, name).fmtstr))) - 1)
            for name in SHARE_FIELDS}


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_c_share_header_codec_matches_construct(data) -> None:
    from tpfed.compute._native import ffi, lib
    from tpfed.protocol import schema

    values = _share_header_values(lambda lo, hi: data.draw(st.integers(lo, hi)))
    blob = schema.LayerShareHeader.build(values)
    assert len(blob) == lib.TPFED_SHARE_HEADER_SIZE == schema.SHARE_HEADER_SIZE
    extra = data.draw(st.binary(max_size=8))  # a share continues after its header
    m = ffi.new("tpfed_share_header_t *")
    used = ffi.new("size_t *")
    assert lib.tpfed_share_header_decode(ffi.from_buffer(blob + extra), len(blob) + len(extra),
                                         m, used) == lib.TPFED_OK
    assert used[0] == len(blob)
    assert {name: getattr(m, name) for name in SHARE_FIELDS} == values
    out = ffi.new("uint8_t[]", len(blob))
    n = ffi.new("size_t *")
    assert lib.tpfed_share_header_encode(out, len(blob), m, n) == lib.TPFED_OK
    assert ffi.buffer(out, n[0])[:] == blob
    assert lib.tpfed_share_header_encode(out, len(blob) - 1, m, n) == lib.TPFED_E_NO_SPACE
    for cut in range(len(blob)):
        assert lib.tpfed_share_header_decode(ffi.from_buffer(blob), cut, m, used) == (
            lib.TPFED_E_BAD_PAYLOAD)
    for i in range(4):
        bad = bytearray(blob)
        bad[i] ^= 0x20
        assert lib.tpfed_share_header_decode(ffi.from_buffer(bad), len(bad), m, used) == (
            lib.TPFED_E_BAD_MAGIC)
