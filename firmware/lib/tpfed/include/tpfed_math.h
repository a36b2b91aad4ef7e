// tpfed portable single-precision math: exp, log, sin and cos that give the same bits on every
// target (x86-64 hosts, soft-float Cortex-M, ESP32), unlike each C library's expf/sinf/...
//
// They are written with float +, -, *, / and integer bit manipulation only: no libm, no double,
// no fused multiply-add (the library is compiled with -ffp-contract=off; every float operation
// is one IEEE binary32 operation rounded to nearest even, which all targets implement alike).
// No float operation inside them takes or produces a subnormal (tiny arguments return early,
// subnormal results and inputs are handled with integer code), so flush-to-zero hardware gives
// the same bits as well.
//
// Accuracy in ULP of the exact result, measured by an exhaustive sweep of float32 inputs against
// float64 numpy (tests/unit/test_math.py repeats it on dense grids and random samples and asserts
// < 1 ULP); no result is more than one step from the correctly rounded one:
//   exp_f32   max 0.977 ULP, every input with a non-zero finite result (subnormals included)
//   log_f32   max 0.840 ULP, every positive finite input (subnormals included)
//   sin_f32   max 0.801 ULP, cos_f32 max 0.799 ULP, every |x| < 2^24 (RoPE angles pos * freq
//             for pos < 65536 are far inside), and < 1 ULP on samples of every binade up to
//             FLT_MAX: the argument is reduced by pi/2 exactly (integer Payne-Hanek with a
//             224-bit 2/pi), so accuracy does not degrade near multiples of pi/2 or for huge x
// Special values:
//   exp_f32(+-0) = 1, exp_f32(+inf) = +inf, exp_f32(-inf) = +0; x > 88.7228317 (0x42b17217)
//     overflows to +inf; results below 2^-126 are subnormal, rounded from the 24-bit result with
//     integer code; x <= -103.972084 (0xc2cff1b5) gives +0; |x| < 2^-25 gives exactly 1.
//   log_f32(+-0) = -inf, log_f32(1) = +0, log_f32(+inf) = +inf, log_f32(x < 0) = NaN
//     (0x7fc00000), log_f32(-inf) = NaN (0x7fc00000).
//   sin_f32(+-0) = +-0 (and sin_f32(x) = x for |x| < 2^-12, subnormals included);
//   cos_f32(+-0) = 1 (and 1 for every |x| < 2^-12); sin/cos of +-inf = NaN (0x7fc00000).
//   A NaN argument is returned as is, with its quiet bit set, by every function.
#ifndef TPFED_MATH_H
#define TPFED_MATH_H

// cffi:begin
float exp_f32(float x);
float log_f32(float x);
float sin_f32(float x);
float cos_f32(float x);
// *s = sin_f32(x), *c = cos_f32(x), with one argument reduction
void sincos_f32(float x, float *s, float *c);
// tanh (odd, +-1 beyond 9.0078125; relative error a few ULP: for GELU and its references) and
// erfc / erf (absolute error below 4e-7; relative error of erfc below 5e-7 for 0 <= x < 1 and
// 5e-6 beyond, where the float32 rounding of x*x dominates), made
// of exp_f32 and the four basic operations: the same bits on every target.
float tanh_f32(float x);
float erfc_f32(float x);
float erf_f32(float x);

// Element-wise over arrays (out may alias x); the same bits as the scalar functions.
void exp_f32_n(float *out, const float *x, int n);
void log_f32_n(float *out, const float *x, int n);
void sincos_f32_n(float *s, float *c, const float *x, int n);
// cffi:end

#endif
