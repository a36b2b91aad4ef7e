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

static void rope(const tpfed_attention_cfg *cfg, float *x, int n, int pos) {
    if (cfg->rope == TPFED_ROPE_THETA)
        rope_f32(x, n, cfg->head_size, pos, cfg->rope_theta);
    else if (cfg->rope == TPFED_ROPE_TABLE)
        rope_table_f32(x, n, cfg->head_size, pos, cfg->rope_freq);
}

static void append_kv(const tpfed_attention_unit *u, float *k, float *v, const int8_t *xqs,
                      const uint16_t *xd, const tpfed_attention_cfg *cfg, int pos) {
    int dim = cfg->dim, hs = cfg->head_size;
    matmul_q8_0_f32(k, u->wk.qs, u->wk.d, xqs, xd, hs, dim);
    matmul_q8_0_f32(v, u->wv.qs, u->wv.d, xqs, xd, hs, dim);
    if (u->bk) add_f32(k, u->bk, hs);
    if (u->bv) add_f32(v, u->bv, hs);
    rope(cfg, k, hs, pos);
}

static int cfg_ok(const tpfed_attention_cfg *c) {
    return c != 0 && c->dim >= 1 && c->head_size >= 1 && c->group_size >= 1 && c->seq_len >= 1 &&
           c->window >= 0 && (c->rope == TPFED_ROPE_NONE || c->rope == TPFED_ROPE_THETA ||
                              (c->rope == TPFED_ROPE_TABLE && c->rope_freq != 0));
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

int attention_units_append_kv_cfg(const tpfed_attention_unit *units, int n_units,
                                  float *key_cache, float *value_cache, int kv_stride,
                                  const int8_t *xqs, const uint16_t *xd,
                                  const tpfed_attention_cfg *cfg, int pos) {
    if (n_units < 1 || !cfg_ok(cfg) || pos < 0 || pos >= cfg->seq_len ||
        kv_stride < n_units * cfg->head_size)
        return -1;
    int hs = cfg->head_size, dim = cfg->dim;
    for (int u = 0; u < n_units; u++) {
        const tpfed_attention_unit *w = &units[u];
        if (!matrix_ok(&w->wk, hs, dim) || !matrix_ok(&w->wv, hs, dim)) return -1;
    }
    for (int u = 0; u < n_units; u++) {
        size_t row = (size_t)pos * (size_t)kv_stride + (size_t)u * (size_t)hs;
        append_kv(&units[u], key_cache + row, value_cache + row, xqs, xd, cfg, pos);
    }
    return 0;
}

int attention_units_forward_cfg(float *out, const tpfed_attention_unit *units, int n_units,
                                float *key_cache, float *value_cache, int kv_stride,
                                const int8_t *xqs, const uint16_t *xd,
                                const tpfed_attention_cfg *cfg, int pos, int n_ctx,
                                void *scratch, size_t scratch_bytes) {
    if (!cfg_ok(cfg)) return -1;
    int dim = cfg->dim, hs = cfg->head_size, gsz = cfg->group_size, seq_len = cfg->seq_len;
    int gq = gsz * hs;
    if (n_units < 1 || pos < 0 || pos >= seq_len || kv_stride < n_units * hs || scratch == 0 ||
        (!cfg->causal && (n_ctx < 1 || n_ctx > seq_len)) ||
        scratch_bytes < attention_units_scratch_bytes(dim, hs, gsz, seq_len) ||
        !units_ok(units, n_units, dim, hs, gq))
        return -1;
    float *q = (float *)scratch;
    float *att = q + gq;
    float *part = att + gq;
    float *scores = part + dim;
    uint16_t *att_d = (uint16_t *)(scores + seq_len);
    int8_t *att_qs = (int8_t *)((uint8_t *)att_d + align4(2u * (size_t)nblk(gq)));
    int first = 0, last = pos;
    if (!cfg->causal) {
        last = n_ctx - 1;
    } else if (cfg->window > 0 && pos - cfg->window + 1 > 0) {
        first = pos - cfg->window + 1;
    }

    for (int u = 0; u < n_units; u++) {
        const tpfed_attention_unit *w = &units[u];
        float *kc = key_cache + (size_t)u * (size_t)hs;
        float *vc = value_cache + (size_t)u * (size_t)hs;
        size_t row = (size_t)pos * (size_t)kv_stride;
        matmul_q8_0_f32(q, w->wq.qs, w->wq.d, xqs, xd, gq, dim);
        if (w->bq) add_f32(q, w->bq, gq);
        rope(cfg, q, gq, pos);
        if (cfg->causal) append_kv(w, kc + row, vc + row, xqs, xd, cfg, pos);
        if (first == 0 && cfg->causal)
            attention_f32(att, q, kc, vc, gsz, hs, pos, kv_stride, scores);
        else
            attention_span_f32(att, q, kc, vc, gsz, hs, first, last, kv_stride, scores);
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

static tpfed_attention_cfg theta_cfg(int dim, int head_size, int group_size, int seq_len,
                                     float rope_theta) {
    tpfed_attention_cfg c;
    c.dim = dim;
    c.head_size = head_size;
    c.group_size = group_size;
    c.seq_len = seq_len;
    c.rope = TPFED_ROPE_THETA;
    c.rope_theta = rope_theta;
    c.rope_freq = 0;
    c.window = 0;
    c.causal = 1;
    return c;
}

int attention_units_append_kv(const tpfed_attention_unit *units, int n_units,
                              float *key_cache, float *value_cache, int kv_stride,
                              const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                              int pos, int seq_len, float rope_theta) {
    tpfed_attention_cfg c = theta_cfg(dim, head_size, 1, seq_len, rope_theta);
    return attention_units_append_kv_cfg(units, n_units, key_cache, value_cache, kv_stride, xqs,
                                         xd, &c, pos);
}

int attention_units_forward(float *out, const tpfed_attention_unit *units, int n_units,
                            float *key_cache, float *value_cache, int kv_stride,
                            const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                            int group_size, int pos, int seq_len, float rope_theta,
                            void *scratch, size_t scratch_bytes) {
    tpfed_attention_cfg c = theta_cfg(dim, head_size, group_size, seq_len, rope_theta);
    return attention_units_forward_cfg(out, units, n_units, key_cache, value_cache, kv_stride,
                                       xqs, xd, &c, pos, pos + 1, scratch, scratch_bytes);
}

int mlp_units_forward_act(float *out, const tpfed_mlp_unit *units, int n_units,
                          const int8_t *xqs, const uint16_t *xd, int dim, int act,
                          void *scratch, size_t scratch_bytes) {
    if (n_units < 1 || dim < 1 || scratch == 0) return -1;
    int max_cols = 0;
    for (int u = 0; u < n_units; u++) {
        const tpfed_mlp_unit *w = &units[u];
        int n = w->w1.rows;
        if (n < 1 || !matrix_ok(&w->w1, n, dim) || !matrix_ok(&w->w2, dim, n) ||
            (w->w3.qs != 0 && !matrix_ok(&w->w3, n, dim)))
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
        if (w->b1) add_f32(h1, w->b1, n);
        if (w->w3.qs != 0) {
            matmul_q8_0_f32(h3, w->w3.qs, w->w3.d, xqs, xd, n, dim);
            if (w->b3) add_f32(h3, w->b3, n);
            if (act == TPFED_ACT_SILU) {
                swiglu_f32(h1, h1, h3, n);
            } else {
                act_f32(h1, n, act);
                for (int i = 0; i < n; i++) h1[i] *= h3[i];
            }
        } else {
            act_f32(h1, n, act);
        }
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

int mlp_units_forward(float *out, const tpfed_mlp_unit *units, int n_units,
                      const int8_t *xqs, const uint16_t *xd, int dim, void *scratch,
                      size_t scratch_bytes) {
    for (int u = 0; u < n_units; u++)
        if (units[u].w3.qs == 0) return -1;  // the gated MLP only
    return mlp_units_forward_act(out, units, n_units, xqs, xd, dim, TPFED_ACT_SILU, scratch,
                                 scratch_bytes);
}
