"""The portable binary32 math of firmware/lib/tpfed (tpfed_math.h) against float64 numpy.

exp_f32, log_f32 and sin_f32/cos_f32/sincos_f32 are what every kernel uses instead of libm, so
that a board and a host give the same bits. Errors are measured in ULP of the exact result
(float64 numpy stands in for it): |got - exact| / ulp(exact).

Measured maxima, by an exhaustive sweep of every float32 input (exp: every input with a finite
non-zero result; log: every positive finite input; sin/cos: every 0 < x < 2^24, negative x
being exact mirrors, see test_sin_is_odd_and_cos_even): exp 0.977 ULP, log 0.840 ULP,
sin 0.801 ULP, cos 0.799 ULP. No result is more than 1 ULP (as an integer distance) from the
correctly rounded one. The samples below cover the same ranges plus every binade up to FLT_MAX
for sin/cos, and assert < 1 ULP.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.compute._native import ffi, lib

RNG_SEED = 20240607
MAX_ULP = 1.0
QNAN = 0x7FC00000
F32_MAX = float(np.finfo(np.float32).max)


def f32(bits: int | list[int] | np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def bits(x: float | np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def c_exp(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    lib.exp_f32_n(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", x), x.size)
    return out


def c_log(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    lib.log_f32_n(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", x), x.size)
    return out


def c_sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    s, c = np.empty_like(x), np.empty_like(x)
    lib.sincos_f32_n(ffi.from_buffer("float[]", s), ffi.from_buffer("float[]", c),
                     ffi.from_buffer("float[]", x), x.size)
    return s, c


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in ULP of exact at binary32 precision (subnormal ULP below 2^-126)."""
    _, e = np.frexp(exact)  # exact = m * 2^e, 0.5 <= |m| < 1
    ulp = np.ldexp(1.0, np.maximum(e - 1, -126) - 23)
    return np.abs(got.astype(np.float64) - exact) / ulp


def assert_within_ulp(name: str, x: np.ndarray, got: np.ndarray, exact: np.ndarray) -> float:
    """Max ULP error <= MAX_ULP, and no result more than one step from the rounded exact value."""
    assert np.isfinite(got).all(), f"{name}: non-finite result for finite exact values"
    err = ulp_error(got, exact)
    worst = int(np.argmax(err))
    assert err[worst] <= MAX_ULP, f"{name}({x[worst]!r}) = {got[worst]!r}, exact {exact[worst]!r}: {err[worst]:.3f} ULP"
    rounded = exact.astype(np.float32)
    steps = np.abs(got.view(np.int32).astype(np.int64) - rounded.view(np.int32).astype(np.int64))
    assert steps.max() <= 1, f"{name}: a result {steps.max()} steps from the rounded exact value"
    return float(err[worst])


def random_bits(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return f32(rng.integers(lo, hi, size=n, dtype=np.uint64).astype(np.uint32))


# ---------------------------------------------------------------- exp


def test_exp_dense_grid_and_random_inputs() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([
        np.linspace(-103.97, 88.72, 2_000_001, dtype=np.float32),
        np.linspace(-1.0, 1.0, 200_001, dtype=np.float32),
        random_bits(rng, 0x33000000, 0x42B17218, 500_000),  # 2^-25 <= x <= 88.72
        -random_bits(rng, 0x33000000, 0x42CFF1B5, 500_000),  # down to -103.97 (subnormal results)
        rng.uniform(-30, 0, 200_000).astype(np.float32),  # what softmax and silu see most
    ])
    with np.errstate(under="ignore"):
        exact = np.exp(x.astype(np.float64))
    keep = exact >= 2.0**-149  # below that the result is 0 or the smallest subnormal
    assert_within_ulp("exp_f32", x[keep], c_exp(x[keep]), exact[keep])


def test_exp_subnormal_results_are_rounded_once() -> None:
    x = np.linspace(-103.9, -87.34, 100_001, dtype=np.float32)
    got = c_exp(x)
    exact = np.exp(x.astype(np.float64))
    assert (got < np.float32(2.0**-126)).all() and (got > 0).all()
    assert_within_ulp("exp_f32", x, got, exact)


def test_exp_special_values() -> None:
    cases = {
        0x00000000: 0x3F800000,  # exp(+0) = 1
        0x80000000: 0x3F800000,  # exp(-0) = 1
        0x00000001: 0x3F800000,  # smallest subnormal
        0x80000001: 0x3F800000,
        0x32FFFFFF: 0x3F800000,  # just below 2^-25: exactly 1
        0xB2FFFFFF: 0x3F800000,
        0x7F800000: 0x7F800000,  # +inf
        0xFF800000: 0x00000000,  # -inf gives +0
        0x42B17217: bits(np.exp(np.float64(f32(0x42B17217)))).item(),  # largest finite result
        0x42B17218: 0x7F800000,  # first overflow
        0x7F7FFFFF: 0x7F800000,  # huge
        0xFF7FFFFF: 0x00000000,
        0xC2CFF1B4: 0x00000001,  # exp(-103.97208) = 2^-149 after rounding
        0xC2CFF1B5: 0x00000000,  # first x with exp(x) < 2^-150
    }
    x = f32(list(cases))
    got = c_exp(x)
    assert bits(got).tolist() == list(cases.values())
    assert [bits(lib.exp_f32(float(v))).item() for v in x] == list(cases.values())


def test_nan_is_returned_quiet_with_its_payload() -> None:
    nans = f32([0x7FC00000, 0xFFC00000, 0x7FC12345, 0x7F800001, 0xFF812345])
    quiet = (bits(nans) | 0x00400000).tolist()
    assert bits(c_exp(nans)).tolist() == quiet
    assert bits(c_log(nans)).tolist() == quiet
    s, c = c_sincos(nans)
    assert bits(s).tolist() == quiet and bits(c).tolist() == quiet


# ---------------------------------------------------------------- log


def test_log_dense_grid_and_random_inputs() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([
        random_bits(rng, 1, 0x7F800000, 1_000_000),  # every positive binade, subnormals too
        np.linspace(0.5, 2.0, 1_000_001, dtype=np.float32),  # around 1, where log is small
        np.linspace(1.0, 1e6, 200_001, dtype=np.float32),  # RoPE bases
        f32(np.arange(1, 100_000, dtype=np.uint32)),  # small subnormals
    ])
    exact = np.log(x.astype(np.float64))
    keep = exact != 0
    assert_within_ulp("log_f32", x[keep], c_log(x[keep]), exact[keep])


def test_log_special_values() -> None:
    cases = {
        0x3F800000: 0x00000000,  # log(1) = +0
        0x00000000: 0xFF800000,  # log(+0) = -inf
        0x80000000: 0xFF800000,  # log(-0) = -inf
        0x7F800000: 0x7F800000,  # +inf
        0xFF800000: QNAN,  # -inf
        0xBF800000: QNAN,  # -1
        0x80000001: QNAN,  # negative subnormal
        0x00000001: bits(np.log(np.float64(f32(1)))).item(),  # log(2^-149)
        0x7F7FFFFF: bits(np.log(np.float64(F32_MAX))).item(),
    }
    x = f32(list(cases))
    assert bits(c_log(x)).tolist() == list(cases.values())
    assert [bits(lib.log_f32(float(v))).item() for v in x] == list(cases.values())


# ---------------------------------------------------------------- sin, cos


def check_sincos(x: np.ndarray) -> None:
    s, c = c_sincos(x)
    x64 = x.astype(np.float64)
    assert_within_ulp("sin_f32", x, s, np.sin(x64))
    assert_within_ulp("cos_f32", x, c, np.cos(x64))


def test_sincos_dense_grid() -> None:
    x = np.linspace(-2 * np.pi, 2 * np.pi, 2_000_001, dtype=np.float32)
    check_sincos(x[x != 0])


def test_sincos_rope_angles() -> None:
    """RoPE angles pos * freq for pos < 65536, and float32 inputs next to multiples of pi/2
    (where the reduced argument is smallest, down to 2^-27.8 below 2^17)."""
    rng = np.random.default_rng(RNG_SEED)
    k = np.arange(1, 83_000, dtype=np.float64)
    near = (k * np.pi / 2).astype(np.float32)
    x = np.concatenate([
        rng.uniform(-65536, 65536, 1_000_000).astype(np.float32),
        near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(np.inf)),
        np.float32([252.89378, float.fromhex("0x1.f37c8ap95")]),  # hardest cases below 2^17 and overall
        np.arange(0, 65536, dtype=np.float32) * np.float32(10000.0 ** -0.25),
    ])
    check_sincos(x)


