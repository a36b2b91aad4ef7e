"""Every bad input is one ``tpfed: error:`` line and exit status 2, never a traceback (issue 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ["run", "--peers", "local:1", "--deadline", "nan", "x"],
    ["run", "--peers", "local:1", "--deadline", "0", "x"],
    ["run", "--peers", "local:1", "--deadline", "-1", "x"],
    ["run", "--peers", "local:1", "--deadline", "inf", "x"],
    ["run", "--peers", "local:1", "--temperature", "1", "--seed", "-5", "x"],
    ["run", "--peers", "local:1", "--replicas", "0", "x"],
    ["peer", "--mtu", "10"],
    ["peer", "--memory-mb", "-1"],
]


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c[:1] + c[-3:-1]) for c in CASES])
def test_bad_input_is_one_error_line(argv):
    p = subprocess.run([sys.executable, "-m", "tpfed", *argv], capture_output=True, text=True,
                       timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("tpfed: error: "), p.stderr
    assert "Traceback" not in p.stderr


def _one_error_line(argv: list, stdin: bytes | None = None) -> str:
    p = subprocess.run([sys.executable, "-m", "tpfed", *argv], capture_output=True, input=stdin,
                       timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert p.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("tpfed: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_binary_fleet_file_is_one_error_line(command, tmp_path):
    fleet = tmp_path / "fleet.bin"
    fleet.write_bytes(bytes(range(256)) * 4)  # not UTF-8 (as /bin/ls is not)
    line = _one_error_line([command, "--fleet", str(fleet)])
    assert "not UTF-8" in line and str(fleet) in line, line


def test_prompt_not_utf8_on_argv_is_one_error_line():
    # bytes on the command line that are not UTF-8 (Python keeps them as surrogates)
    line = _one_error_line([b"run", b"--peers", b"local:1", b"\xff\xfe"])
    assert "not valid UTF-8" in line and "0xff" in line, line


def test_prompt_not_utf8_on_stdin_is_one_error_line():
    line = _one_error_line(["run", "--peers", "local:1", "-"], stdin=b"Once upon\xff a time\n")
    assert "standard input is not valid UTF-8" in line, line
