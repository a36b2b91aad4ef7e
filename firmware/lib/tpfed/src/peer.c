// tpfed portable peer (see tpfed_peer.h). Compute is units.c, the code host/tpfed/shard.py
// runs too, so a board's partials are bit-identical to the host's for the same kernels.
#include "tpfed_peer.h"

#include <stdio.h>
#include <string.h>

#include "tpfed_kernels.h"
#include "tpfed_proto.h"
#include "tpfed_units.h"

#define MAX_GROUPS 32
#define MAX_RANGES 8

struct tpfed_peer_layer {
    uint16_t layer;
    uint8_t ng, nr;
    uint16_t groups[MAX_GROUPS];
    uint32_t ranges[MAX_RANGES][2];     // [start, end) hidden columns
    uint8_t *shard;                     // shard_size bytes in the arena
    uint32_t shard_size;
    uint32_t received;                  // bytes received in order
    uint8_t complete;
    uint8_t sha256[TPFED_SHA256_SIZE];  // announced digest of the shard being received
    tpfed_sha256_ctx sha;
    float *key_cache;                   // (seq_len, ng * head_size)
    float *value_cache;                 // (seq_len, ng * head_size)
    tpfed_attention_unit *att_units;    // (ng) views into shard, set once it is complete
    tpfed_mlp_unit *mlp_units;          // (nr) views into shard, set once it is complete
};

// A shard is a layer share: tpfed_share_header_t (generated from shared_protocol/schema.py), the
// group table padded to 4, the ranges, then the Q8_0 matrices (layout: host/tpfed/shard.py).
static uint32_t pad4(uint32_t n) { return (n + 3u) & ~3u; }
static uint32_t nblocks(uint32_t n) { return (n + TPFED_Q8_BLOCK - 1u) / TPFED_Q8_BLOCK; }
// Bytes of one Q8_0 matrix in a shard: int8 values, then fp16 scales, each padded to 4.
static uint32_t q8_bytes(uint32_t rows, uint32_t cols) {
    return pad4(rows * cols) + pad4(2u * rows * nblocks(cols));
}

// View of the (rows, cols) Q8_0 matrix at base + *off; moves *off past it.
static tpfed_q8_matrix q8_at(const uint8_t *base, uint32_t *off, uint32_t rows, uint32_t cols) {
    tpfed_q8_matrix m;
    m.qs = (const int8_t *)(base + *off);
    m.d = (const uint16_t *)(base + *off + pad4(rows * cols));
    m.rows = (int)rows;
    m.cols = (int)cols;
    *off += q8_bytes(rows, cols);
    return m;
}

// -------------------------------------------------------------------------------- arena

static uint8_t *arena_take(tpfed_peer *p, uint32_t *used, uint32_t n) {
    uint32_t at = (*used + 7u) & ~7u;
    *used = at + n;
    return p->arena + at;
}

// -------------------------------------------------------------------------------- output

// COBS-encode frame[0..n) straight onto the link, then the 0x00 delimiter.
static void send_cobs(tpfed_peer *p, const uint8_t *src, size_t n) {
    uint8_t block[255];
    size_t i = 0;
    for (;;) {
        size_t len = 0;
        while (i + len < n && len < 254 && src[i + len] != 0) len++;
        block[0] = (uint8_t)(len + 1);
        memcpy(block + 1, src + i, len);
        p->hal->write(p->hal->ctx, block, (uint32_t)(len + 1));
        i += len;
        if (i == n) break;
        if (len < 254) i++;   // the zero this block stands for
        if (i == n && len < 254) {
            block[0] = 1;
            p->hal->write(p->hal->ctx, block, 1);
            break;
        }
    }
    block[0] = 0;
    p->hal->write(p->hal->ctx, block, 1);
}

static uint8_t my_src(const tpfed_peer *p) {
    return p->device_id != TPFED_BROADCAST ? p->device_id : 0xFE;
}

// The payload is already at tx + TPFED_HEADER_SIZE; finish the header and CRC and send.
static void send_frame(tpfed_peer *p, uint8_t type, uint8_t dst, uint16_t seq, uint16_t session,
                       size_t payload_len) {
    tpfed_header_t h;
    memset(&h, 0, sizeof h);
    h.type = type;
    h.src = my_src(p);
    h.dst = dst;
    h.seq = seq;
    h.session = session;
    size_t frame_len = 0;
    if (tpfed_frame_finish(p->tx, TPFED_PEER_MAX_FRAME, &h, payload_len, &frame_len) != TPFED_OK) return;
    send_cobs(p, p->tx, frame_len);
    p->stats.frames_out++;
}

static uint16_t next_seq(tpfed_peer *p) {
    p->seq = (uint16_t)(p->seq + 1u);
    return p->seq;
}

