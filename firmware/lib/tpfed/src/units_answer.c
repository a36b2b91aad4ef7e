#include "tpfed_units_answer.h"

#include <string.h>

#include "tpfed_kernels.h"
#include "tpfed_proto.h"

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

size_t tpfed_answer_work_bytes(int dim, int head_size, int group_size, int seq_len,
                               int max_mlp_cols) {
    return max_size(attention_units_scratch_bytes(dim, head_size, group_size, seq_len),
                    mlp_units_scratch_bytes(dim, max_mlp_cols > 0 ? max_mlp_cols : 1));
}

static int little_endian(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

size_t tpfed_answer_activation(const tpfed_answer_ctx *c, const uint8_t *frame, size_t len,
                               uint8_t *out, size_t cap) {
    tpfed_header_t h;
    const uint8_t *pl = NULL;
    tpfed_activation_t a;
    if (tpfed_frame_decode(frame, len, TPFED_MAX_PAYLOAD, &h, &pl) != TPFED_OK ||
        h.type != TPFED_MSG_ACTIVATION || h.session != c->session ||
        (h.dst != TPFED_BROADCAST && h.dst != c->device_id) ||
        tpfed_activation_decode(pl, h.length, &a) != TPFED_OK ||
        a.n != c->dim || a.layer >= c->n_layers)
        return 0;
    const tpfed_layer_units *L = &c->layers[a.layer];
    memcpy(c->xq_qs, a.qs, a.n);
    for (int b = 0; b < (a.n + TPFED_QK8_0 - 1) / TPFED_QK8_0; b++)
        c->xq_d[b] = tpfed_rd_u16(a.scales + 2 * b);
    int rc;
    if (a.stage == TPFED_STAGE_ATTENTION && L->n_att > 0 && a.pos < c->seq_len) {
        rc = attention_units_forward(c->out, L->att, L->n_att, L->key_cache, L->value_cache,
                                     L->kv_stride, c->xq_qs, c->xq_d, c->dim, c->head_size,
                                     c->group_size, a.pos, c->seq_len, c->rope_theta, c->work,
                                     c->work_bytes);
    } else if (a.stage == TPFED_STAGE_MLP && L->n_mlp > 0) {
        rc = mlp_units_forward(c->out, L->mlp, L->n_mlp, c->xq_qs, c->xq_d, c->dim, c->work,
                               c->work_bytes);
    } else {
        return 0;
    }
    if (rc != 0) return 0;
    if (cap < TPFED_HEADER_SIZE) return 0;
    // PARTIAL data is dim little-endian float32
    uint8_t *data = (uint8_t *)c->out;
    if (!little_endian()) {
        for (int i = 0; i < c->dim; i++) {
            uint32_t u;
            memcpy(&u, &c->out[i], 4);
            data[4 * i] = (uint8_t)u;
            data[4 * i + 1] = (uint8_t)(u >> 8);
            data[4 * i + 2] = (uint8_t)(u >> 16);
            data[4 * i + 3] = (uint8_t)(u >> 24);
        }
    }
    tpfed_partial_t p = {a.layer, a.stage, a.pos, TPFED_ENC_F32, (uint16_t)c->dim, data};
    size_t plen = 0, flen = 0;
    if (tpfed_partial_encode(out + TPFED_HEADER_SIZE, cap - TPFED_HEADER_SIZE, &p, &plen) !=
        TPFED_OK)
        return 0;
    tpfed_header_t r;
    memset(&r, 0, sizeof r);
    r.type = TPFED_MSG_PARTIAL;
    r.src = c->device_id;
    r.dst = h.src;
    r.seq = h.seq;
    r.session = c->session;
    if (tpfed_frame_finish(out, cap, &r, plen, &flen) != TPFED_OK) return 0;
    return flen;
}
