"""``tpfed bench e2e`` on any llama2.c checkpoint: the single-process baseline, the ratios, and
a user-supplied llama2.c ``run`` binary as an extra baseline (a stand-in script here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tpfed.bench.e2e import llama2c_run_tps, run_e2e_bench
from tpfed.cli import main
from tpfed.errors import TpfedError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from make_random_llama import write_random_llama  # noqa: E402


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "rand.bin"
    write_random_llama(path, dim=64, hidden=128, layers=2, heads=4, kv_heads=2, vocab=512, seq_len=64)
    return path


def fake_run(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "run"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return exe


def test_any_checkpoint_with_a_tokenizer_and_a_llama2c_baseline(random_model: Path, stories260k_dir: Path,
                                                               tmp_path: Path) -> None:
    exe = fake_run(tmp_path, 'echo "Once upon a time"; echo "achieved tok/s: 1234.5" >&2')
    r = run_e2e_bench((), steps=300, repeat=1, model=str(random_model),
                      tokenizer=str(stories260k_dir / "tok512.bin"), llama2c_run=str(exe))
    assert r["model"] == "rand" and r["geometry"]["dim"] == 64
    assert r["steps"] == 64  # capped at the model's seq_len
    assert r["single_process_threads"] == 1
    assert r["single_process_tokens_per_s"] > 0
    assert r["llama2c_run_tokens_per_s"] == 1234.5
    assert r["single_process_vs_llama2c_run"] == pytest.approx(r["single_process_tokens_per_s"] / 1234.5,
                                                               rel=1e-3)
    assert r["points"] == []


def test_llama2c_run_failures_are_reported(random_model: Path, stories260k_dir: Path, tmp_path: Path) -> None:
    tok = stories260k_dir / "tok512.bin"
    with pytest.raises(TpfedError, match="not an executable"):
        llama2c_run_tps(tmp_path / "missing", random_model, tok, 8, 1)
    with pytest.raises(TpfedError, match="achieved tok/s"):
        llama2c_run_tps(fake_run(tmp_path, "echo oops >&2; exit 3"), random_model, tok, 8, 1)


def test_cli_json_with_one_peer(random_model: Path, stories260k_dir: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "e2e", "--model", str(random_model), "--tokenizer",
               str(stories260k_dir / "tok512.bin"), "--peers", "1", "--steps", "24", "--repeat", "1",
               "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    (p,) = r["points"]
    assert p["peers"] == 1 and p["same_text_as_single"]
    assert p["vs_single_process"] == pytest.approx(p["tokens_per_s"] / r["single_process_tokens_per_s"],
                                                   rel=1e-2)
