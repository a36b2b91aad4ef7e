"""The C kernels (tpfed.compute._native via tpfed.compute.kernels) against numpy oracles.

Integer results and the Q8_0 kernels are checked bit for bit: against an independent numpy
oracle, and the selected (optimised) variant against the reference. Float kernels are checked
against float64 numpy with the tolerances stated next to each test, and bit for bit against a
float32 numpy replay of their specified operations, with exp, log, sin and cos taken from the
library's portable math (tpfed_math.h, tested in test_math.py: < 1 ULP each), which the kernels
use instead of libm so that every target gives the same bits.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tpfed.compute._native import ffi, lib

from tpfed.compute import kernels as K

RNG_SEED = 20240531


# ---------------------------------------------------------------- oracles and helpers


def np_fp16_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def np_fp16_to_f32(h: np.ndarray) -> np.ndarray:
    return h.view(np.float16).astype(np.float32)


def oracle_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 of a 1-D float32 vector in numpy: float32 arithmetic for amax, d, id and x*id, and
    round-half-away-from-zero done exactly in float64."""
    n = x.size
    nb = K.n_blocks(n)
    xb = np.zeros(nb * 32, dtype=np.float32)
    xb[:n] = x
    xb = xb.reshape(nb, 32)
    with np.errstate(all="ignore"):
        amax = np.fmax.reduce(np.abs(xb), axis=1, initial=np.float32(0)).astype(np.float32)
        d = (amax / np.float32(127)).astype(np.float32)
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        v = (xb * inv[:, None]).astype(np.float32).astype(np.float64)
        r = np.sign(v) * np.floor(np.abs(v) + 0.5)
        r = np.where(np.isnan(r), 0.0, np.clip(r, -127.0, 127.0))
    return r.astype(np.int8).reshape(-1)[:n], np_fp16_bits(d)


def oracle_matmul(wqs: np.ndarray, wd: np.ndarray, xqs: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """The specified matmul in numpy: exact int block sums, float32 products, and the per-row
    float32 accumulation in ascending block order."""
    rows, cols = wqs.shape
    nb = K.n_blocks(cols)
    pad = nb * 32 - cols
    w = np.pad(wqs, ((0, 0), (0, pad))).astype(np.int64).reshape(rows, nb, 32)
    x = np.pad(xqs, (0, pad)).astype(np.int64).reshape(nb, 32)
    isum = np.einsum("rbk,bk->rb", w, x)
    with np.errstate(all="ignore"):
        scale = np_fp16_to_f32(wd) * np_fp16_to_f32(xd)[None, :]
        prod = isum.astype(np.float32) * scale
        acc = np.zeros(rows, dtype=np.float32)
        for b in range(nb):
            acc = acc + prod[:, b]
    return acc


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bit patterns, except that any NaN equals any NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    na, nb_ = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb_), "NaN in different places"
    bits = np.uint32 if a.dtype == np.float32 else np.uint16
    diff = np.flatnonzero(a.view(bits)[~na] != b.view(bits)[~na])
    assert diff.size == 0, f"{diff.size} differ, first at {diff[0]}: {a[~na][diff[0]]!r} vs {b[~na][diff[0]]!r}"


def q8(qs: np.ndarray, d: np.ndarray) -> K.Q8Tensor:
    return K.Q8Tensor(np.ascontiguousarray(qs, dtype=np.int8), np.ascontiguousarray(d, np.uint16))


def random_q8(rng: np.random.Generator, shape: tuple[int, ...], lo: float = 1e-3,
              hi: float = 1.0, qmin: int = -128) -> K.Q8Tensor:
    """int8 values in [qmin, 127] and positive or negative fp16 scales in [lo, hi).

    The AVX2 matmul has two paths: one for x without -128 (what quantize produces) and an
    exact-for-everything one taken when x holds a -128; tests draw x both ways."""
    qs = rng.integers(qmin, 128, size=shape, dtype=np.int8)
    nb = (*shape[:-1], K.n_blocks(shape[-1]))
    mag = np.exp(rng.uniform(np.log(lo), np.log(hi), size=nb)).astype(np.float32)
    sign = rng.choice(np.array([-1, 1], dtype=np.float32), size=nb)
    return q8(qs, np_fp16_bits(mag * sign))


# ---------------------------------------------------------------- fp16


