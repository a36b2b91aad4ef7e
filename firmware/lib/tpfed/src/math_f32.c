// Portable binary32 exp, log, sin and cos (see tpfed_math.h for accuracy and special values).
//
// Every float operation here is a single IEEE operation in round-to-nearest-even, so the bits
// depend only on the order of operations, which C fixes (FLT_EVAL_METHOD 0, no contraction).
// Polynomial coefficients are weighted minimax fits (Lawson's algorithm on dense grids) of the
// functions named next to them, rounded to binary32; the fitting error is far below 1/16 ULP.
#include <stdint.h>
#include <string.h>

#include "tpfed_bits.h"
#include "tpfed_math.h"


#define QNAN_BITS 0x7fc00000u
#define QUIET_BIT 0x00400000u

// ln 2 = LN2_HI + LN2_LO; LN2_HI has 16 significant bits, so k * LN2_HI is exact for |k| < 256.
static const float LN2_HI = 6.93145751953125e-01f; // 0x3f317200
static const float LN2_LO = 1.42860676e-06f;       // 0x35bfbe8e
static const float LOG2E = 1.44269502f;            // 0x3fb8aa3b
// 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer (nearest, ties even)
static const float ROUND_SHIFTER = 12582912.0f;

// exp(r) = 1 + r + r^2 * (E0 + r*E1 + r^2*E2 + r^3*E3 + r^4*E4) on |r| <= ln2/2;
// relative error of the fit 3.3e-9 (2^-28.2)
static const float E0 = 0.49999994f;     // 0x3efffffe
static const float E1 = 0.166665152f;    // 0x3e2aaa45
static const float E2 = 0.041668456f;    // 0x3d2aac8b
static const float E3 = 0.00836941879f;  // 0x3c091fe3
static const float E4 = 0.0013813132f;   // 0x3ab50d2e

// p * 2^k for p in [0.5, 2) (a normal float) and a result below the normal range: the 24-bit
// significand is shifted right with round-to-nearest-even, in integer arithmetic.
static float scale_subnormal(uint32_t pbits, int k)
{
    int e = (int)(pbits >> 23) + k; // biased exponent the result would have, <= 0
    uint32_t mant = (pbits & 0x007fffffu) | 0x00800000u;
    int shift = 1 - e;
    if (shift > 25) {
        return 0.0f;
    }
    uint32_t res = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (res & 1u))) {
        res++; // a carry into bit 23 gives the smallest normal, which is right
    }
    return bits_f32(res);
}

float exp_f32(float x)
{
    uint32_t ux = f32_bits(x);
    uint32_t ax = ux & 0x7fffffffu;
    if (ax >= 0x42b17218u) { // |x| >= 88.72284: overflow, deep underflow, inf or NaN
        if (ax > 0x7f800000u) {
            return bits_f32(ux | QUIET_BIT);
        }
        if (ux < 0x80000000u) {
            return bits_f32(0x7f800000u); // +inf, also for x = +inf
        }
        if (ax >= 0x42cff1b5u) { // x <= -103.97208: below half the smallest subnormal
            return 0.0f;
        }
    } else if (ax < 0x33000000u) { // |x| < 2^-25: exp(x) rounds to 1
        return 1.0f;
    }
    // x = k*ln2 + r, |r| <= ln2/2 (a little more when k*LOG2E rounds the other way)
    float t = x * LOG2E + ROUND_SHIFTER;
    int k = (int)(f32_bits(t) - 0x4b000000u) - 0x400000; // t = 1.5*2^23 + k, |k| <= 150
    float kf = t - ROUND_SHIFTER;
    float r = (x - kf * LN2_HI) - kf * LN2_LO;
    float q = E0 + r * (E1 + r * (E2 + r * (E3 + r * E4)));
    float p = 1.0f + (r + r * r * q); // in [0.7, 1.42]
    uint32_t pb = f32_bits(p);
    int be = (int)(pb >> 23) + k; // biased exponent of p * 2^k
    if (be >= 255) {
        return bits_f32(0x7f800000u);
    }
    if (be <= 0) {
        return scale_subnormal(pb, k);
    }
    return bits_f32(pb + ((uint32_t)k << 23)); // exponent add, exact (k may be negative)
}

// log(1+f) = 2s + s*R(s^2), s = f/(2+f), R(z) = z*(L1 + z*L2 + z^2*L3) on |s| <= 0.1716;
// relative error of the fit 8.7e-10 (2^-30.1)
static const float L1 = 0.666667819f; // 0x3f2aaabe
static const float L2 = 0.399766415f; // 0x3eccae2f
static const float L3 = 0.298979461f; // 0x3e9913d6

