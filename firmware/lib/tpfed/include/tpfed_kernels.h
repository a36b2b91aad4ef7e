// tpfed int8 kernels: Q8_0 quantisation, matrix-vector product, norms and attention.
// Portable C99, no heap: the caller owns every buffer, including scratch.
//
// Q8_0 layout (struct of arrays, so that numpy views map onto it without copies):
//   a vector of n floats becomes qs[n] (int8) and d[nb] (IEEE binary16 scales, stored as
//   uint16_t), nb = (n + 31) / 32. Block b covers x[32b .. min(32b+32, n)); the last block may
//   be short. x[i] ~= fp16_to_f32(d[i/32]) * qs[i].
//   A matrix of rows x cols is rows such vectors: qs[rows][cols], d[rows][nb(cols)].
//
// Variants: name_ref is the plain reference and the oracle; name is the variant selected for
// this build (an optimised one on hosts with SIMD, the reference otherwise). Integer outputs
// of every variant are bit-exact with the reference; matmul's float output is bit-exact too
// (blocks are accumulated in the same order).
//
// Every kernel gives the same bits on every target (x86-64 hosts, soft-float Cortex-M, ESP32):
// float work is plain IEEE binary32 arithmetic in a fixed order (compiled with
// -ffp-contract=off), sqrtf is correctly rounded everywhere, and exp, log, sin and cos come from
// tpfed_math.h (exp_f32, log_f32, sincos_f32) rather than the C library, whose results differ
// between libms by a few ULP.
#ifndef TPFED_KERNELS_H
#define TPFED_KERNELS_H

#include <stddef.h>
#include <stdint.h>

// TPFED_Q8_BLOCK, the values per Q8_0 scale: defined once, in shared_protocol/schema.py (Q8_BLOCK),
// generated into tpfed_proto.h; the host reads it back as tpfed.compute.kernels.Q8_BLOCK.
#include "tpfed_proto.h"

// cffi:begin

// Scales are IEEE binary16 rather than float: they are 1/16 of a Q8_0 block's bytes instead of
// 1/8, which matters in board RAM and on the wire, and fp16 keeps 11 significant bits, far more
// than an int8 block needs. No fp16 hardware is required: both conversions are integer bit
// manipulation. fp16_to_f32 is exact; f32_to_fp16 rounds to nearest even and gives the same
// bits as numpy's float32 -> float16 cast (subnormals, overflow to inf, NaN payloads).
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);
// Element-wise over arrays (bit-exact, also for NaN payloads that a float return may not keep).
void fp16_to_f32_n(float *out, const uint16_t *h, int n);
void f32_to_fp16_n(uint16_t *out, const float *x, int n);

// d = amax(block)/127 (f32), id = d ? 1/d : 0, qs = round-half-away(x*id), scale stored fp16(d).
// amax ignores NaN. The rounded value is saturated to [-127, 127] and NaN gives 0; finite inputs
// never saturate except when 1/d overflows (amax < ~3.7e-37), so -128 is never produced.
void quantize_q8_0_ref(int8_t *qs, uint16_t *d, const float *x, int n);
void quantize_q8_0(int8_t *qs, uint16_t *d, const float *x, int n);
void dequantize_q8_0(float *x, const int8_t *qs, const uint16_t *d, int n);

// out[r] = sum over blocks b of (float)isum(r,b) * (fp16_to_f32(wd[r][b]) * fp16_to_f32(xd[b]))
// where isum is the int32 dot product of the block's int8 values; blocks in ascending order.
void matmul_q8_0_f32_ref(float *out, const int8_t *wqs, const uint16_t *wd,
                         const int8_t *xqs, const uint16_t *xd, int rows, int cols);
void matmul_q8_0_f32(float *out, const int8_t *wqs, const uint16_t *wd,
                     const int8_t *xqs, const uint16_t *xd, int rows, int cols);