def test_fp16_to_f32_all_65536_values() -> None:
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    assert_exact = K.fp16_to_f32(h).view(np.uint32)
    assert np.array_equal(assert_exact, h.view(np.float16).astype(np.float32).view(np.uint32))


def test_f32_to_fp16_roundtrips_all_65536_values() -> None:
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    assert np.array_equal(K.f32_to_fp16(K.fp16_to_f32(h)), h)


def _tie_points() -> np.ndarray:
    """Midpoints between adjacent finite halves (exact in float32), one float32 ulp either side,
    both signs; ties to even and carries into the exponent (up to the overflow to inf)."""
    h = np.arange(0, 0x7C00, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)  # 0x7bff + 1 is inf: handled below
    hi[-1] = 65536.0  # the value 0x7bff would round up to with more exponent range
    mid = ((lo + hi) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2)
    pts = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)),
                          np.nextafter(mid, np.float32(0))])
    return np.concatenate([pts, -pts])


def test_f32_to_fp16_matches_numpy_on_ties_and_specials() -> None:
    specials = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e9, 3.4028235e38,
                         2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 1.5 * 2**-24,
                         2.5 * 2**-24, 1e-45, 1.17549435e-38, np.inf, -np.inf, np.nan],
                        dtype=np.float32)
    nan_bits = np.array([0x7F800001, 0x7FC00000, 0x7F801FFF, 0x7F802000, 0xFFFFFFFF, 0x7FBFFFFF,
                         0xFF800001, 0x7FE00000], dtype=np.uint32).view(np.float32)
    x = np.concatenate([specials, -specials, nan_bits, _tie_points()])
    assert np.array_equal(K.f32_to_fp16(x), np_fp16_bits(x))


def test_f32_to_fp16_matches_numpy_on_random_bit_patterns() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # plus a dense sweep of the range where halves are subnormal or tiny normals
    sweep = np.arange(0x32800000, 0x39000000, 97, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, sweep, -sweep])
    assert np.array_equal(K.f32_to_fp16(x), np_fp16_bits(x))


def test_scalar_fp16_functions_agree_with_array_ones() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(500) * np.exp(rng.uniform(-20, 12, 500))).astype(np.float32)
    want = np_fp16_bits(x)
    assert [lib.f32_to_fp16(float(v)) for v in x] == want.tolist()
    back = np.array([lib.fp16_to_f32(int(h)) for h in want], dtype=np.float32)
    assert np.array_equal(back.view(np.uint32), np_fp16_to_f32(want).view(np.uint32))


# ---------------------------------------------------------------- quantize / dequantize


QUANT_LENGTHS = [0, 1, 2, 7, 31, 32, 33, 63, 64, 65, 100, 172, 255, 256, 257, 1000, 4096]


def _quant_inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(RNG_SEED + n)
    with np.errstate(over="ignore"):
        xs = [
            rng.standard_normal(n),
            np.zeros(n, dtype=np.float32),
            -np.zeros(n, dtype=np.float32),
            (rng.standard_normal(n) * 3e37).astype(np.float32),
            (rng.standard_normal(n) * 1e-39).astype(np.float32),  # subnormal: 1/d overflows
            (rng.standard_normal(n) * 1e-20).astype(np.float32),
            rng.choice(np.array([-127, 127, -126.5, 0.5, -0.5, 1.5, -2.5], np.float32), n),
            np.exp(rng.uniform(-40, 40, n)) * rng.choice([-1, 1], n),
        ]
        return [np.asarray(x, dtype=np.float32) for x in xs]


@pytest.mark.parametrize("n", QUANT_LENGTHS)
def test_quantize_matches_oracle_and_ref(n: int) -> None:
    for x in _quant_inputs(n):
        want_q, want_d = oracle_quantize(x)
        for fn in (K.quantize_q8_0, K.quantize_q8_0_ref):
            t = fn(x)
            assert t.shape == (n,) and t.d.shape == (K.n_blocks(n),)
            assert np.array_equal(t.qs, want_q)
            assert np.array_equal(t.d, want_d)


def test_quantize_exact_ties_and_extremes() -> None:
    # amax 127 gives d = 1, id = 1: values are rounded half away from zero, never to -128
    x = np.array([127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, -127, 0.49999997],
                 dtype=np.float32)
    want = [127, 1, -1, 2, -2, 3, -3, 127, -127, -127, 0]
    for fn in (K.quantize_q8_0, K.quantize_q8_0_ref):
        t = fn(x)
        assert t.qs.tolist() == want
        assert t.d.tolist() == [np_fp16_bits(np.float32(1.0)).item()]


