#include "tpfed_units.h"

#include "tpfed_kernels.h"

static int nblk(int n) { return (n + TPFED_Q8_BLOCK - 1) / TPFED_Q8_BLOCK; }

static size_t align4(size_t n) { return (n + 3u) & ~(size_t)3u; }

static int matrix_ok(const tpfed_q8_matrix *m, int rows, int cols) {
    return m->qs != 0 && m->d != 0 && m->rows == rows && m->cols == cols;
}

size_t attention_units_scratch_bytes(int dim, int head_size, int group_size, int seq_len) {
    size_t gq = (size_t)group_size * (size_t)head_size;
    // q (gq) + att (gq) + part (dim) + scores (seq_len) floats, then att q8: d then qs
    return 4u * (2u * gq + (size_t)dim + (size_t)seq_len) + align4(2u * (size_t)nblk((int)gq)) +
           align4(gq);
}

size_t mlp_units_scratch_bytes(int dim, int max_cols) {
    size_t n = (size_t)max_cols;
    // h1 (n) + h3 (n) + part (dim) floats, then h q8: d then qs
    return 4u * (2u * n + (size_t)dim) + align4(2u * (size_t)nblk(max_cols)) + align4(n);
}

static void append_kv(const tpfed_attention_unit *u, float *k, float *v, const int8_t *xqs,
                      const uint16_t *xd, int dim, int head_size, int pos, float rope_theta) {
    matmul_q8_0_f32(k, u->wk.qs, u->wk.d, xqs, xd, head_size, dim);
    matmul_q8_0_f32(v, u->wv.qs, u->wv.d, xqs, xd, head_size, dim);
    rope_f32(k, head_size, head_size, pos, rope_theta);
}

static int units_ok(const tpfed_attention_unit *units, int n_units, int dim, int head_size,
                    int gq) {
    for (int u = 0; u < n_units; u++) {
        const tpfed_attention_unit *w = &units[u];
        if (!matrix_ok(&w->wq, gq, dim) || !matrix_ok(&w->wk, head_size, dim) ||
            !matrix_ok(&w->wv, head_size, dim) || !matrix_ok(&w->wo, dim, gq))
            return 0;
    }
    return 1;
}

int attention_units_append_kv(const tpfed_attention_unit *units, int n_units,
                              float *key_cache, float *value_cache, int kv_stride,
                              const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                              int pos, int seq_len, float rope_theta) {
    if (n_units < 1 || head_size < 1 || pos < 0 || pos >= seq_len ||
        kv_stride < n_units * head_size)
        return -1;
    for (int u = 0; u < n_units; u++) {
        const tpfed_attention_unit *w = &units[u];
        if (!matrix_ok(&w->wk, head_size, dim) || !matrix_ok(&w->wv, head_size, dim)) return -1;
    }
    for (int u = 0; u < n_units; u++) {
        size_t row = (size_t)pos * (size_t)kv_stride + (size_t)u * (size_t)head_size;
        append_kv(&units[u], key_cache + row, value_cache + row, xqs, xd, dim, head_size, pos,
                  rope_theta);
    }
    return 0;
}

int attention_units_forward(float *out, const tpfed_attention_unit *units, int n_units,
                            float *key_cache, float *value_cache, int kv_stride,
                            const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                            int group_size, int pos, int seq_len, float rope_theta,
                            void *scratch, size_t scratch_bytes) {
    int gq = group_size * head_size;
    if (n_units < 1 || dim < 1 || head_size < 1 || group_size < 1 || pos < 0 ||
        pos >= seq_len || kv_stride < n_units * head_size || scratch == 0 ||
        scratch_bytes < attention_units_scratch_bytes(dim, head_size, group_size, seq_len) ||
        !units_ok(units, n_units, dim, head_size, gq))
        return -1;
    float *q = (float *)scratch;
    float *att = q + gq;
    float *part = att + gq;
    float *scores = part + dim;
    uint16_t *att_d = (uint16_t *)(scores + seq_len);
    int8_t *att_qs = (int8_t *)((uint8_t *)att_d + align4(2u * (size_t)nblk(gq)));

    for (int u = 0; u < n_units; u++) {
        const tpfed_attention_unit *w = &units[u];
        float *kc = key_cache + (size_t)u * (size_t)head_size;
        float *vc = value_cache + (size_t)u * (size_t)head_size;
        size_t row = (size_t)pos * (size_t)kv_stride;
        matmul_q8_0_f32(q, w->wq.qs, w->wq.d, xqs, xd, gq, dim);
        rope_f32(q, gq, head_size, pos, rope_theta);
        append_kv(w, kc + row, vc + row, xqs, xd, dim, head_size, pos, rope_theta);
        attention_f32(att, q, kc, vc, group_size, head_size, pos, kv_stride, scores);
        quantize_q8_0(att_qs, att_d, att, gq);
        if (u == 0) {
            matmul_q8_0_f32(out, w->wo.qs, w->wo.d, att_qs, att_d, dim, gq);
        } else {
            matmul_q8_0_f32(part, w->wo.qs, w->wo.d, att_qs, att_d, dim, gq);
            for (int i = 0; i < dim; i++) out[i] += part[i];
        }
    }
    return 0;
}

int mlp_units_forward(float *out, const tpfed_mlp_unit *units, int n_units,
                      const int8_t *xqs, const uint16_t *xd, int dim, void *scratch,
                      size_t scratch_bytes) {
    if (n_units < 1 || dim < 1 || scratch == 0) return -1;
    int max_cols = 0;
    for (int u = 0; u < n_units; u++) {
        const tpfed_mlp_unit *w = &units[u];
        int n = w->w1.rows;
        if (n < 1 || !matrix_ok(&w->w1, n, dim) || !matrix_ok(&w->w3, n, dim) ||
            !matrix_ok(&w->w2, dim, n))
            return -1;
        if (n > max_cols) max_cols = n;
    }
    if (scratch_bytes < mlp_units_scratch_bytes(dim, max_cols)) return -1;
    float *h1 = (float *)scratch;
    float *h3 = h1 + max_cols;
    float *part = h3 + max_cols;
    uint16_t *hd = (uint16_t *)(part + dim);
    int8_t *hqs = (int8_t *)((uint8_t *)hd + align4(2u * (size_t)nblk(max_cols)));

    for (int u = 0; u < n_units; u++) {
        const tpfed_mlp_unit *w = &units[u];
        int n = w->w1.rows;
        matmul_q8_0_f32(h1, w->w1.qs, w->w1.d, xqs, xd, n, dim);
        matmul_q8_0_f32(h3, w->w3.qs, w->w3.d, xqs, xd, n, dim);
        swiglu_f32(h1, h1, h3, n);
        quantize_q8_0(hqs, hd, h1, n);
        if (u == 0) {
            matmul_q8_0_f32(out, w->w2.qs, w->w2.d, hqs, hd, dim, n);
        } else {
            matmul_q8_0_f32(part, w->w2.qs, w->w2.d, hqs, hd, dim, n);
            for (int i = 0; i < dim; i++) out[i] += part[i];
        }
    }
    return 0;
}