float log_f32(float x)
{
    uint32_t ux = f32_bits(x);
    if (ux >= 0x7f800000u) { // negative (or -0), +inf, or NaN
        if ((ux & 0x7fffffffu) > 0x7f800000u) {
            return bits_f32(ux | QUIET_BIT);
        }
        if (ux == 0x7f800000u) {
            return x;
        }
        if (ux == 0x80000000u) {
            return bits_f32(0xff800000u); // log(-0) = -inf
        }
        return bits_f32(QNAN_BITS);
    }
    if (ux == 0) {
        return bits_f32(0xff800000u);
    }
    int k = (int)(ux >> 23) - 127;
    uint32_t mant = ux & 0x007fffffu;
    if (k == -127) { // subnormal: normalise the significand in integer arithmetic
        k = -126;
        while ((mant & 0x00800000u) == 0) {
            mant <<= 1;
            k--;
        }
        mant &= 0x007fffffu;
    }
    // x = 2^k * m with m in [sqrt(2)/2, sqrt(2))
    uint32_t mb = mant | 0x3f800000u;
    if (mb > 0x3fb504f3u) {
        mb -= 0x00800000u;
        k++;
    }
    float f = bits_f32(mb) - 1.0f; // exact
    float s = f / (2.0f + f);
    float z = s * s;
    float rr = z * (L1 + z * (L2 + z * L3));
    float hfsq = 0.5f * f * f;
    float dk = (float)k; // |k| <= 149, exact; dk * LN2_HI is exact too
    return dk * LN2_HI - ((hfsq - (s * (hfsq + rr) + dk * LN2_LO)) - f);
}

// sin(r) = r + r^3 * (S1 + z*S2 + z^2*S3), z = r^2, |r| <= pi/4; relative error 4.1e-9
static const float S1 = -0.166666538f;    // 0xbe2aaaa2
static const float S2 = 0.0083321128f;    // 0x3c08836a
static const float S3 = -0.000195087458f; // 0xb94c9064
// cos(r) = 1 - z/2 + z^2 * (C1 + z*C2 + z^2*C3), |r| <= pi/4; relative error 1.3e-10
static const float C1 = 0.0416666456f;    // 0x3d2aaaa5
static const float C2 = -0.00138872513f;  // 0xbab605e2
static const float C3 = 2.44256807e-05f;  // 0x37cce5c0

// sin(rh + rl) for |rh| <= pi/4 + a little, |rl| <= 2^-23 |rh|
static float sin_kernel(float rh, float rl)
{
    float z = rh * rh;
    float v = z * rh;
    float poly = S1 + z * (S2 + z * S3);
    // sin(rh + rl) = sin(rh) + rl*cos(rh) ~ rh + v*poly + rl*(1 - z/2)
    return rh + (v * poly + (rl - 0.5f * z * rl));
}

// cos(rh + rl), same ranges. r^2 is computed exactly as z + zl (Dekker's product, no FMA).
static float cos_kernel(float rh, float rl)
{
    float z = rh * rh;
    float c = 4097.0f * rh; // Veltkamp split of rh into two 12-bit halves
    float hi = c - (c - rh);
    float lo = rh - hi;
    float zl = ((hi * hi - z) + 2.0f * hi * lo) + lo * lo; // rh*rh = z + zl exactly
    float hz = 0.5f * z;
    float w = 1.0f - hz;
    float poly = z * z * (C1 + z * (C2 + z * C3));
    // cos(rh + rl) ~ 1 - (z + zl)/2 + z^2*poly - rh*rl; (1 - w) - hz is the error of w, exactly
    return w + (((1.0f - w) - hz) + (poly - (0.5f * zl + rh * rl)));
}

// 2/pi in binary, bits 2^-1 .. 2^-288 (only the first 7 words are ever read)
static const uint32_t TWO_OVER_PI[9] = {
    0xa2f9836eu, 0x4e441529u, 0xfc2757d1u, 0xf534ddc0u, 0xdb629599u,
    0x3c439041u, 0xfe5163abu, 0xdebbc561u, 0xb7246e3au,
};
// round(pi/2 * 2^62)
static const uint64_t PIO2_Q62 = 0x6487ed5110b4611aull;

static int clz64(uint64_t v) // v != 0
{
    int n = 0;
    if ((v >> 32) == 0) { n += 32; v <<= 32; }
    if ((v >> 48) == 0) { n += 16; v <<= 16; }
    if ((v >> 56) == 0) { n += 8; v <<= 8; }
    if ((v >> 60) == 0) { n += 4; v <<= 4; }
    if ((v >> 62) == 0) { n += 2; v <<= 2; }
    if ((v >> 63) == 0) { n += 1; }
    return n;
}

