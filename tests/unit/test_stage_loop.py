"""The coordinator's step between stages in one C call (tpfed_residual.h), and the one
per-token loop (Int8Transformer.forward_stages) built on it: same bits as the separate steps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol import schema

from tpfed.compute import kernels as K
from tpfed.compute.int8_forward import STAGES, Int8Transformer, Q8Model, Stage
from tpfed.errors import ModelError


def separate_steps(x: np.ndarray, partial: np.ndarray | None, w: np.ndarray, eps: float,
                   quantize=K.quantize_q8_0_ref) -> tuple[np.ndarray, K.Q8Tensor]:
    x = x.copy()
    if partial is not None:
        x += partial
    return x, quantize(K.rmsnorm_f32(x, w, eps))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), with_partial=st.booleans())
def test_residual_rmsnorm_q8_0_equals_the_separate_steps(n: int, seed: int, with_partial: bool) -> None:
    rng = np.random.default_rng(seed)
    x0 = (rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    partial = rng.standard_normal(n).astype(np.float32) if with_partial else None
    want_x, want_q = separate_steps(x0, partial, w, 1e-5)
    for fn in (K.residual_rmsnorm_q8_0_ref, K.residual_rmsnorm_q8_0):
        x = x0.copy()
        xb = np.empty(n, np.float32)
        q = fn(x, partial, w, 1e-5, xb=xb)
        np.testing.assert_array_equal(x.view(np.uint32), want_x.view(np.uint32))
        np.testing.assert_array_equal(xb.view(np.uint32), K.rmsnorm_f32(want_x, w, 1e-5).view(np.uint32))
        np.testing.assert_array_equal(q.qs, want_q.qs)
        np.testing.assert_array_equal(q.d, want_q.d)


def test_residual_rmsnorm_q8_0_checks_its_arguments() -> None:
    x = np.zeros(64, np.float32)
    w = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="partial"):
        K.residual_rmsnorm_q8_0(x, np.zeros(63, np.float32), w)
    with pytest.raises(ValueError, match="w must"):
        K.residual_rmsnorm_q8_0(x, None, np.ones(64, np.float64))
    with pytest.raises(ValueError, match="writeable"):
        ro = x.copy()
        ro.flags.writeable = False
        K.residual_rmsnorm_q8_0(ro, None, w)


def test_one_block_size_and_one_stage_enum() -> None:
    from tpfed.compute._native import lib

    assert K.Q8_BLOCK == lib.TPFED_Q8_BLOCK == schema.Q8_BLOCK
    assert Stage is schema.Stage
    assert STAGES == (schema.Stage.ATTENTION, schema.Stage.MLP)


@pytest.fixture(scope="module")
def q8(stories260k_dir) -> Q8Model:
    return Q8Model.load(stories260k_dir / "stories260K.bin")


def old_loop(m: Int8Transformer, token: int, pos: int) -> np.ndarray:
    """The forward as it was written before forward_stages: separate kernel calls and numpy
    residual adds. The new loop must give the same bits."""
    c = m.config
    x = m.model.token_embedding[token].copy()
    for layer in range(c.n_layers):
        L = m.model.layers[layer]
        for stage, w in ((Stage.ATTENTION, L.rms_att), (Stage.MLP, L.rms_ffn)):
            xq = K.quantize_q8_0(K.rmsnorm_f32(x, w, c.norm_eps))
            x += m.partials(layer, stage, xq, pos)
    xq = K.quantize_q8_0(K.rmsnorm_f32(x, m.model.rms_final, c.norm_eps))
    return K.matmul_q8_0_f32(m.model.wcls, xq)


def test_forward_has_the_bits_of_the_separate_steps(q8: Q8Model) -> None:
    new, old = Int8Transformer(q8), Int8Transformer(q8)
    token = 1
    for pos in range(40):
        a = new.forward(token, pos).copy()
        b = old_loop(old, token, pos)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        token = int(np.argmax(a))


def test_forward_stages_yields_every_stage_in_order_and_records_it(q8: Q8Model) -> None:
    c = q8.config
    driven, ref = Int8Transformer(q8), Int8Transformer(q8)
    for pos, token in enumerate([1, 403, 407]):
        gen = driven.forward_stages(token, pos)
        seen = []
        partial = None
        try:
            while True:
                layer, stage, xq = gen.send(partial)
                seen.append((layer, stage))
                if stage == Stage.ATTENTION:  # the log keeps what a replay needs
                    h = driven.history.activations(layer, stage, pos + 1)
                    np.testing.assert_array_equal(h.qs[pos], xq.qs)
                    np.testing.assert_array_equal(h.d[pos], xq.d)
                partial = ref.partials(layer, stage, xq, pos).copy()  # an outside source
        except StopIteration as done:
            logits = done.value
        assert seen == [(layer, s) for layer in range(c.n_layers) for s in STAGES]
        assert driven.history.length == pos + 1
        np.testing.assert_array_equal(logits, ref.forward(token, pos))


def test_forward_stages_rejects_bad_partials_and_positions(q8: Q8Model) -> None:
    m = Int8Transformer(q8)
    gen = m.forward_stages(1, 0)
    next(gen)
    with pytest.raises(ModelError, match="partial"):
        gen.send(np.zeros(q8.config.dim + 1, np.float32))
    gen = m.forward_stages(1, 0)
    next(gen)
    with pytest.raises(ModelError, match="partial"):
        gen.send(np.zeros(q8.config.dim, np.float64))
    with pytest.raises(ModelError, match="outside the context"):
        next(m.forward_stages(1, q8.config.seq_len))
    with pytest.raises(ModelError, match="fed before"):
        next(Int8Transformer(q8).forward_stages(1, 3))
