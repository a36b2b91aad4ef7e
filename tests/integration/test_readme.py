"""Every command line of the README runs as written (issue 12: "every README line works").

The README's ``sh`` code blocks are parsed; each line is one test. Lines run through bash from a
scratch folder that sees the checkout's ``tests/`` (the README's relative paths), with
``tpfed`` as this interpreter's ``python -m tpfed``. Only what keeps them bounded is rewritten
(``pip install . &&`` is dropped: the suite runs on the installed package):
``--steps`` and ``--max-tokens`` get small values, and commands that run until stopped (a peer,
a server) are started, checked and stopped. The lines that cannot run here are listed in
:data:`SKIPPED` with the reason; a new README line runs as written unless it is listed there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHARED_MODELS = Path(os.environ.get("TPFED_MODELS", REPO.parent / "shared" / "models"))

SKIPPED = {
    "tools/test.sh": "the whole test suite: this test is part of it",
    "tpfed run --peers 'serial://": "needs a board on /dev/ttyUSB0",
    "tpfed flash ": "needs an ESP32 on /dev/ttyUSB0 and PlatformIO's registry (espressif32)",
}
"""README lines (by prefix) that cannot run here, and why."""

PER_LINE_TIMEOUT = 240  # seconds; emulated boards build their firmware on first use


def readme_lines() -> list[str]:
    """The command lines of the README's sh blocks, comments stripped."""
    lines, inside = [], False
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            inside = raw.strip() in ("```sh", "```bash", "```shell") if not inside else False
            continue
        if inside:
            line = re.sub(r"\s+#\s.*$", "", raw).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def skip_reason(line: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if line.startswith(prefix)), None)


def needs_boards(line: str) -> bool:
    return bool(re.search(r"\bemu:\d", line))