static uint8_t *payload_buf(tpfed_peer *p) { return p->tx + TPFED_HEADER_SIZE; }
static size_t payload_cap(void) { return TPFED_PEER_MAX_FRAME - TPFED_FRAME_OVERHEAD; }

static void send_error(tpfed_peer *p, uint8_t dst, uint16_t code, const char *text) {
    tpfed_error_t e;
    size_t n = strlen(text);
    e.code = code;
    e.text = (const uint8_t *)text;
    e.text_len = (uint8_t)(n > 255 ? 255 : n);
    size_t len = 0;
    if (tpfed_error_encode(payload_buf(p), payload_cap(), &e, &len) != TPFED_OK) return;
    p->stats.errors_sent++;
    send_frame(p, TPFED_MSG_ERROR, dst, next_seq(p), p->session, len);
}

static void send_ack(tpfed_peer *p, uint8_t dst, uint16_t acked_seq, uint8_t acked_type) {
    tpfed_ack_t a = {acked_seq, acked_type};
    size_t len = 0;
    if (tpfed_ack_encode(payload_buf(p), payload_cap(), &a, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_ACK, dst, next_seq(p), p->session, len);
}

static const char *type_name(uint8_t t) {
    switch (t) {
    case TPFED_MSG_READY: return "READY";
    case TPFED_MSG_PARTIAL: return "PARTIAL";
    case TPFED_MSG_ACK: return "ACK";
    case TPFED_MSG_NACK: return "NACK";
    case TPFED_MSG_ERROR: return "ERROR";
    case TPFED_MSG_PROBE_REPLY: return "PROBE_REPLY";
    default: return "these";
    }
}

static void hex8(char *out, const uint8_t *d) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    out[16] = 0;
}

// -------------------------------------------------------------------------------- init

uint64_t tpfed_peer_measure_macs(tpfed_peer *p) {
    uint32_t used = p->arena_fixed;
    int cols = 256, rows = 16;
    uint32_t need = (uint32_t)(rows * cols) + 2u * rows * 8u + (uint32_t)cols + 16u + 4u * rows + 64u;
    while (rows > 1 && used + need > p->arena_size) {
        rows /= 2;
        need = (uint32_t)(rows * cols) + 2u * rows * 8u + (uint32_t)cols + 16u + 4u * rows + 64u;
    }
    if (used + need > p->arena_size) return 0;
    int8_t *wqs = (int8_t *)arena_take(p, &used, (uint32_t)(rows * cols));
    uint16_t *wd = (uint16_t *)arena_take(p, &used, 2u * rows * 8u);
    int8_t *xqs = (int8_t *)arena_take(p, &used, (uint32_t)cols);
    uint16_t *xd = (uint16_t *)arena_take(p, &used, 16u);
    float *out = (float *)arena_take(p, &used, 4u * rows);
    uint32_t seed = 12345u;
    for (int i = 0; i < rows * cols; i++) {
        seed = seed * 1664525u + 1013904223u;
        wqs[i] = (int8_t)(seed >> 24);
    }
    for (int i = 0; i < cols; i++) xqs[i] = (int8_t)(i * 37);
    for (int i = 0; i < rows * 8; i++) wd[i] = 0x2000;   // fp16 ~0.0078
    for (int i = 0; i < 8; i++) xd[i] = 0x3C00;          // fp16 1.0
    const tpfed_hal *hal = p->hal;
    uint32_t t0 = hal->millis(hal->ctx), elapsed = 0, reps = 0;
    while (reps < 3 || elapsed < 100u) {
        matmul_q8_0_f32(out, wqs, wd, xqs, xd, rows, cols);
        reps++;
        elapsed = hal->millis(hal->ctx) - t0;
        if (elapsed > 2000u) break;
    }
    if (elapsed == 0) elapsed = 1;
    return (uint64_t)rows * (uint64_t)cols * reps * 1000u / elapsed;
}

int tpfed_peer_init(tpfed_peer *p, const tpfed_hal *hal, const tpfed_device_info *info,
                    uint8_t device_class, uint8_t *arena, uint32_t arena_size) {
    memset(p, 0, sizeof *p);
    p->hal = hal;
    p->info = info;
    p->device_class = device_class;
    p->arena = arena;
    p->arena_size = arena_size;
    p->device_id = TPFED_BROADCAST;
    uint32_t used = 0;
    // The stream buffer holds a frame still COBS-encoded (decoded in place), so it must take
    // the encoded size of the largest frame, a few bytes more than the frame itself.
    uint32_t rx_cap = (uint32_t)tpfed_cobs_max_encoded(TPFED_PEER_MAX_FRAME);
    p->rx = arena_take(p, &used, rx_cap);
    p->tx = arena_take(p, &used, TPFED_PEER_MAX_FRAME);
    if (used > arena_size) return -1;
    p->arena_fixed = p->arena_used = (used + 7u) & ~7u;
    tpfed_cobs_stream_init(&p->stream, p->rx, rx_cap);
    p->int8_macs = tpfed_peer_measure_macs(p);
    return 0;
}

