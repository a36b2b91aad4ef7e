"""Float32 reference forward: the known greedy continuation of stories260K."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.llama2c import HEADER_BYTES, expected_file_size, load_llama2c
from tpfed.model.reference import FloatTransformer, rope_tables
from tpfed.model.tokenizer import Tokenizer

KNOWN = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def write_model(path, cfg: ModelConfig, seed: int, scale: float) -> None:
    n = (expected_file_size(cfg) - HEADER_BYTES) // 4
    data = (np.random.default_rng(seed).standard_normal(n) * scale).astype("<f4")
    header = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len]
    path.write_bytes(np.array(header, "<i4").tobytes() + data.tobytes())


def greedy(model, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for pos in range(len(ids) + steps - 1):
        logits = model.forward(out[pos], pos)
        if pos + 1 >= len(out):
            out.append(int(np.argmax(logits)))
    return out


def test_greedy_once_upon_a_time(stories260k_dir):
    w = load_llama2c(stories260k_dir / "stories260K.bin")
    tok = Tokenizer.load(stories260k_dir / "tok512.bin", w.config.vocab_size)
    ids = tok.encode("Once upon a time")
    text = tok.decode(greedy(FloatTransformer(w), ids, 40))
    assert text.startswith(KNOWN), text


def test_reset_and_bounds(stories260k_dir):
    w = load_llama2c(stories260k_dir / "stories260K.bin")
    m = FloatTransformer(w)
    a = [m.forward(t, p) for p, t in enumerate([1, 403, 407])]
    m.reset()
    b = [m.forward(t, p) for p, t in enumerate([1, 403, 407])]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (512,) and a[0].dtype == np.float32
    with pytest.raises(ModelError):
        m.forward(512, 0)
    with pytest.raises(ModelError):
        m.forward(1, 512)


def test_rope_tables_match_run_c_formula():
    cos, sin = rope_tables(8, 16, 10000.0)
    pos, i = 7, 6  # pair (6, 7) of a head
    freq = 1.0 / 10000.0 ** (i / 8)
    assert cos[pos, i // 2] == pytest.approx(np.cos(pos * freq), abs=1e-6)
    assert sin[pos, i // 2] == pytest.approx(np.sin(pos * freq), abs=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads(tmp_path):
    """A GQA model equals the MHA model whose KV heads are the GQA heads repeated."""
    gqa = ModelConfig(dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=8)
    write_model(tmp_path / "g.bin", gqa, seed=3, scale=0.3)
    wg = load_llama2c(tmp_path / "g.bin")
    mha = dataclasses.replace(gqa, n_kv_heads=4)

    def rep(t: np.ndarray) -> np.ndarray:  # (layer, 2 heads * 4, dim) -> (layer, 4 heads * 4, dim)
        return np.repeat(t.reshape(2, 2, 4, 16), 2, axis=1).reshape(2, 16, 16)

    wm = dataclasses.replace(wg, config=mha, wk=rep(wg.wk), wv=rep(wg.wv))
    fg, fm = FloatTransformer(wg), FloatTransformer(wm)
    for pos, t in enumerate([1, 50, 260, 7, 99]):
        np.testing.assert_allclose(fg.forward(t, pos), fm.forward(t, pos), rtol=1e-5, atol=1e-5)
