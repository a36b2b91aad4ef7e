// Selected kernel variants: matmul_q8_0_f32 and quantize_q8_0.
//
// Variant choice (what tpfed_kernels_variant() reports):
//   "avx2"  x86-64 built with GCC or Clang, and the CPU has AVX2 and F16C at run time. The code is
//           compiled with a per-function target attribute, so a generic x86-64 build still runs
//           on any x86-64 CPU and takes the reference path on one without AVX2.
//   "ref"   everything else (boards, ARM hosts, other compilers), or TPFED_REFERENCE_ONLY defined
//           at build time: the plain kernels of kernels_ref.c.
// There is no NEON variant yet: ARM hosts run the reference.
//
// Every variant gives the same bits as the reference for every input: integer block sums are
// exact in any order, and the float work per row is the reference's sequence of operations
// (same operands, same order), only done for eight rows at once, one row per vector lane.
// NaN outputs are NaN in both, though their payload bits may differ.
//
// The AVX2 int8 dot product. vpmaddubsw (_mm256_maddubs_epi16) multiplies unsigned by signed
// bytes and adds adjacent pairs into int16. Signed x signed is obtained with the sign trick:
// w * x = |w| * (x * sign(w)), i.e. maddubs(abs(w), sign_epi8(x, w)). |w| <= 128 fits a u8; the
// signed side x * sign(w) fits an int8 as long as x has no -128, and then each pair sum is at
// most 2 * 128 * 127 < 32768, so the int16 never saturates. vpmaddwd with ones then adds pairs
// into eight exact int32 partial sums of the block. Quantised activations never contain -128,
// but the ABI allows it: matmul scans x once per call and, if it holds a -128, takes a path that
// sign-extends both operands to int16 (vpmovsxbw) and multiplies with vpmaddwd, exact for every
// int8 (the textbook maddubs(|x|, sign(w, x)) form would be wrong for w = -128 instead).
//
// The eight int32 partials of eight rows are reduced together with hadd (each hadd halves the
// partials of two rows), so one register holds the eight rows' block sums, lane i = row i. The
// scales of a group of eight blocks are converted with F16C, multiplied by the x scales and
// transposed 8x8 so that they too are one row per lane; the float accumulation is then a vector
// mul and add per block, in block order: per lane exactly the reference's arithmetic for that
// row. Large matrices are bound by memory (or last-level cache) bandwidth.
#include <string.h>

#include "tpfed_kernels.h"

#if !defined(TPFED_REFERENCE_ONLY) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TPFED_HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#ifdef TPFED_HAVE_AVX2

#define TPFED_AVX2 __attribute__((target("avx2,f16c")))

static int cpu_has_avx2(void)
{
    // Asked once: CPUID leaves a virtual machine on every call. F16C is ECX bit 29 of leaf 1
    // (clang 14's __builtin_cpu_supports does not know "f16c").
    static int known = -1;
    if (known < 0) {
        unsigned int a, b, c, d;
        known = __get_cpuid(1, &a, &b, &c, &d) && __builtin_cpu_supports("avx2") && ((c >> 29) & 1u);
    }
    return known;
}

// lane i of the result = sum of the eight int32 lanes of p[i]
TPFED_AVX2 static inline __m256i hsum8x8_epi32(const __m256i p[8])
{
    __m256i t0 = _mm256_hadd_epi32(p[0], p[1]);
    __m256i t1 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i t2 = _mm256_hadd_epi32(p[4], p[5]);
    __m256i t3 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i u0 = _mm256_hadd_epi32(t0, t1); // low half: rows 0-3 low lanes, high half: their high lanes
    __m256i u1 = _mm256_hadd_epi32(t2, t3); // same for rows 4-7
    __m256i lo = _mm256_blend_epi32(u0, u1, 0xf0);
    __m256i hi = _mm256_permute2x128_si256(u0, u1, 0x21);
    return _mm256_add_epi32(lo, hi);
}