static uint32_t announced_arena(const tpfed_peer *p) {
    uint32_t free_bytes = p->arena_size - p->arena_fixed;
    return free_bytes > TPFED_PEER_WORK_RESERVE ? free_bytes - TPFED_PEER_WORK_RESERVE : 0;
}

// -------------------------------------------------------------------------------- HELLO

static void on_hello(tpfed_peer *p, const tpfed_header_t *h) {
    if (h->dst != TPFED_BROADCAST) p->device_id = h->dst;
    const tpfed_device_info *in = p->info;
    tpfed_hello_t m;
    memset(&m, 0, sizeof m);
    size_t name_len = strlen(in->board);
    m.device_class = p->device_class;
    m.name = (const uint8_t *)in->board;
    m.name_len = (uint8_t)(name_len > 64 ? 64 : name_len);
    m.ram_kb = in->ram_bytes / 1024u;
    m.psram_kb = in->psram_bytes / 1024u;
    m.flash_kb = in->flash_bytes / 1024u;
    m.cpu_mhz = (uint16_t)(in->cpu_hz / 1000000u);
    m.cores = in->cores;
    m.features = (uint8_t)((in->has_fpu ? TPFED_FEAT_FPU : 0) | (in->has_simd ? TPFED_FEAT_SIMD : 0));
    m.int8_macs = p->int8_macs;
    m.battery_pct = TPFED_BATTERY_UNKNOWN;
    m.temperature_dc = TPFED_TEMPERATURE_UNKNOWN;
    m.transports = TPFED_TRANSPORT_SERIAL;
    m.max_frame = TPFED_PEER_MAX_FRAME;
    m.arena_kb = announced_arena(p) / 1024u;
    size_t len = 0;
    if (tpfed_hello_encode(payload_buf(p), payload_cap(), &m, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_HELLO, h->src, next_seq(p), p->session, len);
}

// -------------------------------------------------------------------------------- ASSIGN

typedef struct {
    uint16_t layer;
    uint8_t ng, nr;
    const uint8_t *groups;   // raw u16 LE
    const uint8_t *ranges;   // raw (u32 start, u32 end) LE
} entry_view;

static const uint8_t *read_entry(const uint8_t *q, entry_view *e) {
    e->layer = tpfed_rd_u16(q);
    e->ng = q[2];
    e->groups = q + 3;
    q += 3 + 2u * e->ng;
    e->nr = q[0];
    e->ranges = q + 1;
    return q + 1 + 8u * e->nr;
}

static uint32_t shard_bytes(const tpfed_peer *p, const entry_view *e) {
    uint32_t gq = (uint32_t)p->group_size * p->head_size, hs = p->head_size, dim = p->dim;
    uint32_t n = TPFED_SHARE_HEADER_SIZE + pad4(2u * e->ng) + 8u * e->nr;
    n += e->ng * (q8_bytes(gq, dim) + 2u * q8_bytes(hs, dim) + q8_bytes(dim, gq));
    for (int r = 0; r < e->nr; r++) {
        uint32_t w = tpfed_rd_u32(e->ranges + 8 * r + 4) - tpfed_rd_u32(e->ranges + 8 * r);
        n += 2u * q8_bytes(w, dim) + q8_bytes(dim, w);
    }
    return n;
}

static uint32_t kv_bytes(const tpfed_peer *p, uint32_t ng) {
    return 2u * ng * (uint32_t)p->seq_len * p->head_size * 4u;
}

// Check one entry against the geometry: the rules of shard.py's check_groups/check_ranges.
static int entry_error(const tpfed_peer *p, const entry_view *e, char *msg, size_t cap) {
    if (e->ng > MAX_GROUPS || e->nr > MAX_RANGES) {
        snprintf(msg, cap, "layer %u: %u KV groups and %u MLP ranges, this peer takes at most %u and %u",
                 (unsigned)e->layer, (unsigned)e->ng, (unsigned)e->nr, MAX_GROUPS, MAX_RANGES);
        return TPFED_ERR_UNSUPPORTED;
    }
    for (int i = 0; i < e->ng; i++) {
        uint16_t g = tpfed_rd_u16(e->groups + 2 * i);
        if (g >= p->n_kv_heads || (i && g <= tpfed_rd_u16(e->groups + 2 * (i - 1)))) {
            snprintf(msg, cap, "layer %u: KV groups must be strictly ascending and below %u",
                     (unsigned)e->layer, (unsigned)p->n_kv_heads);
            return TPFED_ERR_BAD_PAYLOAD;
        }
    }
    uint32_t prev_end = 0;
    for (int r = 0; r < e->nr; r++) {
        uint32_t a = tpfed_rd_u32(e->ranges + 8 * r), b = tpfed_rd_u32(e->ranges + 8 * r + 4);
        if (!(a < b && b <= p->hidden_dim) || a % TPFED_Q8_BLOCK ||
            (b % TPFED_Q8_BLOCK && b != p->hidden_dim) || a < prev_end) {
            snprintf(msg, cap, "layer %u: MLP range [%lu, %lu) is empty, unaligned, overlapping "
                     "or outside [0, %lu)", (unsigned)e->layer, (unsigned long)a, (unsigned long)b,
                     (unsigned long)p->hidden_dim);
            return TPFED_ERR_BAD_PAYLOAD;
        }
        prev_end = b;
    }
    return 0;
}

static void on_assign(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_assign_t a;
    char msg[160];
    if (tpfed_assign_decode(pl, h->length, &a) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (!a.dim || !a.hidden_dim || !a.n_layers || !a.n_heads || !a.n_kv_heads || !a.seq_len ||
        a.dim % a.n_heads || a.n_heads % a.n_kv_heads) {
        snprintf(msg, sizeof msg, "ASSIGN geometry: dim %u, n_heads %u, n_kv_heads %u, seq_len %u "
                 "is not a valid model", (unsigned)a.dim, (unsigned)a.n_heads,
                 (unsigned)a.n_kv_heads, (unsigned)a.seq_len);
        send_error(p, h->src, TPFED_ERR_UNSUPPORTED, msg);
        return;
    }
    // Every ACTIVATION and PARTIAL (float32) of this model must fit one frame: payloads of
    // 7 + 2*ceil(dim/32) + dim and 8 + 4*dim bytes (layouts in tpfed_proto.h).
    size_t act_len = 7u + 2u * (size_t)nblocks(a.dim) + a.dim, part_len = 8u + 4u * (size_t)a.dim;
    size_t biggest = act_len > part_len ? act_len : part_len;
    if (biggest > payload_cap()) {
        snprintf(msg, sizeof msg, "dim %u needs frames of %lu bytes, this board takes %u",
                 (unsigned)a.dim, (unsigned long)(biggest + TPFED_FRAME_OVERHEAD),
                 (unsigned)TPFED_PEER_MAX_FRAME);
        send_error(p, h->src, TPFED_ERR_UNSUPPORTED, msg);
        return;
    }
    // The new geometry, checked and sized before anything of the old assignment is touched.
    tpfed_peer g = *p;
    g.dim = a.dim;
    g.hidden_dim = a.hidden_dim;
    g.n_layers = a.n_layers;
    g.n_heads = a.n_heads;
    g.n_kv_heads = a.n_kv_heads;
    g.head_size = (uint16_t)(a.dim / a.n_heads);
    g.group_size = (uint16_t)(a.n_heads / a.n_kv_heads);
    g.seq_len = a.seq_len;
    uint64_t need = sizeof(tpfed_peer_layer) * (uint64_t)a.n_entries + 8u * a.n_entries;
    uint32_t max_ng = 0, max_w = 0;
    const uint8_t *q = a.entries;
    for (int i = 0; i < a.n_entries; i++) {
        entry_view e;
        q = read_entry(q, &e);
        int code = entry_error(&g, &e, msg, sizeof msg);
        if (!code && e.layer >= a.n_layers) {
            snprintf(msg, sizeof msg, "ASSIGN names layer %u twice or out of range", (unsigned)e.layer);
            code = TPFED_ERR_BAD_PAYLOAD;
        }
        const uint8_t *q2 = a.entries;
        for (int j = 0; j < i && !code; j++) {
            entry_view o;
            q2 = read_entry(q2, &o);
            if (o.layer == e.layer) {
                snprintf(msg, sizeof msg, "ASSIGN names layer %u twice or out of range", (unsigned)e.layer);
                code = TPFED_ERR_BAD_PAYLOAD;
            }
        }
        if (code) {
            send_error(p, h->src, (uint16_t)code, msg);
            return;
        }
        need += shard_bytes(&g, &e) + 8u + kv_bytes(&g, e.ng) + 16u +
                sizeof(tpfed_attention_unit) * e.ng + 8u + sizeof(tpfed_mlp_unit) * e.nr + 8u;
        if (e.ng > max_ng) max_ng = e.ng;
        for (int r = 0; r < e.nr; r++) {
            uint32_t w = tpfed_rd_u32(e.ranges + 8 * r + 4) - tpfed_rd_u32(e.ranges + 8 * r);
            if (w > max_w) max_w = w;
        }
    }
    size_t work = 0;
    if (max_ng) work = attention_units_scratch_bytes(g.dim, g.head_size, g.group_size, g.seq_len);
    if (max_w) {
        size_t mlp = mlp_units_scratch_bytes(g.dim, (int)max_w);
        if (mlp > work) work = mlp;
    }
    need += 4u * g.dim + pad4(g.dim) + 2u * nblocks(g.dim) + work + 4u * 8u;
    if (p->arena_fixed + need > p->arena_size) {
        snprintf(msg, sizeof msg, "assignment needs %lu bytes of arena (weights, KV cache for %u "
                 "positions, buffers), this peer has %lu", (unsigned long)need, (unsigned)a.seq_len,
                 (unsigned long)(p->arena_size - p->arena_fixed));
        send_error(p, h->src, TPFED_ERR_OUT_OF_MEMORY, msg);
        return;
    }
    // Commit: lay out the layer table, shards, KV caches and compute buffers.
    g.norm_eps = a.norm_eps;
    g.rope_theta = a.rope_theta;
    g.n_entries = a.n_entries;
    g.assigned = 1;
    g.ready = 0;
    g.device_id = h->dst;
    g.session = h->session;
    uint32_t used = p->arena_fixed;
    g.layers = (tpfed_peer_layer *)arena_take(&g, &used, sizeof(tpfed_peer_layer) * a.n_entries);
    q = a.entries;
    for (int i = 0; i < a.n_entries; i++) {
        entry_view e;
        q = read_entry(q, &e);
        tpfed_peer_layer *L = &g.layers[i];
        memset(L, 0, sizeof *L);
        L->layer = e.layer;
        L->ng = e.ng;
        L->nr = e.nr;
        for (int j = 0; j < e.ng; j++) L->groups[j] = tpfed_rd_u16(e.groups + 2 * j);
        for (int r = 0; r < e.nr; r++) {
            L->ranges[r][0] = tpfed_rd_u32(e.ranges + 8 * r);
            L->ranges[r][1] = tpfed_rd_u32(e.ranges + 8 * r + 4);
        }
        L->shard_size = shard_bytes(&g, &e);
        L->shard = arena_take(&g, &used, L->shard_size);
        if (e.ng) {
            L->att_units = (tpfed_attention_unit *)arena_take(
                &g, &used, (uint32_t)(sizeof(tpfed_attention_unit) * e.ng));
            uint32_t kv = kv_bytes(&g, e.ng) / 2u;
            L->key_cache = (float *)arena_take(&g, &used, kv);
            L->value_cache = (float *)arena_take(&g, &used, kv);
            memset(L->key_cache, 0, kv);
            memset(L->value_cache, 0, kv);
        }
        if (e.nr)
            L->mlp_units = (tpfed_mlp_unit *)arena_take(&g, &used,
                                                        (uint32_t)(sizeof(tpfed_mlp_unit) * e.nr));
    }
    g.out = (float *)arena_take(&g, &used, 4u * g.dim);
    g.xq_qs = (int8_t *)arena_take(&g, &used, pad4(g.dim));
    g.xq_d = (uint16_t *)arena_take(&g, &used, 2u * nblocks(g.dim));
    g.work_bytes = (uint32_t)work;
    g.work = arena_take(&g, &used, g.work_bytes);
    g.arena_used = used;
    *p = g;
    send_ack(p, h->src, h->seq, TPFED_MSG_ASSIGN);
}

// -------------------------------------------------------------------------------- WEIGHTS

// 0 if the matrix at *off has zero padding and finite scales; 1 bad padding, 2 bad scale.
static int check_matrix(const uint8_t *s, uint32_t *off, uint32_t rows, uint32_t cols) {
    uint32_t nq = rows * cols, nd = rows * nblocks(cols), at = *off;
    for (uint32_t i = at + nq; i < at + pad4(nq); i++)
        if (s[i]) return 1;
    at += pad4(nq);
    for (uint32_t i = 0; i < nd; i++)
        if ((tpfed_rd_u16(s + at + 2 * i) & 0x7C00u) == 0x7C00u) return 2;
    for (uint32_t i = at + 2u * nd; i < at + pad4(2u * nd); i++)
        if (s[i]) return 1;
    *off = at + pad4(2u * nd);
    return 0;
}

// Validate a complete shard against the assignment (shard.py's parse_layer_share rules).
static int shard_error(const tpfed_peer *p, const tpfed_peer_layer *L, char *msg, size_t cap) {
    const uint8_t *s = L->shard;
    uint32_t gq = (uint32_t)p->group_size * p->head_size;
    tpfed_share_header_t h;
    size_t used;
    int rc = tpfed_share_header_decode(s, L->shard_size, &h, &used);
    if (rc != TPFED_OK) {
        snprintf(msg, cap, "shard of layer %u: not a layer share (%s)", (unsigned)L->layer,
                 tpfed_status_str(rc));
        return 1;
    }
    if (h.version != TPFED_SHARE_VERSION || h.header_size != TPFED_SHARE_HEADER_SIZE) {
        snprintf(msg, cap, "shard of layer %u: layer share version %u (header %u bytes) unsupported",
                 (unsigned)L->layer, (unsigned)h.version, (unsigned)h.header_size);
        return 1;
    }
    if (h.total != L->shard_size) {
        snprintf(msg, cap, "shard of layer %u: layer share size mismatch", (unsigned)L->layer);
        return 1;
    }
    if (h.dim != p->dim || h.hidden_dim != p->hidden_dim || h.head_size != p->head_size ||
        h.group_size != p->group_size || h.n_kv_heads != p->n_kv_heads || h.reserved != 0) {
        snprintf(msg, cap, "shard of layer %u: layer share is for another model", (unsigned)L->layer);
        return 1;
    }
    int same = h.layer == L->layer && h.n_groups == L->ng && h.n_ranges == L->nr;
    uint32_t off = TPFED_SHARE_HEADER_SIZE;
    for (int i = 0; same && i < L->ng; i++) same = tpfed_rd_u16(s + off + 2 * i) == L->groups[i];
    for (uint32_t i = off + 2u * L->ng; same && i < off + pad4(2u * L->ng); i++) same = s[i] == 0;
    off += pad4(2u * L->ng);
    for (int r = 0; same && r < L->nr; r++)
        same = tpfed_rd_u32(s + off + 8 * r) == L->ranges[r][0] &&
               tpfed_rd_u32(s + off + 8 * r + 4) == L->ranges[r][1];
    off += 8u * L->nr;
    if (!same) {
        snprintf(msg, cap, "shard of layer %u does not hold what ASSIGN said", (unsigned)L->layer);
        return 1;
    }
    // Every matrix: zero padding after values and scales, finite fp16 scales.
    int status = 0;
    for (int i = 0; i < L->ng && !status; i++) {
        status = check_matrix(s, &off, gq, p->dim);
        if (!status) status = check_matrix(s, &off, p->head_size, p->dim);
        if (!status) status = check_matrix(s, &off, p->head_size, p->dim);
        if (!status) status = check_matrix(s, &off, p->dim, gq);
    }
    for (int r = 0; r < L->nr && !status; r++) {
        uint32_t w = L->ranges[r][1] - L->ranges[r][0];
        status = check_matrix(s, &off, w, p->dim);
        if (!status) status = check_matrix(s, &off, w, p->dim);
        if (!status) status = check_matrix(s, &off, p->dim, w);
    }
    if (status == 1)
        snprintf(msg, cap, "shard of layer %u: layer share has non-zero padding bytes (corrupted)",
                 (unsigned)L->layer);
    else if (status == 2)
        snprintf(msg, cap, "shard of layer %u holds a non-finite fp16 scale", (unsigned)L->layer);
    return status;
}

// Point the layer's compute units at the matrices of its (complete, checked) shard.
static void build_units(const tpfed_peer *p, tpfed_peer_layer *L) {
    uint32_t dim = p->dim, hs = p->head_size, gq = (uint32_t)p->group_size * hs;
    uint32_t off = TPFED_SHARE_HEADER_SIZE + pad4(2u * L->ng) + 8u * L->nr;
    for (int i = 0; i < L->ng; i++) {
        tpfed_attention_unit *u = &L->att_units[i];
        u->wq = q8_at(L->shard, &off, gq, dim);
        u->wk = q8_at(L->shard, &off, hs, dim);
        u->wv = q8_at(L->shard, &off, hs, dim);
        u->wo = q8_at(L->shard, &off, dim, gq);
    }
    for (int r = 0; r < L->nr; r++) {
        tpfed_mlp_unit *u = &L->mlp_units[r];
        uint32_t n = L->ranges[r][1] - L->ranges[r][0];
        u->w1 = q8_at(L->shard, &off, n, dim);
        u->w3 = q8_at(L->shard, &off, n, dim);
        u->w2 = q8_at(L->shard, &off, dim, n);
    }
}

static tpfed_peer_layer *find_layer(tpfed_peer *p, uint32_t layer) {
    for (int i = 0; i < p->n_entries; i++)
        if (p->layers[i].layer == layer) return &p->layers[i];
    return NULL;
}

static void on_weights(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_weights_t w;
    char msg[160];
    if (tpfed_weights_decode(pl, h->length, &w) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (!p->assigned || h->session != p->session) {
        send_error(p, h->src, TPFED_ERR_BAD_STATE, "WEIGHTS before ASSIGN of this session");
        return;
    }
    tpfed_peer_layer *L = find_layer(p, w.shard_id);
    if (!L) {
        snprintf(msg, sizeof msg, "layer %u was not assigned", (unsigned)w.shard_id);
        send_error(p, h->src, TPFED_ERR_NOT_ASSIGNED, msg);
        return;
    }
    if (w.total != L->shard_size) {
        snprintf(msg, sizeof msg, "shard of layer %u is %lu bytes, its assignment needs %lu",
                 (unsigned)L->layer, (unsigned long)w.total, (unsigned long)L->shard_size);
        send_error(p, h->src, w.total > p->arena_size ? TPFED_ERR_OUT_OF_MEMORY : TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    if ((uint64_t)w.offset + w.data_len > w.total) {
        snprintf(msg, sizeof msg, "WEIGHTS chunk %lu+%u beyond shard size %lu",
                 (unsigned long)w.offset, (unsigned)w.data_len, (unsigned long)w.total);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    if (w.offset == 0) {   // a (re)transmission of this shard starts
        if (L->complete) p->ready = 0;
        L->complete = 0;
        L->received = 0;
        memcpy(L->sha256, w.sha256, TPFED_SHA256_SIZE);
        tpfed_sha256_init(&L->sha);
    } else if (L->complete || w.offset < L->received) {
        return;   // a repeat of data already here
    } else if (w.offset > L->received || memcmp(L->sha256, w.sha256, TPFED_SHA256_SIZE) != 0) {
        snprintf(msg, sizeof msg, "WEIGHTS chunk of layer %u at %lu, expected %lu (chunks go in order)",
                 (unsigned)L->layer, (unsigned long)w.offset, (unsigned long)L->received);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    memcpy(L->shard + w.offset, w.data, w.data_len);
    tpfed_sha256_update(&L->sha, w.data, w.data_len);
    L->received += w.data_len;
    if (L->received < L->shard_size) return;

    uint8_t digest[TPFED_SHA256_SIZE];
    tpfed_sha256_final(&L->sha, digest);
    L->received = 0;
    if (memcmp(digest, L->sha256, TPFED_SHA256_SIZE) != 0) {
        char got[17], want[17];
        hex8(got, digest);
        hex8(want, L->sha256);
        snprintf(msg, sizeof msg, "shard of layer %u refused: sha256 %s... != announced %s...",
                 (unsigned)L->layer, got, want);
        send_error(p, h->src, TPFED_ERR_SHARD_HASH_MISMATCH, msg);
        return;
    }
    if (shard_error(p, L, msg, sizeof msg)) {
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    build_units(p, L);
    L->complete = 1;
    send_ack(p, h->src, h->seq, TPFED_MSG_WEIGHTS);
    uint32_t total = 0;
    for (int i = 0; i < p->n_entries; i++) {
        if (!p->layers[i].complete) return;
        total += p->layers[i].shard_size;
    }
    p->ready = 1;
    tpfed_ready_t r = {total, p->arena_used, p->arena_size - p->arena_used};
    size_t len = 0;
    if (tpfed_ready_encode(payload_buf(p), payload_cap(), &r, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_READY, h->src, next_seq(p), p->session, len);
}

// -------------------------------------------------------------------------------- compute

static void on_activation(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_activation_t a;
    char msg[160];
    if (tpfed_activation_decode(pl, h->length, &a) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (!p->ready || h->session != p->session) {
        snprintf(msg, sizeof msg, "ACTIVATION for session %u while %s %u", (unsigned)h->session,
                 p->ready ? "in session" : "not ready; session", (unsigned)p->session);
        send_error(p, h->src, p->ready ? TPFED_ERR_BAD_SESSION : TPFED_ERR_BAD_STATE, msg);
        return;
    }
    tpfed_peer_layer *L = find_layer(p, a.layer);
    int attention = a.stage == TPFED_STAGE_ATTENTION;
    if (!L || (attention ? L->ng == 0 : (a.stage != TPFED_STAGE_MLP || L->nr == 0))) {
        snprintf(msg, sizeof msg, "nothing of layer %u stage %s is held here", (unsigned)a.layer,
                 attention ? "ATTENTION" : a.stage == TPFED_STAGE_MLP ? "MLP" : "?");
        send_error(p, h->src, TPFED_ERR_NOT_ASSIGNED, msg);
        return;
    }
    if (a.n != p->dim || (attention && a.pos >= p->seq_len)) {
        snprintf(msg, sizeof msg, "ACTIVATION of %u values at position %u; this model has dim %u "
                 "and seq_len %u", (unsigned)a.n, (unsigned)a.pos, (unsigned)p->dim, (unsigned)p->seq_len);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    memcpy(p->xq_qs, a.qs, a.n);
    for (uint32_t b = 0; b < nblocks(a.n); b++) p->xq_d[b] = tpfed_rd_u16(a.scales + 2 * b);
    int rc = attention
        ? attention_units_forward(p->out, L->att_units, L->ng, L->key_cache, L->value_cache,
                                  L->ng * p->head_size, p->xq_qs, p->xq_d, p->dim, p->head_size,
                                  p->group_size, a.pos, p->seq_len, p->rope_theta, p->work,
                                  p->work_bytes)
        : mlp_units_forward(p->out, L->mlp_units, L->nr, p->xq_qs, p->xq_d, p->dim, p->work,
                            p->work_bytes);
    if (rc != 0) {
        snprintf(msg, sizeof msg, "layer %u: the compute units refused the share's arguments",
                 (unsigned)a.layer);
        send_error(p, h->src, TPFED_ERR_INTERNAL, msg);
        return;
    }
    p->stats.activations++;

    // PARTIAL data is dim little-endian float32: rewrite out as those bytes, in place.
    uint8_t *data = (uint8_t *)p->out;
    for (int i = 0; i < p->dim; i++) {
        float v = p->out[i];
        tpfed_wr_f32(data + 4 * i, v);
    }
    tpfed_partial_t m = {a.layer, a.stage, a.pos, TPFED_ENC_F32, p->dim, data};
    size_t len = 0;
    if (tpfed_partial_encode(payload_buf(p), payload_cap(), &m, &len) != TPFED_OK) {
        send_error(p, h->src, TPFED_ERR_INTERNAL, "PARTIAL does not fit a frame");
        return;
    }
    send_frame(p, TPFED_MSG_PARTIAL, h->src, h->seq, p->session, len);
}

// -------------------------------------------------------------------------------- the rest

static void on_heartbeat(tpfed_peer *p, const tpfed_header_t *h) {
    tpfed_heartbeat_t m = {p->hal->millis(p->hal->ctx), 0};
    size_t len = 0;
    if (tpfed_heartbeat_encode(payload_buf(p), payload_cap(), &m, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_HEARTBEAT, h->src, next_seq(p), p->session, len);
}

static void on_probe(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    if (h->length > payload_cap()) return;
    memmove(payload_buf(p), pl, h->length);
    send_frame(p, TPFED_MSG_PROBE_REPLY, h->src, h->seq, h->session, h->length);
}

// Only the current session may end itself: a BYE of another session is dropped.
static void on_bye(tpfed_peer *p, const tpfed_header_t *h) {
    if (h->session != p->session) {
        p->stats.dropped++;
        return;
    }
    p->assigned = 0;
    p->ready = 0;
    p->n_entries = 0;
    p->layers = NULL;
    p->arena_used = p->arena_fixed;
}

void tpfed_peer_handle_frame(tpfed_peer *p, const uint8_t *frame, size_t len) {
    tpfed_header_t h;
    const uint8_t *pl = NULL;
    p->stats.frames_in++;
    if (tpfed_frame_decode(frame, len, payload_cap(), &h, &pl) != TPFED_OK ||
        tpfed_payload_validate(h.type, pl, h.length) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (h.dst != TPFED_BROADCAST && h.dst != p->device_id && h.type != TPFED_MSG_HELLO) {
        p->stats.dropped++;
        return;
    }
    switch (h.type) {
    case TPFED_MSG_HELLO: on_hello(p, &h); break;
    case TPFED_MSG_ASSIGN: on_assign(p, &h, pl); break;
    case TPFED_MSG_WEIGHTS: on_weights(p, &h, pl); break;
    case TPFED_MSG_ACTIVATION: on_activation(p, &h, pl); break;
    case TPFED_MSG_HEARTBEAT: on_heartbeat(p, &h); break;
    case TPFED_MSG_PROBE: on_probe(p, &h, pl); break;
    case TPFED_MSG_BYE: on_bye(p, &h); break;
    default: {
        char msg[64];
        snprintf(msg, sizeof msg, "a peer does not take %s frames", type_name(h.type));
        send_error(p, h.src, TPFED_ERR_BAD_STATE, msg);
    }
    }
}

int tpfed_peer_poll(tpfed_peer *p) {
    uint8_t chunk[64];
    int frames = 0;
    uint32_t n;
    while ((n = p->hal->read(p->hal->ctx, chunk, sizeof chunk)) > 0) {
        for (uint32_t i = 0; i < n; i++) {
            int32_t len = tpfed_cobs_stream_feed(&p->stream, chunk[i]);
            if (len > 0) {
                tpfed_peer_handle_frame(p, p->rx, (size_t)len);
                frames++;
            }
        }
    }
    return frames;
}

void tpfed_peer_run(tpfed_peer *p) {
    for (;;) {
        if (!tpfed_peer_poll(p)) p->hal->wait(p->hal->ctx, 1000u);
    }
}
