// tpfed compute units: what one device computes for its share of a layer.
//
// An attention unit is one KV group (a KV head and the group_size query heads sharing it,
// gq = group_size * head_size): wq (gq, dim), wk (hs, dim), wv (hs, dim) and the group's own
// wo columns as a (dim, gq) matrix. An MLP unit is a hidden-column range [a, b), n = b - a:
// w1 (n, dim), w3 (n, dim) and the w2 columns as a (dim, n) matrix. All Q8_0 (tpfed_kernels.h).
//
// These functions are the one definition of a unit's arithmetic: the board firmware and the
// host's desktop peer both run them, so a share gives the same bits on either.
#ifndef TPFED_UNITS_H
#define TPFED_UNITS_H

#include <stddef.h>
#include <stdint.h>

// cffi:begin
typedef struct {
    const int8_t *qs;    // (rows, cols)
    const uint16_t *d;   // (rows, ceil(cols/32)) fp16 scales
    int rows;
    int cols;
} tpfed_q8_matrix;

typedef struct {
    tpfed_q8_matrix wq;  // (gq, dim)
    tpfed_q8_matrix wk;  // (hs, dim)
    tpfed_q8_matrix wv;  // (hs, dim)
    tpfed_q8_matrix wo;  // (dim, gq)
    const float *bq;     // (gq) bias of the group's q rows, or NULL
    const float *bk;     // (hs) or NULL
    const float *bv;     // (hs) or NULL
} tpfed_attention_unit;

typedef struct {
    tpfed_q8_matrix w1;  // (n, dim): the gate (SwiGLU) or the up matrix (plain MLP)
    tpfed_q8_matrix w3;  // (n, dim) the SwiGLU up matrix; qs NULL for a plain 2-matrix MLP
    tpfed_q8_matrix w2;  // (dim, n)
    const float *b1;     // (n) bias of the range's w1 rows, or NULL
    const float *b3;     // (n) bias of the range's w3 rows, or NULL
} tpfed_mlp_unit;

// What attention needs beyond the shapes. rope: TPFED_ROPE_NONE (learned positions),
// TPFED_ROPE_THETA (rope_f32 with rope_theta) or TPFED_ROPE_TABLE (rope_table_f32 with
// rope_freq, head_size/2 entries). causal 1: the query at pos attends rows
// max(0, pos - window + 1)..pos (window 0: no limit) after its own k, v are appended;
// causal 0 (encoders): rows 0..n_ctx-1 must all have been appended first
// (attention_units_append_kv_cfg) and the query attends them all, appending nothing.
#define TPFED_ROPE_NONE 0
#define TPFED_ROPE_THETA 1
#define TPFED_ROPE_TABLE 2
typedef struct {
    int dim;
    int head_size;
    int group_size;
    int seq_len;
    int rope;
    float rope_theta;
    const float *rope_freq;
    int window;
    int causal;
} tpfed_attention_cfg;

// Bytes of scratch attention_units_forward needs (caller-owned, 4-byte aligned).
size_t attention_units_scratch_bytes(int dim, int head_size, int group_size, int seq_len);
// Bytes of scratch mlp_units_forward needs for ranges of at most max_cols columns.
size_t mlp_units_scratch_bytes(int dim, int max_cols);

// out (dim) = sum over units u, in order, of wo_u @ q8(attention of group u at pos).
// For each unit: q = rope(wq @ x), k = rope(wk @ x) and v = wv @ x are written to row pos of
// the unit's KV cache, then its query heads attend over rows 0..pos. Unit u's cache is
// key_cache + u*head_size (and value_cache + u*head_size), rows kv_stride floats apart.
// Returns 0, or -1 if the arguments are inconsistent or scratch_bytes is below
// attention_units_scratch_bytes(dim, head_size, group_size, seq_len) (nothing is written then).
int attention_units_forward(float *out, const tpfed_attention_unit *units, int n_units,
                            float *key_cache, float *value_cache, int kv_stride,
                            const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                            int group_size, int pos, int seq_len, float rope_theta,
                            void *scratch, size_t scratch_bytes);

// Only the KV-cache part of attention_units_forward (k, v of every unit at pos): rebuilds a
// cache by replaying the activations broadcast earlier. Returns 0 or -1.
int attention_units_append_kv(const tpfed_attention_unit *units, int n_units,
                              float *key_cache, float *value_cache, int kv_stride,
                              const int8_t *xqs, const uint16_t *xd, int dim, int head_size,
                              int pos, int seq_len, float rope_theta);

// The general forms; the functions above are these with rope TPFED_ROPE_THETA, causal, no
// window (their units' bias pointers must be NULL or valid). Biases are added to q, k, v
// before RoPE. n_ctx is used when cfg->causal is 0 (1..seq_len). Return 0 or -1 as above.
int attention_units_forward_cfg(float *out, const tpfed_attention_unit *units, int n_units,
                                float *key_cache, float *value_cache, int kv_stride,
                                const int8_t *xqs, const uint16_t *xd,
                                const tpfed_attention_cfg *cfg, int pos, int n_ctx,
                                void *scratch, size_t scratch_bytes);
int attention_units_append_kv_cfg(const tpfed_attention_unit *units, int n_units,
                                  float *key_cache, float *value_cache, int kv_stride,
                                  const int8_t *xqs, const uint16_t *xd,
                                  const tpfed_attention_cfg *cfg, int pos);

// out (dim) = sum over units u, in order, of w2_u @ q8(silu(w1_u @ x) * (w3_u @ x)).
// Returns 0, or -1 if the arguments are inconsistent or scratch_bytes is below
// mlp_units_scratch_bytes(dim, widest range).
int mlp_units_forward(float *out, const tpfed_mlp_unit *units, int n_units,
                      const int8_t *xqs, const uint16_t *xd, int dim, void *scratch,
                      size_t scratch_bytes);
// The general form: h = act(w1_u @ x + b1_u) (TPFED_ACT_*, tpfed_kernels.h), times
// (w3_u @ x + b3_u) when the unit has w3 (act TPFED_ACT_SILU: SwiGLU, bit-exact with
// mlp_units_forward), then out += w2_u @ q8(h). The down projection's bias is not added here
// (the coordinator adds it once). Returns 0 or -1.
int mlp_units_forward_act(float *out, const tpfed_mlp_unit *units, int n_units,
                          const int8_t *xqs, const uint16_t *xd, int dim, int act,
                          void *scratch, size_t scratch_bytes);
// cffi:end

#endif