// in place 8x8 transpose: m[i][j] -> m[j][i]
TPFED_AVX2 static inline void transpose8_ps(__m256 m[8])
{
    __m256 a0 = _mm256_unpacklo_ps(m[0], m[1]);
    __m256 a1 = _mm256_unpackhi_ps(m[0], m[1]);
    __m256 a2 = _mm256_unpacklo_ps(m[2], m[3]);
    __m256 a3 = _mm256_unpackhi_ps(m[2], m[3]);
    __m256 a4 = _mm256_unpacklo_ps(m[4], m[5]);
    __m256 a5 = _mm256_unpackhi_ps(m[4], m[5]);
    __m256 a6 = _mm256_unpacklo_ps(m[6], m[7]);
    __m256 a7 = _mm256_unpackhi_ps(m[6], m[7]);
    __m256 b0 = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 b1 = _mm256_shuffle_ps(a0, a2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 b2 = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 b3 = _mm256_shuffle_ps(a1, a3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 b4 = _mm256_shuffle_ps(a4, a6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 b5 = _mm256_shuffle_ps(a4, a6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 b6 = _mm256_shuffle_ps(a5, a7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 b7 = _mm256_shuffle_ps(a5, a7, _MM_SHUFFLE(3, 2, 3, 2));
    m[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
    m[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
    m[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
    m[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
    m[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
    m[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
    m[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
    m[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}

// int32 sums of four adjacent products w*x, for x without -128 (see the comment at the top).
TPFED_AVX2 static inline __m256i dot32_sign(__m256i w, __m256i x)
{
    __m256i prod16 = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(prod16, _mm256_set1_epi16(1));
}

// Eight rows times a group of eight full blocks starting at block b0 of every pointer
// (w[i]: row i's int8 values, s[i]: row i's scales). Adds the first nblk blocks to acc, in order.
// x_has_m128 selects the exact-for-all-inputs int16 path (constant at every call site).
TPFED_AVX2 static inline __m256 tile8_group8(__m256 acc, const int8_t *const w[8],
                                            const uint16_t *const s[8], const int8_t *x,
                                            const uint16_t *xd, int b0, int nblk, int x_has_m128)
{
    __m256 xs = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xd + b0)));
    __m256 sc[8];
    for (int i = 0; i < 8; i++) {
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s[i] + b0)));
        sc[i] = _mm256_mul_ps(ws, xs); // wd * xd, as the reference
    }
    transpose8_ps(sc); // sc[b] lane i: scale product of row i, block b0 + b
    for (int b = 0; b < nblk; b++) {
        size_t off = (size_t)(b0 + b) * TPFED_Q8_BLOCK;
        __m256i p[8];
        if (x_has_m128) {
            __m256i xlo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + off)));
            __m256i xhi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + off + 16)));
            for (int i = 0; i < 8; i++) {
                __m256i wlo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[i] + off)));
                __m256i whi =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w[i] + off + 16)));
                p[i] = _mm256_add_epi32(_mm256_madd_epi16(wlo, xlo), _mm256_madd_epi16(whi, xhi));
            }
        } else {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + off));
            for (int i = 0; i < 8; i++) {
                p[i] = dot32_sign(_mm256_loadu_si256((const __m256i *)(w[i] + off)), xv);
            }
        }
        __m256 isum = _mm256_cvtepi32_ps(hsum8x8_epi32(p));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(isum, sc[b]));
    }
    return acc;
}

TPFED_AVX2 static int has_m128(const int8_t *x, int n)
{
    __m256i m = _mm256_setzero_si256();
    const __m256i v = _mm256_set1_epi8(-128);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        m = _mm256_or_si256(m, _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(x + i)), v));
    }
    int found = !_mm256_testz_si256(m, m);
    for (; i < n; i++) {
        found |= x[i] == -128;
    }
    return found;
}