// For a finite ax = |x| >= pi/4 (bits without the sign), |x| = q*pi/2 + rh + rl with q mod 4
// returned, |rh + rl| <= pi/4 (up to rounding) and rh + rl = r to about 2^-48 relative.
// Payne-Hanek in integer arithmetic: |x| = m * 2^e with an integer m < 2^24, and
// |x| * 2/pi mod 4 is m times a 96-bit window of the bits of 2/pi (the bits above the window
// contribute multiples of 4, those below it less than 2^-70), kept as a 2.126 fixed-point number.
static int reduce_pio2(uint32_t ax, float *rh, float *rl)
{
    uint32_t m = (ax & 0x007fffffu) | 0x00800000u;
    int e = (int)(ax >> 23) - 150; // -24 .. 104
    int i0 = e - 1 > 1 ? e - 1 : 1; // first bit of 2/pi that matters (bit i weighs 2^-i)
    int frac_bits = i0 + 95 - e;    // of the product below: 94 .. 120
    int wi = (i0 - 1) >> 5, wo = (i0 - 1) & 31;
    uint32_t w0 = TWO_OVER_PI[wi], w1 = TWO_OVER_PI[wi + 1], w2 = TWO_OVER_PI[wi + 2];
    if (wo) {
        w0 = (w0 << wo) | (w1 >> (32 - wo));
        w1 = (w1 << wo) | (w2 >> (32 - wo));
        w2 = (w2 << wo) | (TWO_OVER_PI[wi + 3] >> (32 - wo));
    }
    // p = m * w, 120 bits in p0 (top) .. p3
    uint64_t t = (uint64_t)m * w2;
    uint32_t p3 = (uint32_t)t;
    t = (uint64_t)m * w1 + (t >> 32);
    uint32_t p2 = (uint32_t)t;
    t = (uint64_t)m * w0 + (t >> 32);
    uint32_t p1 = (uint32_t)t;
    uint32_t p0 = (uint32_t)(t >> 32);
    // y = p << (126 - frac_bits) mod 2^128: 2 integer bits (the quadrant), 126 fraction bits
    int sh = 126 - frac_bits; // 6 .. 32
    uint32_t y0, y1, y2, y3;
    if (sh == 32) {
        y0 = p1; y1 = p2; y2 = p3; y3 = 0;
    } else {
        y0 = (p0 << sh) | (p1 >> (32 - sh));
        y1 = (p1 << sh) | (p2 >> (32 - sh));
        y2 = (p2 << sh) | (p3 >> (32 - sh));
        y3 = p3 << sh;
    }
    int q = (int)(y0 >> 30);
    uint64_t hi = ((uint64_t)(y0 & 0x3fffffffu) << 32) | y1; // fraction, bits 2^-1 at bit 61
    uint64_t lo = ((uint64_t)y2 << 32) | y3;
    int neg = 0;
    if (hi & (1ull << 61)) { // fraction >= 1/2: round the quadrant up, fraction - 1 < 0
        q++;
        neg = 1;
        lo = ~lo + 1u; // 2^126 - fraction
        hi = (~hi + (lo == 0 ? 1u : 0u)) & ((1ull << 62) - 1u);
    }
    // normalise |fraction| = (hi:lo) * 2^-126 to mh * 2^(-62 - z), top bit of mh at bit 63
    int z;
    uint64_t mh;
    if (hi != 0) {
        z = clz64(hi);
        mh = z ? (hi << z) | (lo >> (64 - z)) : hi;
    } else if (lo != 0) {
        z = clz64(lo);
        mh = lo << z;
        z += 64;
    } else { // cannot happen for a float (pi is irrational); r = 0
        *rh = 0.0f;
        *rl = 0.0f;
        return q & 3;
    }
    // r = |fraction| * pi/2 = mh * PIO2_Q62 * 2^(-124 - z): 128-bit product from 32-bit halves
    uint64_t ml = mh & 0xffffffffu, mu = mh >> 32;
    uint64_t cl = PIO2_Q62 & 0xffffffffu, cu = PIO2_Q62 >> 32;
    uint64_t t0 = ml * cl, t1 = mu * cl, t2 = ml * cu, t3 = mu * cu;
    uint64_t mid = (t0 >> 32) + (t1 & 0xffffffffu) + (t2 & 0xffffffffu);
    uint64_t ph = t3 + (t1 >> 32) + (t2 >> 32) + (mid >> 32); // in [2^61, 2^63)
    uint64_t pl = (mid << 32) | (t0 & 0xffffffffu);
    int n = (ph >> 62) ? 1 : 2;
    uint64_t hn = (ph << n) | (pl >> (64 - n)); // r = hn * 2^ex, top bit at 63
    int ex = -60 - n - z;
    // rh: the top 24 bits, rl: the next 24 (|r| >= 2^-40 for every float, so both are normal)
    uint32_t sign = neg ? 0x80000000u : 0u;
    *rh = bits_f32(sign | ((uint32_t)(ex + 190) << 23) | ((uint32_t)(hn >> 40) & 0x007fffffu));
    float low = (float)(uint32_t)((hn >> 16) & 0x00ffffffu); // exact: < 2^24
    *rl = bits_f32(sign | f32_bits(low * bits_f32((uint32_t)(ex + 16 + 127) << 23)));
    return q & 3;
}

