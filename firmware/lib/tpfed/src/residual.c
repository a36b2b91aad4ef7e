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