def test_quantize_non_finite_blocks_are_defined() -> None:
    x = np.ones(70, dtype=np.float32)
    x[3] = np.inf  # block 0: amax inf, d inf, id 0, inf * 0 = NaN -> 0: all zeros, scale inf
    x[40] = np.nan  # block 1: NaN ignored by amax, quantises to 0; the rest is normal
    for fn in (K.quantize_q8_0, K.quantize_q8_0_ref):
        t = fn(x)
        assert not t.qs[:32].any() and t.d[0] == 0x7C00
        assert t.qs[40] == 0 and (np.delete(t.qs[32:64], 8) == 127).all()
        assert (t.qs[64:] == 127).all()
        assert np.isnan(t.dequantize()[:32]).all()


@pytest.mark.parametrize("shape", [(3, 5), (4, 32), (5, 33), (7, 172), (9, 64), (2, 300)])
def test_quantize_matrix_is_row_by_row(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :] *= 1e4
    for fn in (K.quantize_q8_0, K.quantize_q8_0_ref):
        t = fn(x)
        assert t.qs.shape == shape and t.d.shape == (shape[0], K.n_blocks(shape[1]))
        for r in range(shape[0]):
            q, d = oracle_quantize(x[r])
            assert np.array_equal(t.qs[r], q) and np.array_equal(t.d[r], d)


def test_quantize_into_existing_tensor() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    out = K.empty_q8_0((6, 40))
    assert K.quantize_q8_0(x, out=out) is out
    q, d = oracle_quantize(x[5])
    assert np.array_equal(out.qs[5], q) and np.array_equal(out.d[5], d)


@pytest.mark.parametrize("n", [1, 31, 33, 172, 1000])
def test_dequantize_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    t = random_q8(rng, (n,), lo=1e-8, hi=6e4)
    want = np.repeat(np_fp16_to_f32(t.d), 32)[:n] * t.qs.astype(np.float32)
    assert_same_bits(K.dequantize_q8_0(t), want)
    m = random_q8(rng, (3, n))
    wantm = np.repeat(np_fp16_to_f32(m.d), 32, axis=1)[:, :n] * m.qs.astype(np.float32)
    assert_same_bits(m.dequantize(), wantm)


def test_quantize_error_is_within_half_a_step() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-3, 8, 4096))).astype(np.float32)
    back = K.quantize_q8_0(x).dequantize()
    xb = np.abs(np.pad(x, (0, 0))).reshape(-1, 32)
    amax = xb.max(axis=1, keepdims=True)
    # |x - d'q| <= d/2 + 127 |d - d'| with d = amax/127 and |d - d'| <= d * 2^-11 (fp16)
    bound = (amax / 254 + amax * 2.0**-11) * (1 + 1e-6)
    assert (np.abs(x - back).reshape(-1, 32) <= bound).all()


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 130),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_property_quantize_variants_agree_with_oracle(x: np.ndarray) -> None:
    want_q, want_d = oracle_quantize(x)
    for fn in (K.quantize_q8_0, K.quantize_q8_0_ref):
        t = fn(x)
        assert np.array_equal(t.qs, want_q) and np.array_equal(t.d, want_d)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 100),
                  elements=st.floats(-6e5, 6e5, width=32)))
def test_property_roundtrip_error_bound(x: np.ndarray) -> None:
    back = K.quantize_q8_0(x).dequantize()
    nb = K.n_blocks(x.size)
    xb = np.zeros(nb * 32, np.float64)
    xb[: x.size] = x
    amax = np.repeat(np.abs(xb.reshape(nb, 32)).max(axis=1), 32)[: x.size]
    # fp16 keeps d to 2^-11 relative while it is a normal half (d >= 2^-14); below that its
    # absolute error is at most half the smallest subnormal, 2^-25
    bound = amax / 254 + 127 * np.maximum(amax / 127 * 2.0**-11, 2.0**-25) + 1e-30
    assert (np.abs(x.astype(np.float64) - back) <= bound * (1 + 1e-6)).all()


# ---------------------------------------------------------------- matmul