// sin and cos of x (|x| >= 2^-12, finite) from one reduction
static void sincos_reduced(float x, float *s, float *c)
{
    uint32_t ux = f32_bits(x);
    uint32_t ax = ux & 0x7fffffffu;
    float rh, rl;
    int q;
    if (ax < 0x3f490fdbu) { // |x| < pi/4
        rh = x;
        rl = 0.0f;
        q = 0;
    } else {
        q = reduce_pio2(ax, &rh, &rl); // of |x|
    }
    float sr = sin_kernel(rh, rl);
    float cr = cos_kernel(rh, rl);
    float sv, cv;
    switch (q) {
    case 0: sv = sr; cv = cr; break;
    case 1: sv = cr; cv = -sr; break;
    case 2: sv = -sr; cv = -cr; break;
    default: sv = -cr; cv = sr; break;
    }
    if (ax >= 0x3f490fdbu && (ux >> 31)) {
        sv = -sv; // sin(-x) = -sin(x); cos is even
    }
    *s = sv;
    *c = cv;
}

void sincos_f32(float x, float *s, float *c)
{
    uint32_t ux = f32_bits(x);
    uint32_t ax = ux & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        float nan = bits_f32(ax > 0x7f800000u ? (ux | QUIET_BIT) : QNAN_BITS);
        *s = nan;
        *c = nan;
        return;
    }
    if (ax < 0x39800000u) { // |x| < 2^-12: sin x rounds to x, cos x to 1
        *s = x;
        *c = 1.0f;
        return;
    }
    sincos_reduced(x, s, c);
}

float sin_f32(float x)
{
    float s, c;
    sincos_f32(x, &s, &c);
    return s;
}

float cos_f32(float x)
{
    float s, c;
    sincos_f32(x, &s, &c);
    return c;
}

void exp_f32_n(float *out, const float *x, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = exp_f32(x[i]);
    }
}

void log_f32_n(float *out, const float *x, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = log_f32(x[i]);
    }
}

void sincos_f32_n(float *s, float *c, const float *x, int n)
{
    for (int i = 0; i < n; i++) {
        sincos_f32(x[i], &s[i], &c[i]);
    }
}

// tanh: odd; |x| < 2^-12 gives x; |x| < 0.25 an odd Taylor polynomial (to x^11, truncation
// below 1e-10 relative); up to 9.01 (1 - e) / (1 + e) with e = exp_f32(-2|x|); beyond, +-1.
float tanh_f32(float x)
{
    uint32_t ux = f32_bits(x);
    uint32_t ax = ux & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return bits_f32(ux | QUIET_BIT);
    }
    uint32_t sign = ux & 0x80000000u;
    if (ax < 0x39800000u) { // |x| < 2^-12 (subnormals included): tanh(x) rounds to x
        return x;
    }
    float a = bits_f32(ax);
    float r;
    if (ax < 0x3e800000u) { // |x| < 0.25
        float z = a * a;
        float p = -0.333333333f + z * (0.133333333f + z * (-0.0539682540f +
                  z * (0.0218694885f + z * -0.00886323553f)));
        r = a + a * (z * p);
    } else if (ax < 0x41102000u) { // |x| < 9.0078125
        float e = exp_f32(-2.0f * a);
        r = (1.0f - e) / (1.0f + e);
    } else {
        r = 1.0f;
    }
    return bits_f32(f32_bits(r) | sign);
}

// erfc for x >= 0: Numerical Recipes' erfcc (Chebyshev fit, fractional error < 1.2e-7 before
// rounding), t = 1 / (1 + x/2), erfc = t * exp(-x^2 + P(t)); x < 0 as 2 - erfc(-x).
float erfc_f32(float x)
{
    uint32_t ux = f32_bits(x);
    if ((ux & 0x7fffffffu) > 0x7f800000u) {
        return bits_f32(ux | QUIET_BIT);
    }
    float a = bits_f32(ux & 0x7fffffffu);
    float r;
    if (a >= 10.5f) {
        r = 0.0f; // erfc(10.5) < 2^-160: below every float
    } else {
        float t = 1.0f / (1.0f + 0.5f * a);
        float p = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f +
                  t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f +
                  t * (-0.82215223f + t * 0.17087277f))))))));
        r = t * exp_f32(-a * a + p);
    }
    return (ux & 0x80000000u) ? 2.0f - r : r;
}

float erf_f32(float x)
{
    return 1.0f - erfc_f32(x);
}
