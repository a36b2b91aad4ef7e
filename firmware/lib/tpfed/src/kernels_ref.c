// Reference kernels: the plain C99 definition of every kernel in tpfed_kernels.h and the oracle
// the optimised variants (kernels.c) are tested against. Also the variant boards run.
// No heap, no VLAs; every loop is written in the order the numerics are specified in.
// Transcendentals come from tpfed_math.h (exp_f32, log_f32, sincos_f32), never from the C
// library, so that every target computes the same bits; the libm functions still used (fabsf,
// roundf, sqrtf) are exact or correctly rounded by IEEE 754 on every target.
#include <math.h>
#include <string.h>

#include "tpfed_kernels.h"
#include "tpfed_bits.h"
#include "tpfed_math.h"


// Exact: every binary16 value (subnormals, infinities, NaN payloads included) is a binary32 value.
float fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) {
        return bits_f32(sign | 0x7f800000u | (mant << 13)); // inf, or NaN with its payload
    }
    if (exp != 0) {
        return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
    }
    if (mant == 0) {
        return bits_f32(sign);
    }
    // subnormal half: mant * 2^-24, renormalised so that bit 10 is the implicit one
    uint32_t e = 113u;
    while ((mant & 0x400u) == 0) {
        mant <<= 1;
        e--;
    }
    return bits_f32(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// Round to nearest, ties to even; the same bits as numpy's float32 -> float16 cast:
// overflow gives inf, NaN keeps the top of its payload (forced non-zero so it stays NaN).
uint16_t f32_to_fp16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t exp = u & 0x7f800000u;
    uint32_t mant = u & 0x007fffffu;

    if (exp >= 0x47800000u) { // |f| >= 65536, inf or NaN
        if (exp == 0x7f800000u && mant != 0) {
            uint16_t nan = (uint16_t)(0x7c00u + (mant >> 13));
            if (nan == 0x7c00u) {
                nan++;
            }
            return (uint16_t)(sign + nan);
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (exp <= 0x38000000u) { // |f| < 2^-14: half subnormal or zero
        if (exp < 0x33000000u) { // below half of the smallest subnormal
            return sign;
        }
        uint32_t e = exp >> 23;
        uint32_t sig = 0x00800000u + mant;
        uint32_t shifted = sig >> (113u - e);
        // ties to even, looking at the bits the shift dropped as well
        if ((shifted & 0x3fffu) != 0x1000u || (mant & 0x7ffu) != 0) {
            shifted += 0x1000u;
        }
        return (uint16_t)(sign + (shifted >> 13)); // a carry into the exponent is correct
    }
    uint32_t h = (exp - 0x38000000u) >> 13;
    if ((mant & 0x3fffu) != 0x1000u) {
        mant += 0x1000u;
    }
    return (uint16_t)(sign + ((h + (mant >> 13)) & 0xffffu)); // carry may reach inf: correct
}

void f32_to_fp16_n(uint16_t *out, const float *x, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = f32_to_fp16(x[i]);
    }
}

void fp16_to_f32_n(float *out, const uint16_t *h, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = fp16_to_f32(h[i]);
    }
}

// roundf (half away from zero) saturated to the int8 range used by Q8_0; NaN gives 0.
// Finite inputs never reach the clamp: |x * id| <= 127 up to one rounding.
static int8_t q8_round(float v)
{
    float r = roundf(v);
    if (r != r) {
        return 0;
    }
    if (r > 127.0f) {
        return 127;
    }
    if (r < -127.0f) {
        return -127;
    }
    return (int8_t)r;
}

void quantize_q8_0_ref(int8_t *qs, uint16_t *d, const float *x, int n)
{
    for (int b = 0; b * TPFED_Q8_BLOCK < n; b++) {
        int start = b * TPFED_Q8_BLOCK;
        int len = n - start < TPFED_Q8_BLOCK ? n - start : TPFED_Q8_BLOCK;
        float amax = 0.0f; // NaN never compares greater, so it is ignored here
        for (int j = 0; j < len; j++) {
            float a = fabsf(x[start + j]);
            if (a > amax) {
                amax = a;
            }
        }
        float dd = amax / 127.0f;
        float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        for (int j = 0; j < len; j++) {
            qs[start + j] = q8_round(x[start + j] * id);
        }
        d[b] = f32_to_fp16(dd);
    }
}

void dequantize_q8_0(float *x, const int8_t *qs, const uint16_t *d, int n)
{
    for (int i = 0; i < n; i++) {
        x[i] = fp16_to_f32(d[i / TPFED_Q8_BLOCK]) * (float)qs[i];
    }
}

