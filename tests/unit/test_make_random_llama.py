"""tools/make_random_llama.py: the checkpoint it writes loads with the project's llama2.c
loader, has the asked geometry, is deterministic per seed, and generates varied text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.model.llama2c import expected_file_size, load_llama2c

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from make_random_llama import write_random_llama  # noqa: E402

GEOMETRY = dict(dim=64, hidden=96, layers=2, heads=4, kv_heads=2, vocab=512, seq_len=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rand") / "tiny.bin"
    write_random_llama(path, seed=7, **GEOMETRY)
    return path


def test_loads_with_the_asked_geometry(tiny: Path) -> None:
    w = load_llama2c(tiny)
    c = w.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        64, 96, 2, 4, 2, 512, 32)
    assert c.shared_classifier  # positive vocab_size: the classifier is the embedding
    assert tiny.stat().st_size == expected_file_size(c)
    assert w.wk.shape == (2, 2 * 16, 64) and w.w2.shape == (2, 64, 96)
    np.testing.assert_array_equal(w.rms_att, 1.0)
    np.testing.assert_array_equal(w.rms_final, 1.0)
    # fan-in scaled normal weights: std ~ 1.6 / sqrt(in)
    assert 0.15 < float(np.std(w.wq)) < 0.25  # 1.6 / 8 = 0.2
    assert 0.13 < float(np.std(w.w2)) < 0.2  # 1.6 / sqrt(96) = 0.163


def test_same_seed_same_bytes_other_seed_other_bytes(tiny: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again.bin", tmp_path / "other.bin"
    write_random_llama(again, seed=7, **GEOMETRY)
    write_random_llama(other, seed=8, **GEOMETRY)
    assert again.read_bytes() == tiny.read_bytes()
    assert other.read_bytes() != tiny.read_bytes()


def test_greedy_text_is_deterministic_and_not_one_repeated_token(tiny: Path) -> None:
    q8 = Q8Model.load(tiny)

    def greedy() -> list[int]:
        m = Int8Transformer(q8)
        out = [1]
        for pos in range(24):
            out.append(int(np.argmax(m.forward(out[-1], pos))))
        return out

    a = greedy()
    assert a == greedy()
    assert len(set(a[1:])) >= 8, a


def test_command_line_and_bad_geometry(tmp_path: Path) -> None:
    out = tmp_path / "cli.bin"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_llama.py"), "--dim", "32",
                        "--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "40",
                        "--seq-len", "8", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_llama2c(out).config.n_kv_heads == 2  # --kv-heads defaults to --heads
    with pytest.raises(ValueError, match="multiple of heads"):
        write_random_llama(tmp_path / "bad.bin", dim=30, hidden=8, layers=1, heads=4, kv_heads=4,
                           vocab=8, seq_len=4)
