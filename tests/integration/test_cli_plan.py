"""The real ``tpfed plan`` / ``tpfed simulate`` commands, run as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tpfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpfed", *args], capture_output=True, text=True, timeout=120)


def test_plan_json_identical_devices():
    r = tpfed("plan", "--devices", "3", "--strategy", "round-robin", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("plan_ms", "makespan_ms", "ideal_ms", "round_robin_makespan_ms"):
        assert doc[key] > 0
    assert [d["name"] for d in doc["devices"]] == ["peer-1", "peer-2", "peer-3"]
    # stories260K: 5 layers, 4 KV groups (g -> g mod 3), 172 hidden columns
    for d in doc["devices"]:
        assert len(d["kv_groups"]) == 5 and len(d["mlp_columns"]) == 5
        assert d["memory_mb"] <= d["memory_limit_mb"]
    assert doc["devices"][0]["kv_groups"][0] == [0, 3]
    cols = sorted(tuple(r) for d in doc["devices"] for r in d["mlp_columns"][2])
    assert cols[0][0] == 0 and cols[-1][1] == 172
    assert all(a[1] == b[0] for a, b in zip(cols, cols[1:], strict=False))
    assert doc["excluded"] == []


def test_plan_json_fleet_and_hf_config(repo_root):
    r = tpfed("plan", "--model", str(repo_root / "tests/data/configs/llama-2-70b.json"),
              "--fleet", str(repo_root / "boards/fleets/lab-100.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["strategy"] == "capability"
    assert len(doc["devices"]) + len(doc["excluded"]) == 100
    assert doc["makespan_ms"] <= 1.15 * doc["ideal_ms"]  # the ideal leaves out memory and send order
    assert doc["makespan_ms"] < doc["round_robin_makespan_ms"]
    assert all(e["reason"] for e in doc["excluded"])
    groups = sorted(g for d in doc["devices"] for g in d["kv_groups"][79])
    assert groups == list(range(8))
    assert sum(g["count"] for g in doc["excluded_groups"]) == len(doc["excluded"])
    assert len(doc["excluded_groups"]) < len(doc["excluded"])


def test_plan_table_groups_exclusions_and_does_not_crop_when_piped(repo_root):
    r = tpfed("plan", "--model", str(repo_root / "tests/data/configs/llama-2-70b.json"),
              "--fleet", str(repo_root / "boards/fleets/lab-100.yaml"))
    assert r.returncode == 0, r.stderr
    assert "\u2026" not in r.stdout  # no cell cropped with an ellipsis
    assert r.stdout.count("excluded ") <= 12  # grouped by reason, not one line per device
    assert "phone-high-1..20 (20)" in r.stdout and "would help with" in r.stdout
    sim = tpfed("simulate", "--model", str(repo_root / "tests/data/configs/llama-2-70b.json"),
                "--fleet", str(repo_root / "boards/fleets/lab-100.yaml"), "--json")
    assert sim.returncode == 0, sim.stderr
    doc = json.loads(sim.stdout)
    assert abs(doc["plan_makespan_ms"] / doc["token_ms_mean"] - 1) <= 0.10


def test_plan_checkpoint_and_table(stories260k_dir):
    r = tpfed("plan", "--model", str(stories260k_dir / "stories260K.bin"), "--devices", "2")
    assert r.returncode == 0, r.stderr
    assert "peer-1" in r.stdout and "peer-2" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fleet", "/nonexistent/fleet.yaml"], "cannot read fleet file"),
        (["--devices", "1", "--model", "/nonexistent/config.json"], "no such model file"),
    ],
)
def test_plan_errors_are_one_line(args, message):
    r = tpfed("plan", *args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr


def test_plan_bad_yaml_unknown_profile_impossible(tmp_path, repo_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [ {name: a\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("devices:\n  - {name: a, profile: esp8266}\n")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("devices:\n  - {name: qemu, count: 2, profile: lm3s6965evb}\n")
    for path, message in ((bad, "not valid YAML"), (unknown, "unknown board profile 'esp8266'"),
                          (tiny, "not enough memory")):
        r = tpfed("plan", "--fleet", str(path), "--json")
        assert r.returncode == 2, r.stdout
        assert r.stderr.startswith("tpfed: error: ") and message in r.stderr
        assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_simulate_json_and_plot(tmp_path, repo_root):
    png = tmp_path / "sim.png"
    r = tpfed("simulate", "--fleet", str(repo_root / "boards/fleets/mixed-small.yaml"), "--tokens", "4",
              "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tokens"] == 4 and doc["tokens_per_s"] > 0
    assert doc["bytes_per_token"] >= doc["min_bytes_per_token"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_and_simulate_with_replicas(tmp_path, repo_root):
    r = tpfed("plan", "--devices", "5", "--replicas", "2", "--json", "--save", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["replicas"] == 2
    sets = doc["replica_sets"]
    assert sets and all(len(s) == 2 for s in sets)
    assert [n for s in sets for n in s] == [d["name"] for d in doc["devices"]]
    by_name = {d["name"]: d for d in doc["devices"]}
    for a, b in sets:
        assert by_name[a]["kv_groups"] == by_name[b]["kv_groups"]
        assert by_name[a]["mlp_columns"] == by_name[b]["mlp_columns"]
    assert any("in no replica set" in e["reason"] for e in doc["excluded"])
    from tpfed.planning.plan import Plan

    saved = Plan.load(tmp_path / "p.json")
    saved.validate()
    assert saved.replica_sets == sets
    table = tpfed("plan", "--devices", "4", "--replicas", "2")
    assert table.returncode == 0, table.stderr
    assert "replica set" in table.stdout and "┃ set ┃" in table.stdout  # the first column
    sim = tpfed("simulate", "--devices", "4", "--replicas", "2", "--tokens", "2", "--json")
    assert sim.returncode == 0, sim.stderr
    sdoc = json.loads(sim.stdout)
    assert sdoc["replicas"] == 2 and len(sdoc["replica_sets"]) >= 1
    tight = tpfed("plan", "--model", str(repo_root / "tests/data/configs/llama-2-70b.json"), "--devices", "4",
                  "--replicas", "3")
    assert tight.returncode == 2
    assert tight.stderr.count("\n") == 1 and "not enough memory for 3 replicas" in tight.stderr
    assert "MiB per copy missing" in tight.stderr