void matmul_q8_0_f32_ref(float *out, const int8_t *wqs, const uint16_t *wd,
                         const int8_t *xqs, const uint16_t *xd, int rows, int cols)
{
    int nb = (cols + TPFED_Q8_BLOCK - 1) / TPFED_Q8_BLOCK;
    for (int r = 0; r < rows; r++) {
        const int8_t *w = wqs + (size_t)r * (size_t)cols; // row r: (cols,)
        const uint16_t *s = wd + (size_t)r * (size_t)nb;  // row r scales: (nb,)
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            int start = b * TPFED_Q8_BLOCK;
            int end = cols - start < TPFED_Q8_BLOCK ? cols : start + TPFED_Q8_BLOCK;
            int32_t isum = 0;
            for (int j = start; j < end; j++) {
                isum += (int32_t)w[j] * (int32_t)xqs[j];
            }
            acc += (float)isum * (fp16_to_f32(s[b]) * fp16_to_f32(xd[b]));
        }
        out[r] = acc;
    }
}

void rmsnorm_f32(float *o, const float *x, const float *w, int n, float eps)
{
    float ss = 0.0f;
    for (int j = 0; j < n; j++) {
        ss += x[j] * x[j];
    }
    ss /= (float)n;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < n; j++) {
        o[j] = w[j] * (ss * x[j]);
    }
}

void softmax_f32(float *x, int n)
{
    if (n <= 0) {
        return;
    }
    float max = x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] > max) {
            max = x[i];
        }
    }
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = exp_f32(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) {
        x[i] /= sum;
    }
}

void rope_f32(float *x, int n, int head_size, int pos, float theta_base)
{
    float log_theta = log_f32(theta_base);
    for (int i = 0; i + 1 < n; i += 2) {
        int j = i % head_size;
        // theta_base^(-j/head_size); x^0 = 1 for every theta_base, as pow has it
        float freq = j == 0 ? 1.0f : exp_f32(-((float)j / (float)head_size) * log_theta);
        float val = (float)pos * freq;
        float fcr, fci;
        sincos_f32(val, &fci, &fcr);
        float v0 = x[i];
        float v1 = x[i + 1];
        x[i] = v0 * fcr - v1 * fci;
        x[i + 1] = v0 * fci + v1 * fcr;
    }
}

void silu_f32(float *x, int n)
{
    for (int i = 0; i < n; i++) {
        x[i] = x[i] * (1.0f / (1.0f + exp_f32(-x[i])));
    }
}

void swiglu_f32(float *out, const float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g * (1.0f / (1.0f + exp_f32(-g))) * up[i];
    }
}

void attention_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                   int n_q, int head_size, int pos, int kv_stride, float *scratch)
{
    float scale = sqrtf((float)head_size);
    for (int h = 0; h < n_q; h++) {
        const float *qh = q + (size_t)h * (size_t)head_size; // (head_size,)
        float *oh = out + (size_t)h * (size_t)head_size;     // (head_size,)
        for (int t = 0; t <= pos; t++) {
            const float *k = k_cache + (size_t)t * (size_t)kv_stride; // (head_size,)
            float score = 0.0f;
            for (int i = 0; i < head_size; i++) {
                score += qh[i] * k[i];
            }
            scratch[t] = score / scale;
        }
        softmax_f32(scratch, pos + 1);
        for (int i = 0; i < head_size; i++) {
            oh[i] = 0.0f;
        }
        for (int t = 0; t <= pos; t++) {
            const float *v = v_cache + (size_t)t * (size_t)kv_stride; // (head_size,)
            float a = scratch[t];
            for (int i = 0; i < head_size; i++) {
                oh[i] += a * v[i];
            }
        }
    }
}

void layernorm_f32(float *o, const float *x, const float *w, const float *b, int n, float eps)
{
    float mean = 0.0f;
    for (int j = 0; j < n; j++) {
        mean += x[j];
    }
    mean /= (float)n;
    float var = 0.0f;
    for (int j = 0; j < n; j++) {
        float d = x[j] - mean;
        var += d * d;
    }
    var /= (float)n;
    float inv = 1.0f / sqrtf(var + eps);
    for (int j = 0; j < n; j++) {
        float v = (x[j] - mean) * inv * w[j];
        o[j] = b != 0 ? v + b[j] : v;
    }
}

void gelu_tanh_f32(float *x, int n)
{
    const float c = 0.797884561f; // sqrt(2/pi)
    for (int i = 0; i < n; i++) {
        float v = x[i];
        float u = c * (v + 0.044715f * v * v * v);
        x[i] = 0.5f * v * (1.0f + tanh_f32(u));
    }
}