def _params():
    out = []
    for line in readme_lines():
        marks = []
        why = skip_reason(line)
        if why:
            marks.append(pytest.mark.skip(reason=why))
        elif needs_boards(line):
            marks.append(pytest.mark.hil)
        out.append(pytest.param(line, marks=marks, id=line[:70]))
    return out


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch folder that sees the checkout's tests/ (the README's example paths) and holds a
    federation key made as the README says."""
    (tmp_path / "tests").symlink_to(REPO / "tests")
    key = subprocess.run([sys.executable, "-c", "import secrets; print(secrets.token_hex(32))"],
                         capture_output=True, text=True, check=True).stdout
    (tmp_path / "federation.key").write_text(key)
    (tmp_path / "federation.key").chmod(0o600)
    return tmp_path


def environment(workdir: Path) -> dict[str, str]:
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "tpfed"  # `tpfed` as this interpreter's package, whatever is on PATH
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tpfed "$@"\n')
    shim.chmod(0o755)
    home = workdir / "home"  # no default key file or settings from the user running the tests
    home.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
            "TPFED_MODELS": str(SHARED_MODELS), "XDG_CONFIG_HOME": str(home / ".config"),
            "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}


def bounded(line: str) -> str:
    """The line with small --steps / --max-tokens (the rest as written). ``pip install . &&``
    is dropped: the tests run on the installed package (a plain install is rehearsed apart)."""
    line = line.removeprefix("pip install . && ")
    line = re.sub(r"--steps \d+", "--steps 16", line)
    line = re.sub(r"--max-tokens \d+", "--max-tokens 48", line)
    if re.match(r"tpfed (demo|run|chat)\b", line) and "--steps" not in line:
        line = line.replace("tpfed demo", "tpfed demo --steps 32", 1).replace(
            "tpfed run ", "tpfed run --steps 32 ", 1).replace("tpfed chat", "tpfed chat --steps 64", 1)
    return line


def bash(line: str, workdir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=workdir, capture_output=True,
                          text=True, env=environment(workdir), input=stdin, timeout=PER_LINE_TIMEOUT)


def start(line: str, workdir: Path, ready: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start a line that runs until stopped; wait for ``ready`` in its output (stdout+stderr)."""
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=workdir, env=environment(workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen = ""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            seen += os.read(fd, 65536).decode(errors="replace")
        if ready in seen:
            return proc, seen
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc)
    pytest.fail(f"{line!r} did not print {ready!r}: {seen[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def check_ok(line: str, r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"{line!r} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    assert "…" not in r.stdout, f"{line!r}: output cut when piped:\n{r.stdout}"


def test_the_readme_has_command_lines():
    lines = readme_lines()
    assert any(line.startswith("tpfed run ") for line in lines)
    for prefix in SKIPPED:  # the skip list names only lines the README has
        assert any(line.startswith(prefix) for line in lines), f"no README line starts {prefix!r}"


def test_serial_urls_are_quoted_for_zsh():
    for line in readme_lines():
        for m in re.finditer(r"serial://\S*\?", line):
            before = line[: m.start()]
            assert before.count("'") % 2 == 1 or before.count('"') % 2 == 1, (
                f"unquoted ? in {line!r}: zsh takes it as a wildcard")


@pytest.mark.slow
@pytest.mark.parametrize("line", _params())
def test_readme_line(line: str, workdir: Path) -> None:
    if needs_boards(line):
        for tool in ("qemu-system-arm", "arm-none-eabi-gcc"):
            if not shutil.which(tool):
                pytest.skip(f"emulated boards need {tool}")
    line = bounded(line)

    if line.startswith("tpfed peer "):  # runs until stopped: it must say where it listens
        port = free_udp_port()
        proc, out = start(line.replace(":7000", f":{port}"), workdir, "listening on")
        try:
            assert f":{port}" in out and proc.poll() is None
        finally:
            stop(proc)
        return

    if re.match(r"tpfed run --steps \d+ --peers udp://", line):  # two `tpfed peer`s stand in
        ports = [free_udp_port(), free_udp_port()]
        peers = [start(f"tpfed peer --listen udp://127.0.0.1:{p} --key-file federation.key",
                       workdir, "listening on")[0] for p in ports]
        try:
            line = line.replace("10.0.0.5:7000", f"127.0.0.1:{ports[0]}").replace(
                "10.0.0.6:7000", f"127.0.0.1:{ports[1]}")
            r = bash(line, workdir)
            check_ok(line, r)
            assert r.stdout.startswith("Once upon a time") and len(r.stdout) > 30
        finally:
            for p in peers:
                stop(p)
        return

    if line.startswith("tpfed serve "):  # runs until stopped: it must answer
        port = free_tcp_port()
        proc, _ = start(line.replace("--port 8000", f"--port {port}"), workdir,
                        f"127.0.0.1:{port}", timeout=120)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                        models = json.load(resp)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.2)
            assert models["data"], models
        finally:
            stop(proc)
        return

    if line.startswith("tpfed chat"):  # one turn on standard input, then end of input
        r = bash(line, workdir, stdin="Tell me a story.\n")
        check_ok(line, r)
        return

    r = bash(line, workdir)
    check_ok(line, r)
    if re.match(r"(echo .*\| )?tpfed (run|demo)\b", line):
        assert "Once upon a time" in r.stdout
    if "--plot" in line:
        plot = workdir / re.search(r"--plot (\S+)", line).group(1)
        assert plot.is_file() and plot.stat().st_size > 1000
    if line.startswith("tpfed plan") or line.startswith("tpfed devices"):
        assert r.stdout.strip()


@pytest.mark.hil
def test_firmware_size_table_is_current():
    """The README's flash/RAM table says what `python tools/firmware_sizes.py` measures now."""
    if not shutil.which("arm-none-eabi-gcc"):
        pytest.skip("needs arm-none-eabi-gcc to build the emulated boards' firmware")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "firmware_sizes.py")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    measured = {m.group(1): (int(m.group(2)), int(m.group(3)))
                for m in re.finditer(r"^\s+(\S+)\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s+(\d+)$", r.stdout, re.M)}
    documented = {m.group(1): (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
                  for m in re.finditer(r"^\| ([a-z]\S*) \| ([\d,]+) B \| ([\d,]+) B \|", README.read_text(), re.M)}
    assert documented, "no size table in the README"
    for env, sizes in documented.items():
        assert measured.get(env) == sizes, (
            f"README says {env} takes {sizes} (flash, RAM) bytes; firmware_sizes.py measures "
            f"{measured.get(env)}: update the table")