// o = x / sqrt(mean(x^2) + eps) * w   (o may alias x)
void rmsnorm_f32(float *o, const float *x, const float *w, int n, float eps);
// in place, numerically stable (max subtracted)
void softmax_f32(float *x, int n);
// llama2.c RoPE on interleaved pairs: for i even, j = i % head_size,
// theta = pos * theta_base^(-j/head_size); (x[i], x[i+1]) rotated by theta. n % head_size == 0.
// The power is exp_f32(-((float)j / head_size) * log_f32(theta_base)), and exactly 1 for j = 0.
void rope_f32(float *x, int n, int head_size, int pos, float theta_base);
// x = x * sigmoid(x), in place
void silu_f32(float *x, int n);
// out = silu(gate) * up   (out may alias gate or up)
void swiglu_f32(float *out, const float *gate, const float *up, int n);

// Attention of n_q query heads that share one KV head, at position pos (attends 0..pos).
// q: (n_q, head_size); k_cache, v_cache: (pos+1 rows used, row stride kv_stride floats);
// out: (n_q, head_size); scratch: pos+1 floats, caller-owned. Scores are scaled by
// 1/sqrt(head_size).
void attention_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                   int n_q, int head_size, int pos, int kv_stride, float *scratch);

// The kernels below exist once (plain C, they are their own reference, like rmsnorm_f32); their
// transcendentals are tpfed_math.h's, so every target computes the same bits.

// LayerNorm, biased variance as torch: mean = sum(x)/n; var = sum((x-mean)^2)/n;
// o = (x - mean) * (1/sqrtf(var + eps)) * w (+ b when b is not NULL). o may alias x.
void layernorm_f32(float *o, const float *x, const float *w, const float *b, int n, float eps);
// In place: GPT-2's gelu_new 0.5 x (1 + tanh_f32(0.797884561 (x + 0.044715 x^3))), and the
// exact (erf) GELU 0.5 x (1 + erf(x / sqrt 2)), computed as 0.5 x (2 - erfc_f32(z)) for z >= 0
// and 0.5 x erfc_f32(-z) below (z = x * 0.707106781).
void gelu_tanh_f32(float *x, int n);
void gelu_f32(float *x, int n);
// Activation codes (a share's MLP activation; see the host's compute/share.py).
#define TPFED_ACT_SILU 0
#define TPFED_ACT_GELU_TANH 1
#define TPFED_ACT_GELU 2
// In place: silu_f32, gelu_tanh_f32 or gelu_f32 as act says (anything else: silu).
void act_f32(float *x, int n, int act);
// RoPE frequencies freq[j/2] = theta_base^(-j/head_size) for j = 0, 2, ..., computed exactly
// as rope_f32 computes them, so rope_table_f32 with this table gives rope_f32's bits.
void rope_freqs_f32(float *freq, int head_size, float theta_base);
// RoPE from a frequency table (head_size/2 entries; scaled RoPE is a different table): pair
// (x[i], x[i+1]), j = i % head_size, rotated by (float)pos * freq[j/2]. n % head_size == 0.
void rope_table_f32(float *x, int n, int head_size, int pos, const float *freq);
// attention_f32 over cache rows first..last (inclusive) instead of 0..pos; scratch holds
// last-first+1 floats. attention_span_f32(.., 0, pos, ..) gives attention_f32's bits.
void attention_span_f32(float *out, const float *q, const float *k_cache, const float *v_cache,
                        int n_q, int head_size, int first, int last, int kv_stride, float *scratch);
// x[i] += b[i]
void add_f32(float *x, const float *b, int n);

// Q8_0 of n 16-bit floats (bf16 != 0: bfloat16, else IEEE binary16), converted exactly to
// float32 first: the bits of quantize_q8_0 of the converted vector (n a multiple of 32 for
// rows of a matrix). For loading checkpoints without a float32 copy.
void quantize_16_q8_0_ref(int8_t *qs, uint16_t *d, const uint16_t *x, int n, int bf16);
void quantize_16_q8_0(int8_t *qs, uint16_t *d, const uint16_t *x, int n, int bf16);
// 1 if none of the n 16-bit floats is infinite or NaN.
int all_finite_16(const uint16_t *x, size_t n, int bf16);

// Name of the variant matmul_q8_0_f32 runs ("ref", "avx2", "neon", ...), for benchmarks.
const char *tpfed_kernels_variant(void);
// cffi:end

#endif
