"""The generated C codec and the golden frames are up to date with the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