void gelu_f32(float *x, int n)
{
    const float r = 0.707106781f; // 1/sqrt(2)
    for (int i = 0; i < n; i++) {
        float v = x[i];
        float z = v * r;
        // 1 + erf(z) = 2 - erfc(z) = erfc(-z): the form without cancellation for z < 0
        float s = z >= 0.0f ? 2.0f - erfc_f32(z) : erfc_f32(-z);
        x[i] = 0.5f * v * s;
    }
}

void act_f32(float *x, int n, int act)
{
    if (act == TPFED_ACT_GELU_TANH) {
        gelu_tanh_f32(x, n);
    } else if (act == TPFED_ACT_GELU) {
        gelu_f32(x, n);
    } else {
        silu_f32(x, n);
    }
}

void rope_freqs_f32(float *freq, int head_size, float theta_base)
{
    float log_theta = log_f32(theta_base);
    for (int j = 0; j + 1 < head_size; j += 2) {
        freq[j / 2] = j == 0 ? 1.0f : exp_f32(-((float)j / (float)head_size) * log_theta);
    }
}

void rope_table_f32(float *x, int n, int head_size, int pos, const float *freq)
{
    for (int i = 0; i + 1 < n; i += 2) {
        int j = i % head_size;
        float val = (float)pos * freq[j / 2];
        float fcr, fci;
        sincos_f32(val, &fci, &fcr);
        float v0 = x[i];
        float v1 = x[i + 1];
        x[i] = v0 * fcr - v1 * fci;
        x[i + 1] = v0 * fci + v1 * fcr;
    }
}

void attention_span_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                        int n_q, int head_size, int first, int last, int kv_stride, float *scratch)
{
    float scale = sqrtf((float)head_size);
    int len = last - first + 1;
    for (int h = 0; h < n_q; h++) {
        const float *qh = q + (size_t)h * (size_t)head_size;
        float *oh = out + (size_t)h * (size_t)head_size;
        for (int t = 0; t < len; t++) {
            const float *k = k_cache + (size_t)(first + t) * (size_t)kv_stride;
            float score = 0.0f;
            for (int i = 0; i < head_size; i++) {
                score += qh[i] * k[i];
            }
            scratch[t] = score / scale;
        }
        softmax_f32(scratch, len);
        for (int i = 0; i < head_size; i++) {
            oh[i] = 0.0f;
        }
        for (int t = 0; t < len; t++) {
            const float *v = v_cache + (size_t)(first + t) * (size_t)kv_stride;
            float a = scratch[t];
            for (int i = 0; i < head_size; i++) {
                oh[i] += a * v[i];
            }
        }
    }
}

void add_f32(float *x, const float *b, int n)
{
    for (int i = 0; i < n; i++) {
        x[i] += b[i];
    }
}

static float f16ish_to_f32(uint16_t h, int bf16)
{
    return bf16 ? bits_f32((uint32_t)h << 16) : fp16_to_f32(h);
}

void quantize_16_q8_0_ref(int8_t *qs, uint16_t *d, const uint16_t *x, int n, int bf16)
{
    float buf[TPFED_Q8_BLOCK];
    for (int start = 0; start < n; start += TPFED_Q8_BLOCK) {
        int len = n - start < TPFED_Q8_BLOCK ? n - start : TPFED_Q8_BLOCK;
        for (int j = 0; j < len; j++) {
            buf[j] = f16ish_to_f32(x[start + j], bf16);
        }
        quantize_q8_0_ref(qs + start, d + start / TPFED_Q8_BLOCK, buf, len);
    }
}

void quantize_16_q8_0(int8_t *qs, uint16_t *d, const uint16_t *x, int n, int bf16)
{
    float buf[32 * TPFED_Q8_BLOCK];
    for (int start = 0; start < n; start += 32 * TPFED_Q8_BLOCK) {
        int len = n - start < 32 * TPFED_Q8_BLOCK ? n - start : 32 * TPFED_Q8_BLOCK;
        for (int j = 0; j < len; j++) {
            buf[j] = f16ish_to_f32(x[start + j], bf16);
        }
        quantize_q8_0(qs + start, d + start / TPFED_Q8_BLOCK, buf, len);
    }
}

int all_finite_16(const uint16_t *x, size_t n, int bf16)
{
    uint16_t mask = bf16 ? 0x7f80u : 0x7c00u;
    for (size_t i = 0; i < n; i++) {
        if ((x[i] & mask) == mask) {
            return 0;
        }
    }
    return 1;
}