TPFED_AVX2 static void matmul_q8_0_f32_avx2(float *out, const int8_t *wqs, const uint16_t *wd,
                                            const int8_t *xqs, const uint16_t *xd, int rows,
                                            int cols)
{
    const int nb = (cols + TPFED_Q8_BLOCK - 1) / TPFED_Q8_BLOCK;
    const int ngroups = cols / (8 * TPFED_Q8_BLOCK); // groups of eight full blocks
    const int bt = ngroups * 8;                    // first block of the tail
    const int tail_cols = cols - bt * TPFED_Q8_BLOCK; // 0 .. 255 values in nb - bt blocks
    const int x_m128 = has_m128(xqs, cols);

    // The tail (up to seven full blocks and a short one) is copied into zero-padded buffers so
    // that it runs through the same code; padding adds 0 to the integer sums and padded blocks
    // are never added to acc.
    int8_t xpad[8 * TPFED_Q8_BLOCK];
    uint16_t xdpad[8];
    int8_t wpad[8][8 * TPFED_Q8_BLOCK];
    uint16_t spad[8][8];
    if (tail_cols > 0) {
        memset(xpad, 0, sizeof xpad);
        memset(xdpad, 0, sizeof xdpad);
        memcpy(xpad, xqs + (size_t)bt * TPFED_Q8_BLOCK, (size_t)tail_cols);
        memcpy(xdpad, xd + bt, (size_t)(nb - bt) * sizeof(uint16_t));
        memset(wpad, 0, sizeof wpad);
        memset(spad, 0, sizeof spad);
    }

    for (int r0 = 0; r0 < rows; r0 += 8) {
        const int nr = rows - r0 < 8 ? rows - r0 : 8;
        const int8_t *w[8];
        const uint16_t *s[8];
        for (int i = 0; i < 8; i++) {
            // rows past the end repeat the last row; their lanes are never stored
            size_t r = (size_t)(r0 + (i < nr ? i : nr - 1));
            w[i] = wqs + r * (size_t)cols;
            s[i] = wd + r * (size_t)nb;
        }
        __m256 acc = _mm256_setzero_ps();
        for (int g = 0; g < ngroups; g++) {
            acc = x_m128 ? tile8_group8(acc, w, s, xqs, xd, g * 8, 8, 1)
                         : tile8_group8(acc, w, s, xqs, xd, g * 8, 8, 0);
        }
        if (tail_cols > 0) {
            const int8_t *wp[8];
            const uint16_t *sp[8];
            for (int i = 0; i < 8; i++) {
                memcpy(wpad[i], w[i] + (size_t)bt * TPFED_Q8_BLOCK, (size_t)tail_cols);
                memcpy(spad[i], s[i] + bt, (size_t)(nb - bt) * sizeof(uint16_t));
                wp[i] = wpad[i];
                sp[i] = spad[i];
            }
            acc = tile8_group8(acc, wp, sp, xpad, xdpad, 0, nb - bt, x_m128);
        }
        if (nr == 8) {
            _mm256_storeu_ps(out + r0, acc);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc);
            memcpy(out + r0, tmp, (size_t)nr * sizeof(float));
        }
    }
}

// Same operations as quantize_q8_0_ref, eight floats per instruction. roundf (half away from
// zero) is trunc(v) + copysign(1, v) when |v - trunc(v)| >= 0.5; v - trunc(v) is exact.
TPFED_AVX2 static void quantize_q8_0_avx2(int8_t *qs, uint16_t *d, const float *x, int n)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 lim = _mm256_set1_ps(127.0f);
    const __m256 nlim = _mm256_set1_ps(-127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b * TPFED_Q8_BLOCK < n; b++) {
        const int start = b * TPFED_Q8_BLOCK;
        const int len = n - start < TPFED_Q8_BLOCK ? n - start : TPFED_Q8_BLOCK;
        const float *src = x + start;
        float pad[TPFED_Q8_BLOCK];
        if (len < TPFED_Q8_BLOCK) {
            memset(pad, 0, sizeof pad); // zeros change neither amax nor the stored values
            memcpy(pad, src, (size_t)len * sizeof(float));
            src = pad;
        }
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(src + 8 * k);
            m = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), m); // NaN in the first operand: m
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 p = _mm256_mul_ps(v[k], vid);
            __m256 t = _mm256_round_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
            __m256 step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
            __m256 r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), step));
            r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q)); // NaN -> 0
            r = _mm256_min_ps(_mm256_max_ps(r, nlim), lim);
            q[k] = _mm256_cvttps_epi32(r);
        }
        __m256i q16a = _mm256_packs_epi32(q[0], q[1]);
        __m256i q16b = _mm256_packs_epi32(q[2], q[3]);
        __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), order);
        if (len == TPFED_Q8_BLOCK) {
            _mm256_storeu_si256((__m256i *)(qs + start), q8);
        } else {
            int8_t tmp[TPFED_Q8_BLOCK];
            _mm256_storeu_si256((__m256i *)tmp, q8);
            memcpy(qs + start, tmp, (size_t)len);
        }
        d[b] = f32_to_fp16(dd);
    }
}

#endif // TPFED_HAVE_AVX2

void matmul_q8_0_f32(float *out, const int8_t *wqs, const uint16_t *wd, const int8_t *xqs,
                     const uint16_t *xd, int rows, int cols)
{
#ifdef TPFED_HAVE_AVX2
    if (cpu_has_avx2()) {
        matmul_q8_0_f32_avx2(out, wqs, wd, xqs, xd, rows, cols);
        return;
    }
#endif
    matmul_q8_0_f32_ref(out, wqs, wd, xqs, xd, rows, cols);
}

void quantize_q8_0(int8_t *qs, uint16_t *d, const float *x, int n)
{
#ifdef TPFED_HAVE_AVX2
    if (cpu_has_avx2()) {
        quantize_q8_0_avx2(qs, d, x, n);
        return;
    }
#endif
    quantize_q8_0_ref(qs, d, x, n);
}

const char *tpfed_kernels_variant(void)
{
#ifdef TPFED_HAVE_AVX2
    if (cpu_has_avx2()) {
        return "avx2";
    }
#endif
    return "ref";
}
