"""``tpfed devices`` as a user runs it: a subprocess against real peer processes on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def tpfed(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpfed", "devices", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture
def running_peer():
    """A ``tpfed peer`` process the test starts itself, reached as udp://HOST:PORT."""
    proc = subprocess.Popen([sys.executable, "-m", "tpfed", "peer", "--listen", "udp://127.0.0.1:0",
                             "--name", "bench-box", "--memory-mb", "64"],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (udp://\S+)", line)
        assert m, f"peer did not start: {line!r}"
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_local_peers_json_has_measured_figures():
    r = tpfed("--peers", "local:2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    devs = doc["devices"]
    assert [d["name"] for d in devs] == ["local-0", "local-1"]
    assert "serial_ports" not in doc  # with --peers only the peers are listed
    for d in devs:
        assert re.fullmatch(r"udp://127\.0\.0\.1:\d+", d["uri"])
        assert d["device_class"] == "desktop"
        assert 0.05 < d["int8_gmacs"] < 1000  # measured by the peer at startup
        assert d["arena_mib"] > 0 and d["ram_mib"] >= d["arena_mib"]
        assert 0 < d["latency_us"] < 1e5  # loopback: well under 0.1 s one way
        assert d["bandwidth_mbytes_s"] > 0
        assert d["battery_pct"] is None and d["temperature_c"] is None  # a desktop reports neither
    assert devs[0]["uri"] != devs[1]["uri"]


def test_running_peer_by_uri_in_a_table(running_peer):
    r = tpfed("--peers", running_peer)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "bench-box" in out and running_peer in out and "desktop" in out
    for col in ("int8 GMAC/s", "arena MiB", "RAM MiB", "latency us", "bandwidth MB/s", "battery",
                "temperature"):
        assert col in out
    row = next(line for line in out.splitlines() if "bench-box" in line)
    assert re.search(r"\b64\.0\b", row)  # --memory-mb 64 is the arena it offers


def test_unreachable_peer_is_one_clear_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = tpfed("--peers", f"udp://127.0.0.1:{port}", "--deadline", "0.5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tpfed: error:") and f"127.0.0.1:{port}" in lines[0]
    assert "did not answer the key handshake" in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("spec, words", [("bogus", "not understood"), ("local:0", "count must be"),
                                         ("udp://nohost", "HOST:PORT")])
def test_bad_spec_is_one_clear_line(spec, words):
    r = tpfed("--peers", spec)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_without_peers_lists_serial_ports_unopened():
    from serial.tools import list_ports

    r = tpfed("--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"] == []
    assert sorted(p["device"] for p in doc["serial_ports"]) == sorted(p.device for p in list_ports.comports())
    table = tpfed()
    assert table.returncode == 0 and "serial port(s)" in table.stdout and "--peers" in table.stdout