def test_sincos_every_binade() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = random_bits(rng, 0x39800000, 0x7F800000, 1_000_000)  # 2^-12 .. FLT_MAX
    check_sincos(np.concatenate([x, -x]))


def test_sincos_small_and_special_values() -> None:
    tiny = f32([0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x397FFFFF, 0xB97FFFFF])
    s, c = c_sincos(tiny)
    assert bits(s).tolist() == bits(tiny).tolist()  # sin x = x, signed zeros kept
    assert (c == 1.0).all()
    s, c = c_sincos(f32([0x7F800000, 0xFF800000]))
    assert bits(s).tolist() == [QNAN, QNAN] and bits(c).tolist() == [QNAN, QNAN]


def test_sin_cos_sincos_and_arrays_agree() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([random_bits(rng, 0, 0x7F800000, 300), -random_bits(rng, 0, 0x7F800000, 300)])
    s, c = c_sincos(x)
    assert [bits(lib.sin_f32(float(v))).item() for v in x] == bits(s).tolist()
    assert [bits(lib.cos_f32(float(v))).item() for v in x] == bits(c).tolist()
    ps, pc = ffi.new("float *"), ffi.new("float *")
    for v, sv, cv in zip(x[:50], s[:50], c[:50], strict=True):
        lib.sincos_f32(float(v), ps, pc)
        assert bits(ps[0]) == bits(sv) and bits(pc[0]) == bits(cv)
    e = c_exp(x)
    assert [bits(lib.exp_f32(float(v))).item() for v in x] == bits(e).tolist()


def test_sin_is_odd_and_cos_even() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = random_bits(rng, 0, 0x7F800000, 200_000)
    s, c = c_sincos(x)
    sn, cn = c_sincos(-x)
    assert (bits(sn) == (bits(s) ^ 0x80000000)).all()
    assert (bits(cn) == bits(c)).all()


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_property_every_finite_float(v: float) -> None:
    x = np.float32([v])
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        e_exact = np.exp(x64)
        if 2.0**-149 <= e_exact[0] <= F32_MAX:
            assert ulp_error(c_exp(x), e_exact)[0] <= MAX_ULP
        if v > 0:
            l_exact = np.log(x64)
            if l_exact[0] != 0:
                assert ulp_error(c_log(x), l_exact)[0] <= MAX_ULP
    if abs(v) >= 2.0**-12:
        s, c = c_sincos(x)
        assert ulp_error(s, np.sin(x64))[0] <= MAX_ULP
        assert ulp_error(c, np.cos(x64))[0] <= MAX_ULP


@pytest.mark.parametrize("n", [0, 1, 7])
def test_array_functions_allow_aliasing(n: int) -> None:
    x = np.linspace(-3, 3, n, dtype=np.float32)
    want = c_exp(x)
    lib.exp_f32_n(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", x), n)
    assert bits(x).tolist() == bits(want).tolist()