MATMUL_ROWS = [1, 2, 7, 8, 9, 15, 16, 17, 33]
MATMUL_COLS = [1, 7, 31, 32, 33, 64, 172, 255, 256, 257, 288, 529, 1024]


@pytest.mark.parametrize("x_qmin", [-128, -127])
@pytest.mark.parametrize("cols", MATMUL_COLS)
def test_matmul_matches_oracle_bit_for_bit(cols: int, x_qmin: int) -> None:
    rng = np.random.default_rng(RNG_SEED + cols)
    x = random_q8(rng, (cols,), qmin=x_qmin)
    if x_qmin == -128:
        x.qs[cols // 2] = -128
    for rows in MATMUL_ROWS:
        w = random_q8(rng, (rows, cols))
        want = oracle_matmul(w.qs, w.d, x.qs, x.d)
        assert_same_bits(K.matmul_q8_0_f32_ref(w, x), want)
        assert_same_bits(K.matmul_q8_0_f32(w, x), want)


@pytest.mark.parametrize("rows,cols", [(40, 300), (100, 4096), (67, 1000), (1, 4096)])
@pytest.mark.parametrize("threads", [2, 3])
def test_matmul_threads_give_the_same_bits(rows: int, cols: int, threads: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    w, x = random_q8(rng, (rows, cols)), random_q8(rng, (cols,), qmin=-127)
    one = K.matmul_q8_0_f32(w, x)
    assert_same_bits(K.matmul_q8_0_f32(w, x, threads=threads), one)
    assert_same_bits(K.matmul_q8_0_f32_ref(w, x, threads=threads), one)


@pytest.mark.parametrize("wv,xv", [(-128, -128), (127, 127), (-128, 127), (127, -128), (0, -128)])
@pytest.mark.parametrize("cols", [32, 33, 300])
def test_matmul_int8_extremes(wv: int, xv: int, cols: int) -> None:
    rows = 11
    one = np_fp16_bits(np.float32(1.0))
    w = q8(np.full((rows, cols), wv), np.full((rows, K.n_blocks(cols)), one))
    x = q8(np.full(cols, xv), np.full(K.n_blocks(cols), one))
    want = np.full(rows, float(wv * xv * cols), dtype=np.float32)  # exact: < 2^24
    for fn in (K.matmul_q8_0_f32, K.matmul_q8_0_f32_ref):
        assert_same_bits(fn(w, x), want)


def test_matmul_zeros_and_non_finite_scales() -> None:
    rng = np.random.default_rng(RNG_SEED)
    rows, cols = 13, 100
    x = random_q8(rng, (cols,))
    zero_w = q8(np.zeros((rows, cols)), np.zeros((rows, K.n_blocks(cols))))
    for fn in (K.matmul_q8_0_f32, K.matmul_q8_0_f32_ref):
        out = fn(zero_w, x)
        assert (out.view(np.uint32) == 0).all()  # +0.0 exactly, as the reference starts from it
    w = random_q8(rng, (rows, cols), lo=1e2, hi=6e4)
    wd = w.d.copy()
    wd[0, 1], wd[1, 2], wd[2, 3] = 0x7C00, 0xFC00, 0x7E00  # inf, -inf, NaN scales
    big = K.Q8Tensor(w.qs, wd)
    want = oracle_matmul(big.qs, big.d, x.qs, x.d)
    for fn in (K.matmul_q8_0_f32, K.matmul_q8_0_f32_ref):
        assert_same_bits(fn(big, x), want)


def test_matmul_of_quantized_floats_is_close_to_float_matmul() -> None:
    rng = np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((64, 172)).astype(np.float32)
    x = rng.standard_normal(172).astype(np.float32)
    got = K.matmul_q8_0_f32(K.quantize_q8_0(w), K.quantize_q8_0(x))
    want = w.astype(np.float64) @ x.astype(np.float64)
    # two Q8_0 quantisations of unit-variance data: about 1% of the output's scale
    assert np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 300), st.integers(0, 2**32 - 1), st.booleans())
def test_property_matmul_variant_equals_reference(rows: int, cols: int, seed: int,
                                                  x_m128: bool) -> None:
    rng = np.random.default_rng(seed)
    w = random_q8(rng, (rows, cols), lo=1e-6, hi=6e4)
    x = random_q8(rng, (cols,), 1e-6, 6e4, qmin=-128 if x_m128 else -127)
    assert_same_bits(K.matmul_q8_0_f32(w, x), K.matmul_q8_0_f32_ref(w, x))


