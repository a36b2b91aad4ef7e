"""llama2.c checkpoint loading: the real model, synthetic models, and broken files."""

from __future__ import annotations

import numpy as np
import pytest

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.llama2c import HEADER_BYTES, expected_file_size, load_llama2c


def write_model(path, cfg: ModelConfig, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """A random llama2.c checkpoint; returns the float32 payload."""
    n = (expected_file_size(cfg) - HEADER_BYTES) // 4
    data = (np.random.default_rng(seed).standard_normal(n) * scale).astype("<f4")
    vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
    header = np.array(
        [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.seq_len], "<i4"
    )
    path.write_bytes(header.tobytes() + data.tobytes())
    return data


def test_stories260k_geometry(stories260k_dir):
    w = load_llama2c(stories260k_dir / "stories260K.bin")
    c = w.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert c.shared_classifier and w.wcls is w.token_embedding
    assert w.wq.shape == (5, 64, 64)
    assert w.wk.shape == w.wv.shape == (5, 32, 64)
    assert w.wo.shape == (5, 64, 64)
    assert w.w1.shape == w.w3.shape == (5, 172, 64)
    assert w.w2.shape == (5, 64, 172)
    assert w.rms_final.shape == (64,)
    assert all(a.dtype == np.float32 for a in (w.wq, w.w2, w.rms_att, w.token_embedding))
    # memory-mapped, read-only, no copies
    assert not w.wq.flags.writeable


def test_layout_matches_file_order(tmp_path):
    cfg = ModelConfig(dim=8, hidden_dim=12, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=10, seq_len=4)
    data = write_model(tmp_path / "m.bin", cfg)
    w = load_llama2c(tmp_path / "m.bin")
    off = 10 * 8 + 2 * 8  # embedding, rms_att
    np.testing.assert_array_equal(w.wq.reshape(-1), data[off : off + 2 * 8 * 8])
    np.testing.assert_array_equal(w.token_embedding[3], data[24:32])
    # wq row r of layer 1 is the r-th group of `dim` floats after layer 0
    np.testing.assert_array_equal(w.wq[1, 5], data[off + 64 + 40 : off + 64 + 48])
    np.testing.assert_array_equal(w.rms_final, data[-(8 + 2 * 4 * 2) : -(2 * 4 * 2)])


def test_separate_classifier(tmp_path):
    cfg = ModelConfig(dim=8, hidden_dim=12, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=10, seq_len=4,
                      shared_classifier=False)
    data = write_model(tmp_path / "m.bin", cfg)
    w = load_llama2c(tmp_path / "m.bin", mmap=False)
    assert not w.config.shared_classifier
    assert w.wcls.shape == (10, 8)
    np.testing.assert_array_equal(w.wcls.reshape(-1), data[-80:])
    assert not np.shares_memory(w.wcls, w.token_embedding)


@pytest.mark.parametrize("delta", [-1, -4, -1000, 4, 1])
def test_wrong_size_is_rejected(stories260k_dir, tmp_path, delta):
    raw = (stories260k_dir / "stories260K.bin").read_bytes()
    bad = raw[:delta] if delta < 0 else raw + b"\0" * delta
    (tmp_path / "bad.bin").write_bytes(bad)
    with pytest.raises(ModelError, match="truncated" if delta < 0 else "trailing"):
        load_llama2c(tmp_path / "bad.bin")


def test_garbage_and_missing(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"abc")
    with pytest.raises(ModelError, match="shorter"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "garbage.bin").write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(ModelError):
        load_llama2c(tmp_path / "garbage.bin")
    (tmp_path / "text.bin").write_bytes(b"hello world, this is not a model at all" * 10)
    with pytest.raises(ModelError):
        load_llama2c(tmp_path / "text.bin")
    with pytest.raises(ModelError, match="not found"):
        load_llama2c(tmp_path / "nope.bin")
    header = np.array([64, 172, 5, 7, 4, 512, 512], "<i4").tobytes()  # dim not a multiple of heads
    (tmp_path / "heads.bin").write_bytes(header + b"\0" * 64)
    with pytest.raises(ModelError, match="n_heads"):
        load_llama2c(tmp_path / "heads.bin")


def test_nan_weights_rejected(tmp_path):
    cfg = ModelConfig(dim=8, hidden_dim=12, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=10, seq_len=4)
    write_model(tmp_path / "m.bin", cfg)
    raw = bytearray((tmp_path / "m.bin").read_bytes())
    off = HEADER_BYTES + 4 * (10 * 8 + 8 + 3)  # inside wq
    raw[off : off + 4] = np.array([np.nan], "<f4").tobytes()
    (tmp_path / "m.bin").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="wq"):
        load_llama2c(tmp_path / "m.bin")
