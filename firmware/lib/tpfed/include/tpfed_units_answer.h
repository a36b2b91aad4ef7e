// Answering an ACTIVATION frame with its PARTIAL frame in one call: validate the frame (CRC,
// version, type, addressee, session, geometry), run the units this peer holds for that layer
// and stage (tpfed_units.h) and write the finished PARTIAL frame. For peers whose per-frame
// cost matters (the desktop peer calls it once per activation instead of a chain of codec and
// kernel calls). Anything it cannot answer (a frame that is not a valid ACTIVATION for this
// peer, a layer or stage not held, another session) returns 0 and is left to the caller's
// general path, which answers with the precise ERROR.
#ifndef TPFED_UNITS_ANSWER_H
#define TPFED_UNITS_ANSWER_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_units.h"

// cffi:begin
typedef struct {
    const tpfed_attention_unit *att;  // n_att KV groups of this layer, or NULL
    int n_att;
    float *key_cache;                 // (seq_len, kv_stride), unit u at column u*head_size
    float *value_cache;
    int kv_stride;
    const tpfed_mlp_unit *mlp;        // n_mlp hidden-column ranges of this layer, or NULL
    int n_mlp;
} tpfed_layer_units;

typedef struct {
    int dim;
    int head_size;
    int group_size;
    int seq_len;
    int n_layers;
    float rope_theta;
    uint8_t device_id;
    uint16_t session;
    const tpfed_layer_units *layers;  // n_layers entries
    int8_t *xq_qs;                    // dim: the activation's values, copied aligned
    uint16_t *xq_d;                   // ceil(dim/32): its scales
    float *out;                       // dim
    void *work;                       // scratch for either kind of unit
    size_t work_bytes;
} tpfed_answer_ctx;

// Bytes of scratch the ctx needs for units of this geometry (the larger of the two kinds).
size_t tpfed_answer_work_bytes(int dim, int head_size, int group_size, int seq_len,
                               int max_mlp_cols);
// The PARTIAL frame answering `frame`, written to out; returns its length, or 0 when the
// general path must answer (see above).
size_t tpfed_answer_activation(const tpfed_answer_ctx *c, const uint8_t *frame, size_t len,
                               uint8_t *out, size_t cap);
// cffi:end

#endif
