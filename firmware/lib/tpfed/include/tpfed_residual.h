// tpfed coordinator step between two stages: add a stage's summed partial into the residual
// stream, RMS-normalise it with the next stage's norm and quantise it to Q8_0 (the activation
// broadcast to the devices). One call instead of three, so the host's per-stage cost is a
// single foreign call. Portable C99, no heap.
//
// The arithmetic is exactly the kernels' (tpfed_kernels.h): x[i] += partial[i] in index order,
// then rmsnorm_f32(xb, x, w, n, eps), then Q8_0 of xb. So the bits are those of the separate
// calls. Variants: residual_rmsnorm_q8_0_ref uses quantize_q8_0_ref (the oracle);
// residual_rmsnorm_q8_0 uses the selected quantize_q8_0, bit-exact with it.
#ifndef TPFED_RESIDUAL_H
#define TPFED_RESIDUAL_H

#include <stdint.h>

// cffi:begin
// x (n) += partial (n) when partial is not NULL; xb (n) = rmsnorm(x, w, eps) (xb may alias x
// only when the residual is not needed afterwards); qs (n), d (ceil(n/32)) = Q8_0 of xb.
void residual_rmsnorm_q8_0_ref(float *x, const float *partial, const float *w, int n, float eps,
                               float *xb, int8_t *qs, uint16_t *d);
void residual_rmsnorm_q8_0(float *x, const float *partial, const float *w, int n, float eps,
                           float *xb, int8_t *qs, uint16_t *d);

// The same step for every architecture. x += partial + bias (per element, partial[i] + bias[i]
// first; bias may be NULL: then exactly residual_rmsnorm_q8_0's add; nothing when partial is
// NULL). Then xb = norm(x): rmsnorm_f32(w), or layernorm_f32(w, b) when kind has
// TPFED_NORM_LAYER; with w NULL, xb = x (no norm). With TPFED_NORM_POST the normalised value
// also replaces the residual (post-norm: BERT). qs, d = Q8_0 of xb. With kind 0, bias NULL
// and w given, the bits are residual_rmsnorm_q8_0's.
#define TPFED_NORM_LAYER 1
#define TPFED_NORM_POST 2
void residual_norm_q8_0_ref(float *x, const float *partial, const float *bias, const float *w,
                            const float *b, int n, float eps, int kind, float *xb, int8_t *qs,
                            uint16_t *d);
void residual_norm_q8_0(float *x, const float *partial, const float *bias, const float *w,
                        const float *b, int n, float eps, int kind, float *xb, int8_t *qs,
                        uint16_t *d);
// cffi:end

#endif
