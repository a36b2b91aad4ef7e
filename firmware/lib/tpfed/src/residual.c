#include "tpfed_residual.h"

#include <stddef.h>

#include "tpfed_kernels.h"

static void residual_add(float *x, const float *partial, int n)
{
    if (partial == NULL) {
        return;
    }
    for (int i = 0; i < n; i++) {
        x[i] += partial[i];
    }
}

void residual_rmsnorm_q8_0_ref(float *x, const float *partial, const float *w, int n, float eps,
                               float *xb, int8_t *qs, uint16_t *d)
{
    residual_add(x, partial, n);
    rmsnorm_f32(xb, x, w, n, eps);
    quantize_q8_0_ref(qs, d, xb, n);
}

void residual_rmsnorm_q8_0(float *x, const float *partial, const float *w, int n, float eps,
                           float *xb, int8_t *qs, uint16_t *d)
{
    residual_add(x, partial, n);
    rmsnorm_f32(xb, x, w, n, eps);
    quantize_q8_0(qs, d, xb, n);
}

static void residual_norm(float *x, const float *partial, const float *bias, const float *w,
                          const float *b, int n, float eps, int kind, float *xb)
{
    if (partial != NULL) {
        if (bias != NULL) {
            for (int i = 0; i < n; i++) {
                x[i] += partial[i] + bias[i];
            }
        } else {
            residual_add(x, partial, n);
        }
    }
    if (w == NULL) {
        if (xb != x) {
            for (int i = 0; i < n; i++) {
                xb[i] = x[i];
            }
        }
    } else if (kind & TPFED_NORM_LAYER) {
        layernorm_f32(xb, x, w, b, n, eps);
    } else {
        rmsnorm_f32(xb, x, w, n, eps);
    }
    if ((kind & TPFED_NORM_POST) && w != NULL && xb != x) {
        for (int i = 0; i < n; i++) {
            x[i] = xb[i];
        }
    }
}

void residual_norm_q8_0_ref(float *x, const float *partial, const float *bias, const float *w,
                            const float *b, int n, float eps, int kind, float *xb, int8_t *qs,
                            uint16_t *d)
{
    residual_norm(x, partial, bias, w, b, n, eps, kind, xb);
    quantize_q8_0_ref(qs, d, xb, n);
}

void residual_norm_q8_0(float *x, const float *partial, const float *bias, const float *w,
                        const float *b, int n, float eps, int kind, float *xb, int8_t *qs,
                        uint16_t *d)
{
    residual_norm(x, partial, bias, w, b, n, eps, kind, xb);
    quantize_q8_0(qs, d, xb, n);
}