# ---------------------------------------------------------------- float kernels


@pytest.mark.parametrize("n", [1, 5, 64, 172, 4096])
def test_rmsnorm(n: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64) + 1e-5) * w
    # float32 sum of squares over n terms: relative error ~ n * 2^-24 at worst, 1e-5 in practice
    np.testing.assert_allclose(K.rmsnorm_f32(x, w), want, rtol=2e-5, atol=1e-6)
    K.rmsnorm_f32(x, w, eps=1e-5, out=x)  # aliasing is allowed
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=1e-6)
    z = np.zeros(n, np.float32)
    assert (K.rmsnorm_f32(z, w, eps=1e-6) == 0).all()


@pytest.mark.parametrize("n", [1, 2, 17, 513])
def test_softmax(n: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    for scale in (1.0, 100.0, 1e4):  # large values: max subtraction keeps it finite
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        x64 = x.astype(np.float64)
        want = np.exp(x64 - x64.max())
        want /= want.sum()
        got = K.softmax_f32(x)
        assert got is x and np.isfinite(got).all()
        # exp_f32 < 1 ulp, float32 sum of n terms
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def c_exp(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    lib.exp_f32_n(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", x), x.size)
    return out


@pytest.mark.parametrize("n", [1, 2, 17, 172, 513])
def test_softmax_and_silu_are_the_specified_float32_operations(n: int) -> None:
    """Bit for bit: softmax = exp_f32(x - max) / (sequential float32 sum); silu and swiglu =
    x * (1 / (1 + exp_f32(-x))) (* up)."""
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(n) * 20).astype(np.float32)
    e = c_exp(x - x.max())
    want = e / np.add.accumulate(e, dtype=np.float32)[-1]
    assert_same_bits(K.softmax_f32(x.copy()), want)
    x = np.concatenate([x, np.float32([0, -0.0, 88.8, -88.8, -103, 104, 1e-30])])
    up = rng.standard_normal(x.size).astype(np.float32)
    with np.errstate(over="ignore"):
        silu = x * (np.float32(1) / (np.float32(1) + c_exp(-x)))
    assert_same_bits(K.silu_f32(x.copy()), silu)
    assert_same_bits(K.swiglu_f32(x, up), silu * up)


def np_rope(x: np.ndarray, head_size: int, pos: int, theta: float) -> np.ndarray:
    x = x.astype(np.float64).reshape(-1).copy()
    j = np.arange(0, x.size, 2) % head_size
    val = pos * theta ** -(j / head_size)
    c, s = np.cos(val), np.sin(val)
    v0, v1 = x[0::2].copy(), x[1::2].copy()
    x[0::2] = v0 * c - v1 * s
    x[1::2] = v0 * s + v1 * c
    return x


def rope_tolerance(x: np.ndarray, head_size: int, pos: int, theta: float = 10000.0) -> np.ndarray:
    """Per-element bound for RoPE against float64. freq = theta^(-j/hs) is exp_f32 (< 1 ulp) of
    a float32 argument -(j/hs) * ln(theta) that is off by about 2^-23 of its size |ln freq|, so
    freq is off by (1 + |ln freq|) * freq * 2^-23; the angle pos * freq is then rounded (half an
    ulp, freq * pos * 2^-24). The rotated pair of length |v| moves by |v| * angle error, plus a
    few ulp of |v| for cos, sin and the rotation itself."""
    v = x.astype(np.float64).reshape(-1, 2)
    r = np.hypot(v[:, 0], v[:, 1])
    j = np.arange(0, x.size, 2) % head_size
    freq = theta ** -(j / head_size)
    angle_err = pos * freq * ((1 - np.log(freq)) * 2.0**-23 + 2.0**-24)
    return np.repeat(r * (1.25 * angle_err + 2.0**-21), 2).reshape(x.shape)


@pytest.mark.parametrize("head_size,heads", [(2, 1), (8, 8), (8, 4), (64, 3)])
@pytest.mark.parametrize("pos", [0, 1, 7, 511, 65535])
def test_rope(head_size: int, heads: int, pos: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((heads, head_size)).astype(np.float32)
    want = np_rope(x, head_size, pos, 10000.0).reshape(heads, head_size)
    got = K.rope_f32(x.copy(), head_size, pos)
    assert (np.abs(got - want) <= rope_tolerance(x, head_size, pos)).all()
    flat = rng.standard_normal(heads * head_size).astype(np.float32)
    want = np_rope(flat, head_size, pos, 500000.0)
    got = K.rope_f32(flat.copy(), head_size, pos, theta=500000.0)
    assert (np.abs(got - want) <= rope_tolerance(flat, head_size, pos, 500000.0)).all()


@pytest.mark.parametrize("pos", [0, 3, 511, 4097, 65535])
def test_rope_rotates_by_the_specified_float32_angle(pos: int) -> None:
    """With the kernel's own float32 angle (freq = exp_f32(-(j/hs) * log_f32(theta)), 1 for
    j = 0; angle = pos * freq), the rotation matches float64 cos/sin of that angle to a few ulp
    of the pair's length, also at angles up to 65535 rad."""
    rng = np.random.default_rng(RNG_SEED)
    hs, theta = 16, np.float32(10000.0)
    x = rng.standard_normal(4 * hs).astype(np.float32)
    j = (np.arange(0, x.size, 2) % hs).astype(np.float32)
    arg = -(j / np.float32(hs)) * np.float32(lib.log_f32(float(theta)))
    freq = np.where(j == 0, np.float32(1), c_exp(arg))
    angle = (np.float32(pos) * freq).astype(np.float64)
    v0, v1 = x[0::2].astype(np.float64), x[1::2].astype(np.float64)
    want = np.empty(x.size)
    want[0::2] = v0 * np.cos(angle) - v1 * np.sin(angle)
    want[1::2] = v0 * np.sin(angle) + v1 * np.cos(angle)
    got = K.rope_f32(x.copy(), hs, pos, theta=float(theta))
    assert (np.abs(got - want) <= rope_tolerance(x, hs, 0)).all()


def test_silu_and_swiglu() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([rng.standard_normal(1001) * 5, [0, -0.0, 30, -30, 88, -88, -100, 100]])
    x = x.astype(np.float32)
    up = rng.standard_normal(x.size).astype(np.float32)
    x64 = x.astype(np.float64)
    silu = x64 / (1 + np.exp(-x64))
    # exp_f32 < 1 ulp; where exp_f32(-x) overflows the exact answer is below 1e-30
    np.testing.assert_allclose(K.silu_f32(x.copy()), silu, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(K.swiglu_f32(x, up), silu * up, rtol=1e-6, atol=1e-30)
    g = x.copy()
    K.swiglu_f32(g, up, out=g)
    np.testing.assert_allclose(g, silu * up, rtol=1e-6, atol=1e-30)


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    q, k, v = (a.astype(np.float64) for a in (q, k[: pos + 1], v[: pos + 1]))
    s = q @ k.T / np.sqrt(q.shape[1])
    s = np.exp(s - s.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    return s @ v


@pytest.mark.parametrize("pos", [0, 1, 5, 200])
def test_attention_on_strided_cache_views(pos: int) -> None:
    rng = np.random.default_rng(RNG_SEED)
    seq, n_kv, hs, n_q = 256, 4, 8, 2
    kc = rng.standard_normal((seq, n_kv * hs)).astype(np.float32)
    vc = rng.standard_normal((seq, n_kv * hs)).astype(np.float32)
    kvh = 2
    k, v = kc[:, kvh * hs:(kvh + 1) * hs], vc[:, kvh * hs:(kvh + 1) * hs]
    q = (rng.standard_normal((n_q, hs)) * 2).astype(np.float32)
    want = np_attention(q, k, v, pos)
    # float32 dot products of 8 terms, exp_f32 and a float32 weighted sum of pos+1 rows
    np.testing.assert_allclose(K.attention_f32(q, k, v, pos), want, rtol=1e-5, atol=1e-6)
    out, scratch = np.empty_like(q), np.empty(pos + 1, np.float32)
    assert K.attention_f32(q, k[: pos + 1], v[: pos + 1], pos, out, scratch) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert not np.shares_memory(out, kc) and np.isfinite(out).all()


# ---------------------------------------------------------------- wrapper contract


def test_variant_name() -> None:
    assert K.variant() in {"avx2", "ref"}


def test_n_blocks() -> None:
    assert [K.n_blocks(n) for n in (0, 1, 31, 32, 33, 172, 4096)] == [0, 1, 1, 1, 2, 6, 128]
    with pytest.raises(ValueError):
        K.n_blocks(-1)


def test_q8tensor_properties_and_validation() -> None:
    t = K.empty_q8_0((3, 40))
    assert t.shape == (3, 40) and t.d.shape == (3, 2) and t.nbytes == 3 * 40 + 3 * 2 * 2
    with pytest.raises(ValueError, match="shape"):
        K.Q8Tensor(np.zeros((3, 40), np.int8), np.zeros((3, 1), np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        K.Q8Tensor(np.zeros(40, np.uint8), np.zeros(2, np.uint16))
    with pytest.raises(ValueError, match="contiguous"):
        K.Q8Tensor(np.zeros((40, 3), np.int8).T, np.zeros((3, 2), np.uint16))
    with pytest.raises(ValueError):
        K.empty_q8_0((2, 3, 4))


def test_bad_arguments_raise_value_error() -> None:
    x = np.zeros(64, np.float32)
    w = K.quantize_q8_0(np.zeros((4, 64), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        K.quantize_q8_0(x.astype(np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        K.quantize_q8_0(np.zeros(128, np.float32)[::2])
    with pytest.raises(ValueError, match="shape"):
        K.matmul_q8_0_f32(w, K.quantize_q8_0(np.zeros(32, np.float32)))
    with pytest.raises(ValueError, match="shape"):
        K.matmul_q8_0_f32(w, K.quantize_q8_0(x), out=np.empty(5, np.float32))
    ro = np.empty(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        K.matmul_q8_0_f32(w, K.quantize_q8_0(x), out=ro)
    with pytest.raises(ValueError, match="Q8Tensor"):
        K.matmul_q8_0_f32(w.qs, K.quantize_q8_0(x))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        K.rmsnorm_f32(x, np.zeros(63, np.float32))
    with pytest.raises(ValueError, match="head_size"):
        K.rope_f32(np.zeros(12, np.float32), 3, 0)
    with pytest.raises(ValueError, match="heads"):
        K.rope_f32(np.zeros(12, np.float32), 8, 0)
    q = np.zeros((2, 8), np.float32)
    cache = np.zeros((10, 32), np.float32)
    with pytest.raises(ValueError, match="shape"):
        K.attention_f32(q, cache[:, :8], cache[:, 8:16], pos=10)
    with pytest.raises(ValueError, match="same row stride"):
        K.attention_f32(q, cache[:, :8], np.zeros((10, 8), np.float32), pos=3)
    with pytest.raises(ValueError, match="contiguous"):
        K.attention_f32(q, cache[:, :16:2], cache[:, 8:16], pos=3)
    with pytest.raises(ValueError, match="scratch"):
        K.attention_f32(q, cache[:, :8], cache[:, 8:16], pos=3, scratch=np.zeros(2, np.float32))


def test_empty_inputs() -> None:
    t = K.quantize_q8_0(np.zeros(0, np.float32))
    assert t.shape == (0,) and t.d.shape == (0,)
    w = K.quantize_q8_0(np.zeros((3, 0), np.float32))
    out = K.matmul_q8_0_f32(w, t)
    assert out.shape == (3,) and (out == 0).all()


# ---------------------------------------------------------------- tpfed bench kernels


def test_bench_kernels_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tpfed.cli import main

    args = ["bench", "kernels", "--json", "--rows", "40", "--cols", "72", "--repeat", "2",
            "--threads", "2"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("rows", "cols", "int8_gemv_ms", "numpy_f32_gemv_ms", "speedup_vs_numpy_f32",
                "int8_gemv_gbps", "memory_bandwidth_gbps", "variant", "threads"):
        assert key in result
    assert (result["rows"], result["cols"], result["threads"]) == (40, 72, 2)
    assert result["variant"] == K.variant()
    assert result["int8_gemv_ms"] > 0 and result["memory_bandwidth_gbps"] > 0
    assert result["speedup_vs_numpy_f32"] == pytest.approx(
        result["numpy_f32_gemv_ms"] / result["int8_gemv_ms"])
    assert result["int8_bytes_per_gemv"] == 40 * 72 + 40 * 3 * 2 + 72 + 3 * 2
    assert result["max_rel_error"] < 0.05
