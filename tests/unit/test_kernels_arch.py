"""The kernels the non-Llama architectures need (tpfed_kernels.h, tpfed_math.h,
tpfed_residual.h): tanh/erfc and the GELUs against float64, LayerNorm against numpy, and the
general forms bit-exact with the Llama-only ones they extend (RoPE from a table, attention over
a span, the residual step with any norm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tpfed.compute._native import ffi, lib

from tpfed.compute.kernels import quantize_q8_0, residual_rmsnorm_q8_0

RNG = np.random.default_rng(20261127)


def _p(a: np.ndarray, ctype: str = "float[]"):
    return ffi.from_buffer(ctype, a)


def _vec(fn, x: np.ndarray) -> np.ndarray:
    return np.array([fn(float(v)) for v in x], dtype=np.float32)


def _ulp(exact: np.ndarray) -> np.ndarray:
    e = np.abs(exact).astype(np.float32)
    return np.spacing(np.maximum(e, np.float32(np.finfo(np.float32).tiny))).astype(np.float64)


def test_tanh_within_a_few_ulp_and_odd():
    x = np.concatenate([RNG.uniform(-12, 12, 20000), RNG.uniform(-0.3, 0.3, 5000),
                        [0.0, 1e-30, 2.0**-13, 0.25, 0.2499999, 9.0, 9.1, 50.0]]).astype(np.float32)
    got = _vec(lib.tanh_f32, x)
    exact = np.tanh(x.astype(np.float64))
    assert (np.abs(got - exact) / _ulp(exact)).max() <= 4.0
    np.testing.assert_array_equal(_vec(lib.tanh_f32, -x), -got)
    assert lib.tanh_f32(float("inf")) == 1.0 and math.isnan(lib.tanh_f32(float("nan")))


def test_erfc_and_erf_absolute_error():
    x = np.concatenate([RNG.uniform(-6, 6, 20000), [0.0, 0.5, 1.0, 3.0, 10.4, 11.0]]).astype(np.float32)
    erfc = np.array([math.erfc(float(v)) for v in x])
    got = _vec(lib.erfc_f32, x)
    assert np.abs(got - erfc).max() < 4e-7  # 2 - erfc(-x) near 2: one ULP of 2 is 2.4e-7
    pos = (x >= 0) & (erfc > 1e-36)  # normal results (subnormal ones keep fewer bits)
    rel = np.abs(got[pos] - erfc[pos]) / erfc[pos]
    assert rel[x[pos] < 1].max() < 5e-7
    assert rel.max() < 5e-6  # beyond, float32's rounding of x*x in exp(-x*x + ...) dominates
    assert np.abs(_vec(lib.erf_f32, x) - np.array([math.erf(float(v)) for v in x])).max() < 4e-7


@pytest.mark.parametrize("name", ["gelu_tanh_f32", "gelu_f32"])
def test_gelu_against_float64(name):
    x = np.concatenate([RNG.normal(0, 3, 5000), [-20.0, -8.0, -1e-3, 0.0, 1e-3, 8.0]]).astype(np.float32)
    got = x.copy()
    getattr(lib, name)(_p(got), got.size)
    xd = x.astype(np.float64)
    if name == "gelu_tanh_f32":
        exact = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)))
    else:
        exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in xd])
    assert np.abs(got - exact).max() <= 1e-6 * max(1.0, np.abs(exact).max())
    # act_f32 dispatches to the same bits
    code = lib.TPFED_ACT_GELU_TANH if name == "gelu_tanh_f32" else lib.TPFED_ACT_GELU
    again = x.copy()
    lib.act_f32(_p(again), again.size, code)
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm_matches_numpy(with_bias):
    n = 96
    x = RNG.normal(1.5, 2.0, n).astype(np.float32)
    w = RNG.normal(1, 0.2, n).astype(np.float32)
    b = RNG.normal(0, 0.2, n).astype(np.float32)
    out = np.empty(n, np.float32)
    lib.layernorm_f32(_p(out), _p(x), _p(w), _p(b) if with_bias else ffi.NULL, n, 1e-5)
    xd = x.astype(np.float64)
    want = (xd - xd.mean()) / np.sqrt(xd.var() + 1e-5) * w + (b if with_bias else 0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    lib.layernorm_f32(_p(x), _p(x), _p(w), _p(b) if with_bias else ffi.NULL, n, 1e-5)  # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("head_size,theta", [(8, 10000.0), (64, 500000.0), (16, 1e6)])
def test_rope_table_of_rope_freqs_is_rope_bit_for_bit(head_size, theta):
    freq = np.empty(head_size // 2, np.float32)
    lib.rope_freqs_f32(_p(freq), head_size, theta)
    for pos in (0, 1, 7, 300, 4095):
        x = RNG.normal(size=3 * head_size).astype(np.float32)
        a, b = x.copy(), x.copy()
        lib.rope_f32(_p(a), a.size, head_size, pos, theta)
        lib.rope_table_f32(_p(b), b.size, head_size, pos, _p(freq))
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("pos", [0, 5, 17])
def test_attention_span_from_zero_is_attention(pos):
    hs, nq, stride = 8, 3, 24
    q = RNG.normal(size=(nq, hs)).astype(np.float32)
    k = RNG.normal(size=(pos + 1, stride)).astype(np.float32)
    v = RNG.normal(size=(pos + 1, stride)).astype(np.float32)
    a, b = np.empty((nq, hs), np.float32), np.empty((nq, hs), np.float32)
    s = np.empty(pos + 1, np.float32)
    lib.attention_f32(_p(a), _p(q), _p(k), _p(v), nq, hs, pos, stride, _p(s))
    lib.attention_span_f32(_p(b), _p(q), _p(k), _p(v), nq, hs, 0, pos, stride, _p(s))
    np.testing.assert_array_equal(a, b)
    if pos >= 2:  # a later span is attention over those rows only
        first = pos - 2
        lib.attention_span_f32(_p(b), _p(q), _p(k), _p(v), nq, hs, first, pos, stride, _p(s))
        sc = q @ k[first:, :hs].T / np.float32(math.sqrt(hs))
        p = np.exp(sc - sc.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(b, p @ v[first:, :hs], rtol=1e-5, atol=1e-6)


def _residual_norm(fn, x, partial, bias, w, b, kind):
    n = x.size
    xb = np.empty(n, np.float32)
    q = quantize_q8_0(np.zeros(n, np.float32))
    qs, d = q.qs.copy(), q.d.copy()
    fn(_p(x), ffi.NULL if partial is None else _p(partial), ffi.NULL if bias is None else _p(bias),
       ffi.NULL if w is None else _p(w), ffi.NULL if b is None else _p(b), n, 1e-5, kind, _p(xb),
       _p(qs, "int8_t[]"), _p(d, "uint16_t[]"))
    return x, xb, qs, d


def test_residual_norm_kind_0_is_residual_rmsnorm():
    n = 80
    x = RNG.normal(size=n).astype(np.float32)
    part = RNG.normal(size=n).astype(np.float32)
    w = RNG.normal(1, 0.1, n).astype(np.float32)
    x1, xb1, qs1, d1 = _residual_norm(lib.residual_norm_q8_0, x.copy(), part, None, w, None, 0)
    x2 = x.copy()
    q = residual_rmsnorm_q8_0(x2, part, w, 1e-5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(qs1, q.qs)
    np.testing.assert_array_equal(d1, q.d)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [31, 64, 100])
def test_residual_norm_variant_equals_ref(kind, n):
    x = RNG.normal(size=n).astype(np.float32)
    part = RNG.normal(size=n).astype(np.float32)
    bias = RNG.normal(size=n).astype(np.float32)
    w = RNG.normal(1, 0.1, n).astype(np.float32)
    b = RNG.normal(0, 0.1, n).astype(np.float32)
    a = _residual_norm(lib.residual_norm_q8_0, x.copy(), part, bias, w, b, kind)
    r = _residual_norm(lib.residual_norm_q8_0_ref, x.copy(), part, bias, w, b, kind)
    for u, v in zip(a, r, strict=True):
        np.testing.assert_array_equal(u, v)
    # the arithmetic: x += partial + bias, then the norm; post-norm writes it back
    xs = x + (part + bias)
    np.testing.assert_array_equal(a[0] if not kind & 2 else xs, xs)
    if kind & 2:
        np.testing.assert_array_equal(a[0], a[1])


def test_residual_norm_without_weight_quantises_the_residual():
    x = RNG.normal(size=64).astype(np.float32)
    _, xb, qs, d = _residual_norm(lib.residual_norm_q8_0, x.copy(), None, None, None, None, 2)
    np.testing.assert_array_equal(xb, x)
    q = quantize_q8_0(x)
    np.testing.assert_array_equal(qs, q.qs)
    np.testing.assert_array_equal(d, q.d)


@pytest.mark.parametrize("bf16", [0, 1])
@pytest.mark.parametrize("n", [31, 32, 1000, 2048 + 17])
def test_quantize_16_bit_floats_without_a_float32_copy(bf16, n):
    x = RNG.normal(0, 3, n).astype(np.float32)
    if bf16:
        raw = (x.view(np.uint32) >> 16).astype(np.uint16)
        as_f32 = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        raw = x.astype(np.float16).view(np.uint16)
        as_f32 = raw.view(np.float16).astype(np.float32)
    want = quantize_q8_0(as_f32)
    for fn in (lib.quantize_16_q8_0, lib.quantize_16_q8_0_ref):
        qs, d = np.empty(n, np.int8), np.empty(want.d.shape, np.uint16)
        fn(_p(qs, "int8_t[]"), _p(d, "uint16_t[]"), _p(raw, "uint16_t[]"), n, bf16)
        np.testing.assert_array_equal(qs, want.qs)
        np.testing.assert_array_equal(d, want.d)
    assert lib.all_finite_16(_p(raw, "uint16_t[]"), n, bf16) == 1
    raw[n // 2] = 0x7F80 if bf16 else 0x7C00  # +inf
    assert lib.all_finite_16(_p(raw, "uint16_t[]"), n, bf16) == 0
