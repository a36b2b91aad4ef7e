// tpfed peer core (see tpfed_peer.h). Compute is units.c, the code the host runs too, so a
// device's partials are bit-identical to the host's for the same kernels.
#include "tpfed_peer.h"

#include <stdio.h>
#include <string.h>

#include "tpfed_auth.h"
#include "tpfed_kernels.h"
#include "tpfed_proto.h"
#include "tpfed_sha256.h"
#include "tpfed_units.h"

#define GRANULE ((uint32_t)TPFED_WEIGHTS_GRANULE)
#define INT_LIMIT 0x7FFFFFFFu   // rows * cols of any matrix the int-based kernels are given

typedef struct tpfed_peer_layer {
    uint16_t layer;
    uint8_t ng, nr;
    uint8_t started;                    // sha256 below names the share being assembled
    uint8_t complete;                   // share in, hashed, checked, units built
    uint8_t keep;                       // (during an ASSIGN) a new entry takes this share
    uint16_t *groups;                   // (ng)
    uint32_t *ranges;                   // (nr, 2) [start, end) hidden columns
    uint8_t *shard;                     // shard_size bytes
    uint32_t shard_size;
    uint32_t n_granules, have;          // granules of the share, granules held
    uint32_t *bitmap;                   // (ceil(n_granules / 32)) held granules
    uint8_t sha256[TPFED_SHA256_SIZE];  // announced digest of the share being assembled; once
                                        // complete, the digest it was verified to have
    float *key_cache;                   // (seq_len, ng * head_size)
    float *value_cache;                 // (seq_len, ng * head_size)
    tpfed_attention_unit *att_units;    // (ng) views into shard, set once it is complete
    tpfed_mlp_unit *mlp_units;          // (nr) views into shard, set once it is complete
    const float *rope_freq;             // (head_size/2) in shard (flag ROPE_TABLE), else NULL
    uint32_t window;                    // sliding window from the share (flag WINDOW), else 0
    uint32_t n_ctx;                     // rows appended by Stage KV (non-causal attention)
} tpfed_peer_layer;

typedef struct {
    uint32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_size, group_size, seq_len;
    float norm_eps, rope_theta;
    uint32_t flags;                     // ShareFlag bits of every share (ASSIGN.flags)
} geometry;

struct tpfed_peer {
    const tpfed_hal *hal;
    const tpfed_device_info *info;
    uint8_t device_class, transports;
    uint16_t max_groups, max_ranges;
    uint32_t max_frame;
    uint8_t *arena;             // 8-aligned; this struct sits at its start
    size_t arena_size;
    size_t arena_fixed;         // this struct + the transmit buffer
    size_t arena_used;          // fixed + current assignment
    size_t arena_laid;          // end of what is laid out: the assignment, or after it ended
                                // the layer table and shares kept from it (layers, n_entries)
    uint8_t *tx;                // frame being built (max_frame bytes)
    uint64_t int8_macs;
    uint8_t device_id;
    uint8_t assigned, ready;
    uint16_t session, seq;
    geometry g;
    uint32_t n_entries;
    tpfed_peer_layer *layers;
    float *out;                 // (dim) partial of the current ACTIVATION
    int8_t *xq_qs;              // (dim) activation values
    uint16_t *xq_d;             // (ceil(dim/32)) activation fp16 scales
    void *work;                 // scratch of attention_units_forward / mlp_units_forward
    size_t work_bytes;
    tpfed_peer_stats stats;
    // Authentication (see tpfed_peer.h).
    tpfed_hmac_key fed;         // the federation key K, as HMAC states
    uint8_t keyed;              // fed holds a key
    uint8_t provisionable;      // takes a PROVISION while !keyed
    uint8_t provisioned;        // the key came from PROVISION (a repeat of it is ACKed again)
    uint8_t hs_pending;         // a CHALLENGE was answered; its CONFIRM may come
    uint8_t hs_nonce_c[TPFED_NONCE_SIZE], hs_nonce_p[TPFED_NONCE_SIZE];
    uint16_t hs_session;
    uint8_t hs_device;
    uint8_t cur_proof_c[TPFED_PROOF_SIZE];   // the CONFIRM that made the current session
    tpfed_auth_session sess;    // the established session (sess.established)
    uint32_t last_rx_ms;        // when the session last took an authenticated frame
};

static void build_units(const tpfed_peer *p, tpfed_peer_layer *L);
static tpfed_peer_layer *find_layer(tpfed_peer *p, uint32_t layer);
static void send_ready_if_all(tpfed_peer *p, uint8_t dst);

// -------------------------------------------------------------------------------- sizes

static uint64_t pad4(uint64_t n) { return (n + 3u) & ~(uint64_t)3u; }
static uint32_t nblocks(uint32_t n) { return n / TPFED_Q8_BLOCK + (n % TPFED_Q8_BLOCK != 0); }

// Checked 64-bit arithmetic: *ok drops to 0 on overflow (the result is then meaningless).
static uint64_t mul64(uint64_t a, uint64_t b, int *ok) {
    if (a && b > UINT64_MAX / a) *ok = 0;
    return a * b;
}
static uint64_t add64(uint64_t a, uint64_t b, int *ok) {
    if (b > UINT64_MAX - a) *ok = 0;
    return a + b;
}

// Bytes of one Q8_0 matrix in a share: int8 values, then fp16 scales, each padded to 4.
static uint64_t q8_bytes(uint64_t rows, uint32_t cols, int *ok) {
    uint64_t v = mul64(rows, cols, ok), d = mul64(mul64(2u, rows, ok), nblocks(cols), ok);
    if (v > UINT64_MAX - 3u || d > UINT64_MAX - 3u) *ok = 0;
    return add64(pad4(v), pad4(d), ok);
}

static int gated(uint32_t flags) { return !(flags & TPFED_SHARE_PLAIN_MLP); }

// Bytes of the sections after the group/range tables that flags add (window, RoPE table).
static uint64_t extras_bytes(uint32_t head_size, uint32_t flags) {
    return ((flags & TPFED_SHARE_WINDOW) ? 4u : 0u) +
           ((flags & TPFED_SHARE_ROPE_TABLE) ? 2u * (uint64_t)head_size : 0u);
}

// The one share-size formula (share.py's layout, flags included). Ranges come as u32 pairs,
// native (ranges32) or raw little-endian from a frame (ranges_le).
static uint64_t share_bytes(uint32_t dim, uint32_t head_size, uint32_t group_size, uint32_t n_groups,
                            const uint32_t *ranges32, const uint8_t *ranges_le, uint32_t n_ranges,
                            uint32_t flags) {
    int ok = 1;
    uint64_t gq = (uint64_t)group_size * head_size;
    if (gq > UINT32_MAX) return 0;   // wo is a (dim, gq) matrix: gq counts columns
    uint64_t n = TPFED_SHARE_HEADER_SIZE + pad4(2u * (uint64_t)n_groups) + 8u * (uint64_t)n_ranges;
    n = add64(n, extras_bytes(head_size, flags), &ok);
    uint64_t per_group = add64(q8_bytes(gq, dim, &ok), mul64(2u, q8_bytes(head_size, dim, &ok), &ok), &ok);
    per_group = add64(per_group, q8_bytes(dim, (uint32_t)gq, &ok), &ok);
    if (flags & TPFED_SHARE_QKV_BIAS)
        per_group = add64(per_group, mul64(4u, gq + 2u * (uint64_t)head_size, &ok), &ok);
    n = add64(n, mul64(n_groups, per_group, &ok), &ok);
    uint64_t n_in = gated(flags) ? 2u : 1u;   // w1 (and w3) rows per range
    for (uint32_t r = 0; r < n_ranges; r++) {
        uint32_t a = ranges32 ? ranges32[2 * r] : tpfed_rd_u32(ranges_le + 8 * r);
        uint32_t b = ranges32 ? ranges32[2 * r + 1] : tpfed_rd_u32(ranges_le + 8 * r + 4);
        if (b < a) return 0;
        uint64_t m = add64(mul64(n_in, q8_bytes(b - a, dim, &ok), &ok), q8_bytes(dim, b - a, &ok), &ok);
        if (flags & TPFED_SHARE_MLP_BIAS) m = add64(m, mul64(4u * n_in, b - a, &ok), &ok);
        n = add64(n, m, &ok);
    }
    return ok ? n : 0;
}

uint64_t tpfed_share_bytes(uint32_t dim, uint32_t head_size, uint32_t group_size,
                           uint32_t n_groups, const uint32_t *ranges, uint32_t n_ranges) {
    return tpfed_share_bytes_flags(dim, head_size, group_size, n_groups, ranges, n_ranges, 0);
}

uint64_t tpfed_share_bytes_flags(uint32_t dim, uint32_t head_size, uint32_t group_size,
                                 uint32_t n_groups, const uint32_t *ranges, uint32_t n_ranges,
                                 uint32_t flags) {
    if (n_ranges && !ranges) return 0;
    return share_bytes(dim, head_size, group_size, n_groups, ranges, NULL, n_ranges, flags);
}

// -------------------------------------------------------------------------------- arena

// Lays out blocks, 8-aligned, from `used` on; only counts (in 64-bit) unless base is set.
typedef struct {
    uint8_t *base;
    uint64_t used;
    int ok;
} arena_plan;

static void *take(arena_plan *a, uint64_t n) {
    uint64_t at = add64(a->used, 7u, &a->ok) & ~(uint64_t)7u;
    a->used = add64(at, n, &a->ok);
    return a->base && a->ok ? a->base + (size_t)at : NULL;
}

static size_t align8(size_t n) { return (n + 7u) & ~(size_t)7u; }

// -------------------------------------------------------------------------------- output

static uint8_t my_src(const tpfed_peer *p) {
    return p->device_id != TPFED_BROADCAST ? p->device_id : 0xFE;
}

static uint8_t *payload_buf(tpfed_peer *p) { return p->tx + TPFED_HEADER_SIZE; }
// Payload room of every frame, both ways: the AUTH trailer always fits.
static size_t payload_cap(const tpfed_peer *p) { return p->max_frame - TPFED_AUTH_FRAME_OVERHEAD; }

// The payload is already at tx + TPFED_HEADER_SIZE; seal it with session s (header, counter,
// tag, CRC) and send.
static void send_sealed(tpfed_peer *p, tpfed_auth_session *s, uint8_t type, uint8_t src,
                        uint8_t dst, uint16_t seq, size_t payload_len) {
    tpfed_header_t h;
    memset(&h, 0, sizeof h);
    h.type = type;
    h.src = src;
    h.dst = dst;
    h.seq = seq;
    size_t frame_len = 0;
    if (tpfed_auth_session_finish(s, p->tx, p->max_frame, &h, payload_len, &frame_len) != TPFED_OK)
        return;
    p->hal->send_frame(p->hal->ctx, p->tx, (uint32_t)frame_len);
    p->stats.frames_out++;
}

// A frame of the current session (sealed with Ks); nothing without a session.
static void send_frame(tpfed_peer *p, uint8_t type, uint8_t dst, uint16_t seq, size_t payload_len) {
    if (p->sess.established) send_sealed(p, &p->sess, type, my_src(p), dst, seq, payload_len);
}

// An unauthenticated frame (handshake RESPONSE, PROVISION's ACK).
static void send_plain(tpfed_peer *p, uint8_t type, uint8_t src, uint8_t dst, uint16_t seq,
                       uint16_t session, size_t payload_len) {
    tpfed_header_t h;
    memset(&h, 0, sizeof h);
    h.type = type;
    h.src = src;
    h.dst = dst;
    h.seq = seq;
    h.session = session;
    size_t frame_len = 0;
    if (tpfed_frame_finish(p->tx, p->max_frame, &h, payload_len, &frame_len) != TPFED_OK) return;
    p->hal->send_frame(p->hal->ctx, p->tx, (uint32_t)frame_len);
    p->stats.frames_out++;
}

static uint16_t next_seq(tpfed_peer *p) {
    p->seq = (uint16_t)(p->seq + 1u);
    return p->seq;
}

static void send_error(tpfed_peer *p, uint8_t dst, uint16_t code, const char *text) {
    tpfed_error_t e;
    size_t n = strlen(text);
    e.code = code;
    e.text = (const uint8_t *)text;
    e.text_len = (uint8_t)(n > 255 ? 255 : n);
    size_t len = 0;
    if (tpfed_error_encode(payload_buf(p), payload_cap(p), &e, &len) != TPFED_OK) return;
    p->stats.errors_sent++;
    send_frame(p, TPFED_MSG_ERROR, dst, next_seq(p), len);
}

static void send_ack(tpfed_peer *p, uint8_t dst, uint16_t acked_seq, uint8_t acked_type) {
    tpfed_ack_t a = {acked_seq, acked_type, NULL, 0};
    size_t len = 0;
    if (tpfed_ack_encode(payload_buf(p), payload_cap(p), &a, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_ACK, dst, next_seq(p), len);
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

// Decimal of a 64-bit value (printf's %llu is missing from some embedded C libraries).
static const char *dec(char buf[21], uint64_t v) {
    char *s = buf + 20;
    *s = 0;
    do {
        *--s = (char)('0' + (int)(v % 10u));
        v /= 10u;
    } while (v);
    return s;
}

static uint32_t clamp32(uint64_t v) { return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v; }

// -------------------------------------------------------------------------------- init

// int8 multiply-accumulates per second of matmul_q8_0_f32, in the free arena as scratch.
static uint64_t measure_macs(tpfed_peer *p) {
    size_t room = p->arena_size - p->arena_fixed;
    size_t cols = 256, rows = 16;
    size_t need = rows * cols + 2u * rows * 8u + cols + 16u + 4u * rows + 64u;
    while (rows > 1 && need > room) {
        rows /= 2;
        need = rows * cols + 2u * rows * 8u + cols + 16u + 4u * rows + 64u;
    }
    if (need > room) return 0;
    arena_plan a = {p->arena, p->arena_fixed, 1};
    int8_t *wqs = (int8_t *)take(&a, rows * cols);
    uint16_t *wd = (uint16_t *)take(&a, 2u * rows * 8u);
    int8_t *xqs = (int8_t *)take(&a, cols);
    uint16_t *xd = (uint16_t *)take(&a, 16u);
    float *out = (float *)take(&a, 4u * rows);
    uint32_t seed = 12345u;
    for (size_t i = 0; i < rows * cols; i++) {
        seed = seed * 1664525u + 1013904223u;
        wqs[i] = (int8_t)(seed >> 24);
    }
    for (size_t i = 0; i < cols; i++) xqs[i] = (int8_t)(i * 37);
    for (size_t i = 0; i < rows * 8; i++) wd[i] = 0x2000;   // fp16 ~0.0078
    for (int i = 0; i < 8; i++) xd[i] = 0x3C00;             // fp16 1.0
    const tpfed_hal *hal = p->hal;
    uint32_t t0 = hal->millis(hal->ctx), elapsed = 0, reps = 0;
    while (reps < 3 || elapsed < 100u) {
        matmul_q8_0_f32(out, wqs, wd, xqs, xd, (int)rows, (int)cols);
        reps++;
        elapsed = hal->millis(hal->ctx) - t0;
        if (elapsed > 2000u) break;
    }
    if (elapsed == 0) elapsed = 1;
    return (uint64_t)rows * cols * reps * 1000u / elapsed;
}

static size_t fixed_bytes(uint32_t max_frame) {
    return align8(sizeof(struct tpfed_peer)) + align8(max_frame);
}

size_t tpfed_peer_arena_min(uint32_t max_frame) {
    if (max_frame < TPFED_PEER_MIN_FRAME || max_frame > TPFED_PEER_MAX_FRAME_LIMIT) return 0;
    return 7u + fixed_bytes(max_frame);
}

tpfed_peer *tpfed_peer_init(uint8_t *arena, size_t arena_size, const tpfed_peer_config *cfg) {
    if (!arena || !cfg || !cfg->hal || !cfg->hal->send_frame || !cfg->hal->millis ||
        !cfg->hal->random || !cfg->info ||
        !cfg->info->board || cfg->max_frame < TPFED_PEER_MIN_FRAME ||
        cfg->max_frame > TPFED_PEER_MAX_FRAME_LIMIT)
        return NULL;
    size_t skew = (8u - ((uintptr_t)arena & 7u)) & 7u;
    if (arena_size < skew || arena_size - skew < fixed_bytes(cfg->max_frame)) return NULL;
    tpfed_peer *p = (tpfed_peer *)(void *)(arena + skew);
    memset(p, 0, sizeof *p);
    p->hal = cfg->hal;
    p->info = cfg->info;
    p->device_class = cfg->device_class;
    p->transports = cfg->transports;
    p->max_frame = cfg->max_frame;
    p->max_groups = cfg->max_groups > 255 ? 255 : cfg->max_groups;
    p->max_ranges = cfg->max_ranges > 255 ? 255 : cfg->max_ranges;
    p->arena = arena + skew;
    p->arena_size = arena_size - skew;
    p->tx = p->arena + align8(sizeof *p);
    p->arena_fixed = p->arena_used = p->arena_laid = fixed_bytes(cfg->max_frame);
    p->device_id = TPFED_BROADCAST;
    if (cfg->key) {
        tpfed_hmac_key_init(&p->fed, cfg->key, TPFED_KEY_SIZE);
        p->keyed = 1;
    }
    p->provisionable = cfg->provision && !cfg->key;
    p->int8_macs = cfg->int8_macs ? cfg->int8_macs : measure_macs(p);
    return p;
}

static uint64_t announced_arena(const tpfed_peer *p) {
    size_t free_bytes = p->arena_size - p->arena_fixed;
    return free_bytes > TPFED_PEER_WORK_RESERVE ? free_bytes - TPFED_PEER_WORK_RESERVE : 0;
}

// -------------------------------------------------------------------------------- getters

const tpfed_peer_stats *tpfed_peer_get_stats(const tpfed_peer *p) { return &p->stats; }
int tpfed_peer_state(const tpfed_peer *p) {
    return p->ready ? TPFED_PEER_READY : p->assigned ? TPFED_PEER_ASSIGNED : TPFED_PEER_IDLE;
}
uint16_t tpfed_peer_session(const tpfed_peer *p) { return p->session; }
uint8_t tpfed_peer_device_id(const tpfed_peer *p) { return p->device_id; }
int tpfed_peer_keyed(const tpfed_peer *p) { return p->keyed; }
int tpfed_peer_in_session(const tpfed_peer *p) { return p->sess.established; }
uint64_t tpfed_peer_int8_macs(const tpfed_peer *p) { return p->int8_macs; }
size_t tpfed_peer_arena_size(const tpfed_peer *p) { return p->arena_size; }
size_t tpfed_peer_arena_used(const tpfed_peer *p) { return p->arena_used; }
uint32_t tpfed_peer_layers_assigned(const tpfed_peer *p) { return p->assigned ? p->n_entries : 0; }
uint32_t tpfed_peer_layers_held(const tpfed_peer *p) {
    uint32_t n = 0;
    for (uint32_t i = 0; p->assigned && i < p->n_entries; i++) n += p->layers[i].complete;
    return n;
}
uint32_t tpfed_peer_shares_kept(const tpfed_peer *p) {
    uint32_t n = 0;
    for (uint32_t i = 0; p->layers && i < p->n_entries; i++) n += p->layers[i].complete;
    return n;
}

// -------------------------------------------------------------------------------- HELLO

static void on_hello(tpfed_peer *p, const tpfed_header_t *h) {
    const tpfed_device_info *in = p->info;
    tpfed_hello_t m;
    memset(&m, 0, sizeof m);
    size_t name_len = strlen(in->board);
    m.device_class = p->device_class;
    m.name = (const uint8_t *)in->board;
    m.name_len = (uint8_t)(name_len > 64 ? 64 : name_len);
    m.ram_kb = clamp32(in->ram_bytes / 1024u);
    m.psram_kb = in->psram_bytes / 1024u;
    m.flash_kb = in->flash_bytes / 1024u;
    m.cpu_mhz = (uint16_t)(in->cpu_hz / 1000000u);
    m.cores = in->cores;
    m.features = (uint8_t)((in->has_fpu ? TPFED_FEAT_FPU : 0) | (in->has_simd ? TPFED_FEAT_SIMD : 0));
    m.int8_macs = p->int8_macs;
    m.battery_pct = TPFED_BATTERY_UNKNOWN;
    m.temperature_dc = TPFED_TEMPERATURE_UNKNOWN;
    m.transports = p->transports;
    m.max_frame = (uint16_t)p->max_frame;
    m.arena_kb = clamp32(announced_arena(p) / 1024u);
    size_t len = 0;
    if (tpfed_hello_encode(payload_buf(p), payload_cap(p), &m, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_HELLO, h->src, next_seq(p), len);
}

// -------------------------------------------------------------------------------- ASSIGN

typedef struct {
    uint16_t layer;
    uint8_t ng, nr;
    const uint8_t *groups;   // raw u16 LE
    const uint8_t *ranges;   // raw (u32 start, u32 end) LE
    const uint8_t *sha256;   // the share wanted (TPFED_SHA256_SIZE bytes)
} entry_view;

// Entries were checked by tpfed_payload_validate (the frame decoder) before we get here.
static const uint8_t *read_entry(const uint8_t *q, entry_view *e) {
    e->layer = tpfed_rd_u16(q);
    e->ng = q[2];
    e->groups = q + 3;
    q += 3 + 2u * e->ng;
    e->nr = q[0];
    e->ranges = q + 1;
    q += 1 + 8u * e->nr;
    e->sha256 = q;
    return q + TPFED_SHA256_SIZE;
}

static uint32_t range_start(const entry_view *e, int r) { return tpfed_rd_u32(e->ranges + 8 * r); }
static uint32_t range_end(const entry_view *e, int r) { return tpfed_rd_u32(e->ranges + 8 * r + 4); }

static uint64_t entry_share_bytes(const geometry *g, const entry_view *e) {
    return share_bytes(g->dim, g->head_size, g->group_size, e->ng, NULL, e->ranges, e->nr, g->flags);
}

// The rules of shard.py's check_groups/check_ranges, and the layer index: BAD_PAYLOAD.
static int entry_error(const geometry *g, const entry_view *e, char *msg, size_t cap) {
    if (e->layer >= g->n_layers) {
        snprintf(msg, cap, "ASSIGN names layer %u twice or out of range", (unsigned)e->layer);
        return TPFED_ERR_BAD_PAYLOAD;
    }
    for (int i = 0; i < e->ng; i++) {
        uint16_t k = tpfed_rd_u16(e->groups + 2 * i);
        if (k >= g->n_kv_heads || (i && k <= tpfed_rd_u16(e->groups + 2 * (i - 1)))) {
            snprintf(msg, cap, "layer %u: KV groups must be strictly ascending and below %u",
                     (unsigned)e->layer, (unsigned)g->n_kv_heads);
            return TPFED_ERR_BAD_PAYLOAD;
        }
    }
    uint32_t prev_end = 0;
    for (int r = 0; r < e->nr; r++) {
        uint32_t a = range_start(e, r), b = range_end(e, r);
        if (!(a < b && b <= g->hidden_dim) || a % TPFED_Q8_BLOCK ||
            (b % TPFED_Q8_BLOCK && b != g->hidden_dim) || a < prev_end) {
            snprintf(msg, cap, "layer %u: MLP range [%lu, %lu) is empty, unaligned, overlapping "
                     "or outside [0, %lu)", (unsigned)e->layer, (unsigned long)a, (unsigned long)b,
                     (unsigned long)g->hidden_dim);
            return TPFED_ERR_BAD_PAYLOAD;
        }
        prev_end = b;
    }
    return 0;
}

// More groups or ranges than this peer takes: UNSUPPORTED.
static int entry_counts(const tpfed_peer *p, const entry_view *e, char *msg, size_t cap) {
    if (e->ng > p->max_groups || e->nr > p->max_ranges) {
        snprintf(msg, cap, "layer %u: %u KV groups and %u MLP ranges, this peer takes at most %u and %u",
                 (unsigned)e->layer, (unsigned)e->ng, (unsigned)e->nr, (unsigned)p->max_groups,
                 (unsigned)p->max_ranges);
        return TPFED_ERR_UNSUPPORTED;
    }
    return 0;
}

static uint32_t widest_range(const entry_view *e) {
    uint32_t widest = 0;
    for (int r = 0; r < e->nr; r++)
        if (range_end(e, r) - range_start(e, r) > widest) widest = range_end(e, r) - range_start(e, r);
    return widest;
}

// What fits the arena but not what the kernels can index (int rows * cols) or WEIGHTS can
// carry (u32 share size): UNSUPPORTED.
static int entry_limits(const geometry *g, const entry_view *e, char *msg, size_t cap) {
    uint64_t gq = (uint64_t)g->group_size * g->head_size;
    if ((e->ng && (gq * g->dim > INT_LIMIT ||
                   (uint64_t)e->ng * g->head_size * g->seq_len > INT_LIMIT)) ||
        (uint64_t)widest_range(e) * g->dim > INT_LIMIT || entry_share_bytes(g, e) > UINT32_MAX) {
        snprintf(msg, cap, "layer %u: a matrix or share of this assignment is too large for this peer",
                 (unsigned)e->layer);
        return TPFED_ERR_UNSUPPORTED;
    }
    return 0;
}

static uint64_t pad8(uint64_t n, int *ok) {
    if (n > UINT64_MAX - 7u) *ok = 0;
    return (n + 7u) & ~(uint64_t)7u;
}

static int bit_of(const uint8_t *bits, uint32_t i) { return bits && ((bits[i >> 3] >> (i & 7u)) & 1u); }

// Lays out an assignment from arena_fixed on: counts its bytes (base NULL) or places it (base
// = the arena; every entry already checked and the total known to fit). Order: the layer
// table, per entry its group/range tables, granule bitmap, unit views and KV caches, the
// compute buffers, then the shares, each padded to 8 bytes: first those to come (in entry
// order), last, from *kept_at on, those of the entries set in held (one bit per entry, or
// NULL: none), which the caller moves there as one block and attaches (attach_kept). The total
// does not depend on held. Returns the arena offset past it; *ok drops to 0 on 64-bit overflow.
static uint64_t lay_out(tpfed_peer *p, const geometry *g, const tpfed_assign_t *as, uint64_t work,
                        uint8_t *base, const uint8_t *held, uint64_t *kept_at, int *ok) {
    arena_plan a = {base, p->arena_fixed, 1};
    tpfed_peer_layer *layers = (tpfed_peer_layer *)take(&a, sizeof(tpfed_peer_layer) * (uint64_t)as->n_entries);
    const uint8_t *q = as->entries;
    for (uint32_t i = 0; i < as->n_entries; i++) {
        entry_view e;
        q = read_entry(q, &e);
        tpfed_peer_layer L;
        memset(&L, 0, sizeof L);
        uint64_t size = entry_share_bytes(g, &e);
        if (size == 0) a.ok = 0;
        uint64_t granules = size / GRANULE + (size % GRANULE != 0);
        L.layer = e.layer;
        L.ng = e.ng;
        L.nr = e.nr;
        L.groups = (uint16_t *)take(&a, 2u * (uint64_t)e.ng);
        L.ranges = (uint32_t *)take(&a, 8u * (uint64_t)e.nr);
        L.shard_size = (uint32_t)size;
        L.n_granules = (uint32_t)granules;
        L.bitmap = (uint32_t *)take(&a, 4u * (granules / 32u + 1u));
        uint64_t kv = 4u * (uint64_t)e.ng * g->head_size * g->seq_len;
        if (e.ng) {
            L.att_units = (tpfed_attention_unit *)take(&a, sizeof(tpfed_attention_unit) * (uint64_t)e.ng);
            L.key_cache = (float *)take(&a, kv);
            L.value_cache = (float *)take(&a, kv);
        }
        if (e.nr) L.mlp_units = (tpfed_mlp_unit *)take(&a, sizeof(tpfed_mlp_unit) * (uint64_t)e.nr);
        if (base && a.ok) {
            for (int j = 0; j < e.ng; j++) L.groups[j] = tpfed_rd_u16(e.groups + 2 * j);
            for (int r = 0; r < e.nr; r++) {
                L.ranges[2 * r] = range_start(&e, r);
                L.ranges[2 * r + 1] = range_end(&e, r);
            }
            memcpy(L.sha256, e.sha256, TPFED_SHA256_SIZE);
            memset(L.bitmap, 0, 4u * (size_t)(granules / 32u + 1u));
            if (e.ng) {
                memset(L.key_cache, 0, (size_t)kv);
                memset(L.value_cache, 0, (size_t)kv);
            }
            layers[i] = L;
        }
    }
    float *out = (float *)take(&a, 4u * (uint64_t)g->dim);
    int8_t *xq_qs = (int8_t *)take(&a, pad4(g->dim));
    uint16_t *xq_d = (uint16_t *)take(&a, 2u * (uint64_t)nblocks(g->dim));
    void *w = take(&a, work);
    for (int kept = 0; kept < 2; kept++) {
        if (kept) *kept_at = pad8(a.used, &a.ok);
        q = as->entries;
        for (uint32_t i = 0; i < as->n_entries; i++) {
            entry_view e;
            q = read_entry(q, &e);
            if (bit_of(held, i) != kept) continue;
            uint8_t *shard = take(&a, pad8(entry_share_bytes(g, &e), &a.ok));
            if (base && a.ok) layers[i].shard = shard;
        }
    }
    if (base && a.ok) {
        p->layers = layers;
        p->out = out;
        p->xq_qs = xq_qs;
        p->xq_d = xq_d;
        p->work = w;
        p->work_bytes = (size_t)work;
    }
    if (!a.ok) *ok = 0;
    return a.used;
}

// 1 if the share s (size bytes; complete, its content checked when it came in) is the one
// entry e of geometry g asks for: its header and tables say so.
static int share_is(const geometry *g, const entry_view *e, const uint8_t *s, uint32_t size) {
    tpfed_share_header_t h;
    size_t used;
    if (size != entry_share_bytes(g, e) || tpfed_share_header_decode(s, size, &h, &used) != TPFED_OK)
        return 0;
    if (h.version != TPFED_SHARE_VERSION || h.header_size != TPFED_SHARE_HEADER_SIZE ||
        h.total != size || h.layer != e->layer || h.dim != g->dim || h.hidden_dim != g->hidden_dim ||
        h.head_size != g->head_size || h.group_size != g->group_size ||
        h.n_kv_heads != g->n_kv_heads || h.flags != g->flags || h.n_groups != e->ng ||
        h.n_ranges != e->nr)
        return 0;
    uint64_t off = TPFED_SHARE_HEADER_SIZE;
    if (e->ng && memcmp(s + off, e->groups, 2u * (size_t)e->ng) != 0) return 0;
    off += pad4(2u * e->ng);
    return !e->nr || memcmp(s + off, e->ranges, 8u * (size_t)e->nr) == 0;
}

// Which entries of the new assignment name (by sha256) a share this peer holds complete (of
// the assignment in place, or kept since it ended): those shares are marked keep, their
// entries set in held. Returns their bytes, each padded to 8.
static uint64_t match_kept(tpfed_peer *p, const geometry *g, const tpfed_assign_t *as, uint8_t *held) {
    uint32_t n_old = p->layers ? p->n_entries : 0;
    uint64_t kept = 0;
    int ok = 1;
    for (uint32_t j = 0; j < n_old; j++) p->layers[j].keep = 0;
    const uint8_t *q = as->entries;
    for (uint32_t i = 0; i < as->n_entries; i++) {
        entry_view e;
        q = read_entry(q, &e);
        for (uint32_t j = 0; j < n_old; j++) {
            tpfed_peer_layer *L = &p->layers[j];
            // complete: hashed and checked against L->sha256 when its last granule came in
            if (!L->complete || L->keep || L->layer != e.layer ||
                memcmp(L->sha256, e.sha256, TPFED_SHA256_SIZE) != 0)
                continue;
            if (share_is(g, &e, L->shard, L->shard_size)) {
                L->keep = 1;
                held[i >> 3] |= (uint8_t)(1u << (i & 7u));
                kept += pad8(L->shard_size, &ok);
            }
            break;
        }
    }
    return kept;
}

// First of two moves of the shares to keep: to the top of the arena (offset top, 8-aligned),
// packed in the order they lie in. The highest goes first, each up (or nowhere): the shares
// above one and the packed ones fit between it and top, so its place holds nothing still to
// be moved; the layer table, below every share, is read throughout.
static void pack_kept(tpfed_peer *p, uint64_t top) {
    uint8_t *below = p->arena + top;
    uint64_t at = top;
    for (;;) {
        tpfed_peer_layer *next = NULL;
        for (uint32_t j = 0; j < p->n_entries; j++) {
            tpfed_peer_layer *L = &p->layers[j];
            if (L->keep && L->shard < below && (!next || L->shard > next->shard)) next = L;
        }
        if (!next) return;
        at -= align8(next->shard_size);
        memmove(p->arena + at, next->shard, next->shard_size);
        below = next->shard;
    }
}

// The kept shares, laid out as one block from offset at to end by lay_out and moved there,
// become their (new) layers' shares, complete; each names its layer in its header.
static void attach_kept(tpfed_peer *p, uint64_t at, uint64_t end) {
    while (at < end) {
        tpfed_share_header_t h;
        size_t used;
        uint8_t *s = p->arena + at;
        tpfed_peer_layer *L = NULL;
        if (tpfed_share_header_decode(s, TPFED_SHARE_HEADER_SIZE, &h, &used) == TPFED_OK)
            L = find_layer(p, h.layer);
        if (!L) return;   // (cannot happen: every share there was matched to its entry)
        L->shard = s;
        for (uint32_t k = 0; k < L->n_granules; k++) L->bitmap[k >> 5] |= 1u << (k & 31u);
        L->have = L->n_granules;
        L->started = 1;
        build_units(p, L);
        L->complete = 1;
        at += align8(L->shard_size);
    }
}

// 1 if some layer is named twice. Uses the free arena past the current assignment as a bitmap
// over layer indices when it has room, else compares pairs.
static int repeated_layer(tpfed_peer *p, const tpfed_assign_t *as, uint32_t n_layers, uint16_t *which) {
    size_t bits = ((size_t)n_layers + 7u) / 8u;
    const uint8_t *q = as->entries;
    entry_view e, o;
    if (p->arena_size - p->arena_laid >= bits) {
        uint8_t *seen = p->arena + p->arena_laid;   // past the shares kept too
        memset(seen, 0, bits);
        for (uint32_t i = 0; i < as->n_entries; i++) {
            q = read_entry(q, &e);
            if (seen[e.layer >> 3] & (1u << (e.layer & 7u))) {
                *which = e.layer;
                return 1;
            }
            seen[e.layer >> 3] |= (uint8_t)(1u << (e.layer & 7u));
        }
        return 0;
    }
    for (uint32_t i = 0; i < as->n_entries; i++) {
        q = read_entry(q, &e);
        const uint8_t *q2 = as->entries;
        for (uint32_t j = 0; j < i; j++) {
            q2 = read_entry(q2, &o);
            if (o.layer == e.layer) {
                *which = e.layer;
                return 1;
            }
        }
    }
    return 0;
}

static void on_assign(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_assign_t a;
    char msg[160], n1[21], n2[21];
    if (tpfed_assign_decode(pl, h->length, &a) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (!a.dim || !a.hidden_dim || !a.n_layers || !a.n_heads || !a.n_kv_heads || !a.seq_len ||
        a.dim % a.n_heads || a.n_heads % a.n_kv_heads || a.hidden_dim > INT_LIMIT) {
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
    if (biggest > payload_cap(p)) {
        snprintf(msg, sizeof msg, "dim %u needs frames of %lu bytes, this board takes %u",
                 (unsigned)a.dim, (unsigned long)(biggest + TPFED_AUTH_FRAME_OVERHEAD),
                 (unsigned)p->max_frame);
        send_error(p, h->src, TPFED_ERR_UNSUPPORTED, msg);
        return;
    }
    uint32_t act = (uint32_t)a.flags >> TPFED_SHARE_ACT_SHIFT;
    if ((a.flags & ~(uint32_t)TPFED_SHARE_FLAGS_KNOWN) || act > TPFED_SHARE_ACT_MAX ||
        ((a.flags & TPFED_SHARE_NO_ROPE) && (a.flags & TPFED_SHARE_ROPE_TABLE)) ||
        ((a.flags & TPFED_SHARE_ROPE_TABLE) && (a.dim / a.n_heads) % 2u)) {
        snprintf(msg, sizeof msg, "ASSIGN share flags 0x%x are not ones this peer knows",
                 (unsigned)a.flags);
        send_error(p, h->src, TPFED_ERR_UNSUPPORTED, msg);
        return;
    }
    geometry g;
    g.flags = a.flags;
    g.dim = a.dim;
    g.hidden_dim = a.hidden_dim;
    g.n_layers = a.n_layers;
    g.n_heads = a.n_heads;
    g.n_kv_heads = a.n_kv_heads;
    g.head_size = a.dim / a.n_heads;
    g.group_size = a.n_heads / a.n_kv_heads;
    g.seq_len = a.seq_len;
    g.norm_eps = a.norm_eps;
    g.rope_theta = a.rope_theta;
    // Nothing of the current assignment is touched until the new one is known to be valid,
    // taken and to fit: first what is malformed, then what this peer does not take, then size.
    const uint8_t *q = a.entries;
    entry_view e;
    for (uint32_t i = 0; i < a.n_entries; i++) {
        q = read_entry(q, &e);
        int code = entry_error(&g, &e, msg, sizeof msg);
        if (code) {
            send_error(p, h->src, (uint16_t)code, msg);
            return;
        }
    }
    uint16_t twice = 0;
    if (repeated_layer(p, &a, g.n_layers, &twice)) {
        snprintf(msg, sizeof msg, "ASSIGN names layer %u twice or out of range", (unsigned)twice);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    uint32_t max_w = 0;
    int any_groups = 0;
    q = a.entries;
    for (uint32_t i = 0; i < a.n_entries; i++) {
        q = read_entry(q, &e);
        int code = entry_counts(p, &e, msg, sizeof msg);
        if (code) {
            send_error(p, h->src, (uint16_t)code, msg);
            return;
        }
        if (e.ng) any_groups = 1;
        if (widest_range(&e) > max_w) max_w = widest_range(&e);
    }
    uint64_t work = 0;
    if (any_groups)
        work = attention_units_scratch_bytes((int)g.dim, (int)g.head_size, (int)g.group_size, (int)g.seq_len);
    if (max_w) {
        // A range wider than 2^30 columns is refused below (entry_limits) if it fits at all.
        uint64_t mlp = mlp_units_scratch_bytes((int)g.dim, (int)(max_w > 0x3FFFFFFFu ? 0x3FFFFFFFu : max_w));
        if (mlp > work) work = mlp;
    }
    int ok = 1;
    uint64_t kept_at = 0;
    uint64_t end = lay_out(p, &g, &a, work, NULL, NULL, &kept_at, &ok);
    if (!ok || end > p->arena_size) {
        snprintf(msg, sizeof msg, "assignment needs %s bytes of arena (weights, KV cache for %u "
                 "positions, buffers), this peer has %s", ok ? dec(n1, end - p->arena_fixed) : "more than 2^64",
                 (unsigned)a.seq_len, dec(n2, p->arena_size - p->arena_fixed));
        send_error(p, h->src, TPFED_ERR_OUT_OF_MEMORY, msg);
        return;
    }
    q = a.entries;
    for (uint32_t i = 0; i < a.n_entries; i++) {
        q = read_entry(q, &e);
        int code = entry_limits(&g, &e, msg, sizeof msg);
        if (code) {
            send_error(p, h->src, (uint16_t)code, msg);
            return;
        }
    }
    // Commit. The shares held (complete, verified) that entries name by their sha256 are
    // kept: moved, as one block, to the end of the new layout (pack_kept, then one memmove
    // down; the layout fits, so both moves do) before the rest is laid out over the old
    // assignment. Every other share is dropped; KV caches start empty. The ACK says which are
    // held (its bitmap is built at the end of the transmit buffer, past where the ACK goes).
    uint32_t nb = (a.n_entries + 7u) / 8u;
    uint8_t *held = p->tx + p->max_frame - nb;
    memset(held, 0, nb);
    uint64_t kept = match_kept(p, &g, &a, held);
    lay_out(p, &g, &a, work, NULL, held, &kept_at, &ok);
    if (kept) {
        uint64_t top = (uint64_t)p->arena_size & ~(uint64_t)7u;
        pack_kept(p, top);
        memmove(p->arena + kept_at, p->arena + (top - kept), (size_t)kept);
    }
    p->g = g;
    p->n_entries = a.n_entries;
    p->arena_used = p->arena_laid = (size_t)lay_out(p, &g, &a, work, p->arena, held, &kept_at, &ok);
    attach_kept(p, kept_at, kept_at + kept);
    p->assigned = 1;
    p->ready = 0;
    tpfed_ack_t ack = {h->seq, TPFED_MSG_ASSIGN, held, (uint16_t)nb};
    size_t len = 0;
    if (tpfed_ack_encode(payload_buf(p), payload_cap(p), &ack, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_ACK, h->src, next_seq(p), len);
    if (kept) send_ready_if_all(p, h->src);   // every share held already: READY at once
}

// -------------------------------------------------------------------------------- WEIGHTS

// View of the (rows, cols) Q8_0 matrix at base + *off; moves *off past it.
static tpfed_q8_matrix q8_at(const uint8_t *base, uint64_t *off, uint32_t rows, uint32_t cols) {
    int ok = 1;
    tpfed_q8_matrix m;
    m.qs = (const int8_t *)(base + *off);
    m.d = (const uint16_t *)(base + *off + pad4((uint64_t)rows * cols));
    m.rows = (int)rows;
    m.cols = (int)cols;
    *off += q8_bytes(rows, cols, &ok);
    return m;
}

// 0 if the matrix at *off has zero padding and finite scales; 1 bad padding, 2 bad scale.
static int check_matrix(const uint8_t *s, uint64_t *off, uint32_t rows, uint32_t cols) {
    uint64_t nq = (uint64_t)rows * cols, nd = (uint64_t)rows * nblocks(cols), at = *off;
    for (uint64_t i = at + nq; i < at + pad4(nq); i++)
        if (s[i]) return 1;
    at += pad4(nq);
    for (uint64_t i = 0; i < nd; i++)
        if ((tpfed_rd_u16(s + at + 2 * i) & 0x7C00u) == 0x7C00u) return 2;
    for (uint64_t i = at + 2u * nd; i < at + pad4(2u * nd); i++)
        if (s[i]) return 1;
    *off = at + pad4(2u * nd);
    return 0;
}

// 0 if the n float32 at *off are finite (moves *off past them), 3 if not.
static int check_floats(const uint8_t *s, uint64_t *off, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if ((tpfed_rd_u32(s + *off + 4u * i) & 0x7F800000u) == 0x7F800000u) return 3;
    *off += 4u * n;
    return 0;
}

// Validate a complete share against the assignment (shard.py's parse_layer_share rules).
static int shard_error(const tpfed_peer *p, const tpfed_peer_layer *L, char *msg, size_t cap) {
    const uint8_t *s = L->shard;
    const geometry *g = &p->g;
    uint32_t gq = g->group_size * g->head_size;
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
    if (h.dim != g->dim || h.hidden_dim != g->hidden_dim || h.head_size != g->head_size ||
        h.group_size != g->group_size || h.n_kv_heads != g->n_kv_heads) {
        snprintf(msg, cap, "shard of layer %u: layer share is for another model", (unsigned)L->layer);
        return 1;
    }
    if (h.flags != g->flags) {
        snprintf(msg, cap, "shard of layer %u: share flags 0x%x, ASSIGN said 0x%x",
                 (unsigned)L->layer, (unsigned)h.flags, (unsigned)g->flags);
        return 1;
    }
    int same = h.layer == L->layer && h.n_groups == L->ng && h.n_ranges == L->nr;
    uint64_t off = TPFED_SHARE_HEADER_SIZE;
    for (int i = 0; same && i < L->ng; i++) same = tpfed_rd_u16(s + off + 2 * i) == L->groups[i];
    for (uint64_t i = off + 2u * L->ng; same && i < off + pad4(2u * L->ng); i++) same = s[i] == 0;
    off += pad4(2u * L->ng);
    for (int r = 0; same && r < L->nr; r++)
        same = tpfed_rd_u32(s + off + 8 * r) == L->ranges[2 * r] &&
               tpfed_rd_u32(s + off + 8 * r + 4) == L->ranges[2 * r + 1];
    off += 8u * L->nr;
    if (!same) {
        snprintf(msg, cap, "shard of layer %u does not hold what ASSIGN said", (unsigned)L->layer);
        return 1;
    }
    // Every matrix: zero padding after values and scales, finite fp16 scales; every float
    // (RoPE table, biases) finite.
    int status = 0;
    if (g->flags & TPFED_SHARE_WINDOW) off += 4u;
    if (g->flags & TPFED_SHARE_ROPE_TABLE) status = check_floats(s, &off, g->head_size / 2u);
    for (int i = 0; i < L->ng && !status; i++) {
        status = check_matrix(s, &off, gq, g->dim);
        if (!status) status = check_matrix(s, &off, g->head_size, g->dim);
        if (!status) status = check_matrix(s, &off, g->head_size, g->dim);
        if (!status) status = check_matrix(s, &off, g->dim, gq);
    }
    for (int r = 0; r < L->nr && !status; r++) {
        uint32_t w = L->ranges[2 * r + 1] - L->ranges[2 * r];
        status = check_matrix(s, &off, w, g->dim);
        if (!status && gated(g->flags)) status = check_matrix(s, &off, w, g->dim);
        if (!status) status = check_matrix(s, &off, g->dim, w);
    }
    if (g->flags & TPFED_SHARE_QKV_BIAS)
        for (int i = 0; i < L->ng && !status; i++) status = check_floats(s, &off, gq + 2u * g->head_size);
    if (g->flags & TPFED_SHARE_MLP_BIAS)
        for (int r = 0; r < L->nr && !status; r++)
            status = check_floats(s, &off, (L->ranges[2 * r + 1] - L->ranges[2 * r]) * (gated(g->flags) ? 2u : 1u));
    if (status == 1)
        snprintf(msg, cap, "shard of layer %u: layer share has non-zero padding bytes (corrupted)",
                 (unsigned)L->layer);
    else if (status == 2)
        snprintf(msg, cap, "shard of layer %u holds a non-finite fp16 scale", (unsigned)L->layer);
    else if (status == 3)
        snprintf(msg, cap, "shard of layer %u holds a non-finite bias or RoPE frequency",
                 (unsigned)L->layer);
    return status;
}

// float32 section of n values at base + *off (4-aligned: the shard is 8-aligned and every
// section starts on 4 bytes); moves *off past it.
static const float *f32_at(const uint8_t *base, uint64_t *off, uint64_t n) {
    const float *v = (const float *)(const void *)(base + *off);
    *off += 4u * n;
    return v;
}

// Point the layer's compute units at the matrices and biases of its (complete, checked)
// share, and take its window and RoPE table.
static void build_units(const tpfed_peer *p, tpfed_peer_layer *L) {
    uint32_t dim = p->g.dim, hs = p->g.head_size, gq = p->g.group_size * hs, flags = p->g.flags;
    uint64_t off = TPFED_SHARE_HEADER_SIZE + pad4(2u * L->ng) + 8u * L->nr;
    L->window = 0;
    L->rope_freq = NULL;
    L->n_ctx = 0;
    if (flags & TPFED_SHARE_WINDOW) {
        L->window = tpfed_rd_u32(L->shard + off);
        off += 4u;
    }
    if (flags & TPFED_SHARE_ROPE_TABLE) L->rope_freq = f32_at(L->shard, &off, hs / 2u);
    for (int i = 0; i < L->ng; i++) {
        tpfed_attention_unit *u = &L->att_units[i];
        u->wq = q8_at(L->shard, &off, gq, dim);
        u->wk = q8_at(L->shard, &off, hs, dim);
        u->wv = q8_at(L->shard, &off, hs, dim);
        u->wo = q8_at(L->shard, &off, dim, gq);
        u->bq = u->bk = u->bv = NULL;
    }
    for (int r = 0; r < L->nr; r++) {
        tpfed_mlp_unit *u = &L->mlp_units[r];
        uint32_t n = L->ranges[2 * r + 1] - L->ranges[2 * r];
        u->w1 = q8_at(L->shard, &off, n, dim);
        if (gated(flags)) {
            u->w3 = q8_at(L->shard, &off, n, dim);
        } else {
            memset(&u->w3, 0, sizeof u->w3);
        }
        u->w2 = q8_at(L->shard, &off, dim, n);
        u->b1 = u->b3 = NULL;
    }
    if (flags & TPFED_SHARE_QKV_BIAS) {
        for (int i = 0; i < L->ng; i++) {
            tpfed_attention_unit *u = &L->att_units[i];
            u->bq = f32_at(L->shard, &off, gq);
            u->bk = f32_at(L->shard, &off, hs);
            u->bv = f32_at(L->shard, &off, hs);
        }
    }
    if (flags & TPFED_SHARE_MLP_BIAS) {
        for (int r = 0; r < L->nr; r++) {
            tpfed_mlp_unit *u = &L->mlp_units[r];
            uint32_t n = L->ranges[2 * r + 1] - L->ranges[2 * r];
            u->b1 = f32_at(L->shard, &off, n);
            if (gated(flags)) u->b3 = f32_at(L->shard, &off, n);
        }
    }
}

static tpfed_peer_layer *find_layer(tpfed_peer *p, uint32_t layer) {
    for (uint32_t i = 0; i < p->n_entries; i++)
        if (p->layers[i].layer == layer) return &p->layers[i];
    return NULL;
}

// Forget what was received of the layer's share (a new one comes, or the last was bad).
static void restart_share(tpfed_peer *p, tpfed_peer_layer *L) {
    if (L->complete) p->ready = 0;
    L->complete = 0;
    L->started = 0;
    L->have = 0;
    memset(L->bitmap, 0, 4u * (size_t)(L->n_granules / 32u + 1u));
}

static void send_ready_if_all(tpfed_peer *p, uint8_t dst) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < p->n_entries; i++) {
        if (!p->layers[i].complete) return;
        total += p->layers[i].shard_size;
    }
    p->ready = 1;
    tpfed_ready_t r = {clamp32(total), clamp32(p->arena_used), clamp32(p->arena_size - p->arena_used)};
    size_t len = 0;
    if (tpfed_ready_encode(payload_buf(p), payload_cap(p), &r, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_READY, dst, next_seq(p), len);
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
    uint64_t end = (uint64_t)w.offset + w.data_len;
    if (end > w.total) {
        snprintf(msg, sizeof msg, "WEIGHTS chunk %lu+%u beyond shard size %lu",
                 (unsigned long)w.offset, (unsigned)w.data_len, (unsigned long)w.total);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    if (w.data_len && (w.offset % GRANULE || (w.data_len % GRANULE && end != w.total))) {
        snprintf(msg, sizeof msg, "WEIGHTS chunk %lu+%u of layer %u is not on %u-byte granules",
                 (unsigned long)w.offset, (unsigned)w.data_len, (unsigned)L->layer, (unsigned)GRANULE);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    if (L->started && memcmp(L->sha256, w.sha256, TPFED_SHA256_SIZE) != 0) restart_share(p, L);
    if (!L->started) {
        memcpy(L->sha256, w.sha256, TPFED_SHA256_SIZE);
        L->started = 1;
    }
    // A chunk flagged ACK_REQUESTED is answered with an ACK of its seq once its bytes are held
    // (selective acknowledgement: the sender resends only chunks it has no ACK for).
    int ack_wanted = (h->flags & TPFED_FLAG_ACK_REQUESTED) != 0;
    if (L->complete) {
        // Held already: a repeat. It is answered again (the sender lost the first answer); the
        // chunk that ends the share is followed by READY again.
        if (end == w.total || ack_wanted) send_ack(p, h->src, h->seq, TPFED_MSG_WEIGHTS);
        if (end == w.total) send_ready_if_all(p, h->src);
        return;
    }
    uint32_t first = w.offset / GRANULE, last = (uint32_t)((end + GRANULE - 1u) / GRANULE);
    uint32_t fresh = 0;
    for (uint32_t k = first; k < last; k++) {
        uint32_t bit = 1u << (k & 31u);
        if (!(L->bitmap[k >> 5] & bit)) {
            L->bitmap[k >> 5] |= bit;
            fresh++;
        }
    }
    if (fresh) {
        memcpy(L->shard + w.offset, w.data, w.data_len);
        L->have += fresh;
    }
    if (!fresh || L->have < L->n_granules) {   // stored (or a repeat of data already here)
        if (ack_wanted) send_ack(p, h->src, h->seq, TPFED_MSG_WEIGHTS);
        return;
    }

    uint8_t digest[TPFED_SHA256_SIZE];
    tpfed_sha256(digest, L->shard, L->shard_size);
    if (memcmp(digest, L->sha256, TPFED_SHA256_SIZE) != 0) {
        char got[17], want[17];
        hex8(got, digest);
        hex8(want, L->sha256);
        snprintf(msg, sizeof msg, "shard of layer %u refused: sha256 %s... != announced %s...",
                 (unsigned)L->layer, got, want);
        restart_share(p, L);
        send_error(p, h->src, TPFED_ERR_SHARD_HASH_MISMATCH, msg);
        return;
    }
    if (shard_error(p, L, msg, sizeof msg)) {
        restart_share(p, L);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    build_units(p, L);
    L->complete = 1;
    send_ack(p, h->src, h->seq, TPFED_MSG_WEIGHTS);
    send_ready_if_all(p, h->src);
}

// -------------------------------------------------------------------------------- compute

static void on_activation(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_activation_t a;
    char msg[160];
    const geometry *g = &p->g;
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
    int kv = a.stage == TPFED_STAGE_KV;
    int attention = a.stage == TPFED_STAGE_ATTENTION || kv;
    if (!L || (attention ? L->ng == 0 : (a.stage != TPFED_STAGE_MLP || L->nr == 0))) {
        snprintf(msg, sizeof msg, "nothing of layer %u stage %s is held here", (unsigned)a.layer,
                 kv ? "KV" : attention ? "ATTENTION" : a.stage == TPFED_STAGE_MLP ? "MLP" : "?");
        send_error(p, h->src, TPFED_ERR_NOT_ASSIGNED, msg);
        return;
    }
    if (a.n != g->dim || (attention && a.pos >= g->seq_len)) {
        snprintf(msg, sizeof msg, "ACTIVATION of %u values at position %u; this model has dim %u "
                 "and seq_len %u", (unsigned)a.n, (unsigned)a.pos, (unsigned)g->dim, (unsigned)g->seq_len);
        send_error(p, h->src, TPFED_ERR_BAD_PAYLOAD, msg);
        return;
    }
    memcpy(p->xq_qs, a.qs, a.n);
    for (uint32_t b = 0; b < nblocks(a.n); b++) p->xq_d[b] = tpfed_rd_u16(a.scales + 2 * b);
    int dim = (int)g->dim;
    tpfed_attention_cfg cfg;
    cfg.dim = dim;
    cfg.head_size = (int)g->head_size;
    cfg.group_size = (int)g->group_size;
    cfg.seq_len = (int)g->seq_len;
    cfg.rope = (g->flags & TPFED_SHARE_NO_ROPE) ? TPFED_ROPE_NONE
             : (g->flags & TPFED_SHARE_ROPE_TABLE) ? TPFED_ROPE_TABLE : TPFED_ROPE_THETA;
    cfg.rope_theta = g->rope_theta;
    cfg.rope_freq = L->rope_freq;
    cfg.window = L->window > 0x7FFFFFFFu ? 0x7FFFFFFF : (int)L->window;
    cfg.causal = !(g->flags & TPFED_SHARE_NONCAUSAL);
    int rc;
    if (kv) {
        // k/v of this row only (an encoder's first pass, or a replay); the PARTIAL is empty.
        rc = attention_units_append_kv_cfg(L->att_units, L->ng, L->key_cache, L->value_cache,
                                           L->ng * (int)g->head_size, p->xq_qs, p->xq_d, &cfg, a.pos);
        if (rc == 0) L->n_ctx = a.pos == 0 ? 1u : (a.pos + 1u > L->n_ctx ? a.pos + 1u : L->n_ctx);
    } else if (attention) {
        if (!cfg.causal && L->n_ctx == 0) {
            snprintf(msg, sizeof msg, "layer %u: ATTENTION of an encoder before any KV row",
                     (unsigned)a.layer);
            send_error(p, h->src, TPFED_ERR_BAD_STATE, msg);
            return;
        }
        rc = attention_units_forward_cfg(p->out, L->att_units, L->ng, L->key_cache, L->value_cache,
                                         L->ng * (int)g->head_size, p->xq_qs, p->xq_d, &cfg, a.pos,
                                         (int)L->n_ctx, p->work, p->work_bytes);
    } else {
        rc = mlp_units_forward_act(p->out, L->mlp_units, L->nr, p->xq_qs, p->xq_d, dim,
                                   (int)(g->flags >> TPFED_SHARE_ACT_SHIFT), p->work, p->work_bytes);
    }
    if (rc != 0) {
        snprintf(msg, sizeof msg, "layer %u: the compute units refused the share's arguments",
                 (unsigned)a.layer);
        send_error(p, h->src, TPFED_ERR_INTERNAL, msg);
        return;
    }
    p->stats.activations++;

    // PARTIAL data is dim little-endian float32 (none for KV): rewrite out as those bytes, in place.
    if (kv) dim = 0;
    uint8_t *data = (uint8_t *)p->out;
    for (int i = 0; i < dim; i++) {
        float v = p->out[i];
        tpfed_wr_f32(data + 4 * i, v);
    }
    tpfed_partial_t m = {a.layer, a.stage, a.pos, TPFED_ENC_F32, (uint16_t)dim, data};
    size_t len = 0;
    if (tpfed_partial_encode(payload_buf(p), payload_cap(p), &m, &len) != TPFED_OK) {
        send_error(p, h->src, TPFED_ERR_INTERNAL, "PARTIAL does not fit a frame");
        return;
    }
    send_frame(p, TPFED_MSG_PARTIAL, h->src, h->seq, len);
}

// -------------------------------------------------------------------------------- the rest

static void on_heartbeat(tpfed_peer *p, const tpfed_header_t *h) {
    tpfed_heartbeat_t m = {p->hal->millis(p->hal->ctx), 0};
    size_t len = 0;
    if (tpfed_heartbeat_encode(payload_buf(p), payload_cap(p), &m, &len) == TPFED_OK)
        send_frame(p, TPFED_MSG_HEARTBEAT, h->src, next_seq(p), len);
}

static void on_probe(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    if (h->length > payload_cap(p)) return;
    memmove(payload_buf(p), pl, h->length);
    send_frame(p, TPFED_MSG_PROBE_REPLY, h->src, h->seq, h->length);
}

// Drop the assignment (BYE, or a new session replacing an idle one). Its layer table and
// complete shares stay where they are (up to arena_laid): the next ASSIGN may keep them.
static void unassign(tpfed_peer *p) {
    p->assigned = 0;
    p->ready = 0;
    p->arena_used = p->arena_fixed;
}

static void end_session(tpfed_peer *p) {
    unassign(p);
    tpfed_wipe(&p->sess, sizeof p->sess);
    p->session = 0;
}

// BYE arrives sealed with the session's key (checked before): it ends the session.
static void on_bye(tpfed_peer *p) {
    end_session(p);
}

// -------------------------------------------------------------------------------- keys, handshake

static void on_provision(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_provision_t m;
    if (tpfed_provision_decode(pl, h->length, &m) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (p->keyed) {
        // Only a board keyed by PROVISION answers a repeat of its own key (a lost ACK).
        tpfed_hmac_key k;
        tpfed_hmac_key_init(&k, m.key, TPFED_KEY_SIZE);
        int same = p->provisioned && tpfed_ct_equal((const uint8_t *)&k, (const uint8_t *)&p->fed, sizeof k);
        tpfed_wipe(&k, sizeof k);
        if (!same) {
            p->stats.auth_dropped++;
            return;
        }
    } else if (!p->provisionable) {
        p->stats.auth_dropped++;
        return;
    } else {
        tpfed_hmac_key_init(&p->fed, m.key, TPFED_KEY_SIZE);
        p->keyed = 1;
        p->provisioned = 1;
    }
    tpfed_ack_t a = {h->seq, TPFED_MSG_PROVISION, NULL, 0};
    size_t len = 0;
    if (tpfed_ack_encode(payload_buf(p), payload_cap(p), &a, &len) == TPFED_OK)
        send_plain(p, TPFED_MSG_ACK, my_src(p), h->src, h->seq, 0, len);
}

static void derive(const tpfed_peer *p, uint8_t *out, int what) {
    tpfed_auth_derive(out, &p->fed, what, p->hs_nonce_c, p->hs_nonce_p, p->hs_device, p->hs_session);
}

static void on_challenge(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *body) {
    tpfed_auth_challenge_t c;
    size_t used;
    if (tpfed_auth_challenge_decode(body, TPFED_NONCE_SIZE + 3u, &c, &used) != TPFED_OK) return;
    int repeat = p->hs_pending && c.session == p->hs_session && c.device_id == p->hs_device &&
                 memcmp(c.nonce_c, p->hs_nonce_c, TPFED_NONCE_SIZE) == 0;
    if (!repeat) {
        // A new handshake (it replaces one that never got its CONFIRM).
        memcpy(p->hs_nonce_c, c.nonce_c, TPFED_NONCE_SIZE);
        p->hal->random(p->hal->ctx, p->hs_nonce_p, TPFED_NONCE_SIZE);
        p->hs_session = c.session;
        p->hs_device = c.device_id;
        p->hs_pending = 1;
    }
    uint8_t proof[TPFED_PROOF_SIZE];
    derive(p, proof, TPFED_AUTH_PEER_PROOF);
    tpfed_auth_response_t r = {p->hs_nonce_p, proof};
    uint8_t *out = payload_buf(p);
    out[0] = TPFED_AUTH_RESPONSE;
    size_t len = 0;
    if (tpfed_auth_response_encode(out + 1, payload_cap(p) - 1u, &r, &len) == TPFED_OK)
        send_plain(p, TPFED_MSG_AUTH, c.device_id, h->src, h->seq, c.session, len + 1u);
}

static void send_auth_ack(tpfed_peer *p, tpfed_auth_session *s, uint8_t src, uint8_t dst, uint16_t seq) {
    tpfed_ack_t a = {seq, TPFED_MSG_AUTH, NULL, 0};
    size_t len = 0;
    if (tpfed_ack_encode(payload_buf(p), payload_cap(p), &a, &len) == TPFED_OK)
        send_sealed(p, s, TPFED_MSG_ACK, src, dst, next_seq(p), len);
}

static void on_confirm(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *body) {
    const uint8_t *proof_c = body;   // the CONFIRM body is proof_c alone
    uint8_t want[TPFED_PROOF_SIZE];
    int valid = 0;
    if (p->hs_pending) {
        derive(p, want, TPFED_AUTH_COORD_PROOF);
        valid = tpfed_ct_equal(proof_c, want, TPFED_PROOF_SIZE);
    }
    if (!valid) {
        // A repeat of the CONFIRM that made the current session (its ACK was lost): ACK again.
        if (p->sess.established && tpfed_ct_equal(proof_c, p->cur_proof_c, TPFED_PROOF_SIZE)) {
            send_auth_ack(p, &p->sess, my_src(p), h->src, h->seq);   // (not "activity": a
        } else {                                                      // replay must not keep it)
            p->stats.auth_dropped++;   // wrong key, stale, or a forgery: no answer
        }
        return;
    }
    uint8_t ks[TPFED_KEY_SIZE];
    derive(p, ks, TPFED_AUTH_SESSION_KEY);
    p->hs_pending = 0;
    uint32_t now = p->hal->millis(p->hal->ctx);
    if (p->sess.established && now - p->last_rx_ms < TPFED_SESSION_IDLE_MS) {
        // Busy: the newcomer holds the key, so it is told, under its own new session key.
        tpfed_auth_session other;
        tpfed_auth_session_init(&other, ks, p->hs_session);
        static const char text[] = "peer busy with another session";
        tpfed_error_t e = {TPFED_ERR_BUSY, (const uint8_t *)text, (uint8_t)(sizeof text - 1u)};
        size_t len = 0;
        p->stats.busy++;   // counted before the answer leaves (a reader may act on it at once)
        if (tpfed_error_encode(payload_buf(p), payload_cap(p), &e, &len) == TPFED_OK) {
            p->stats.errors_sent++;
            send_sealed(p, &other, TPFED_MSG_ERROR, p->hs_device, h->src, next_seq(p), len);
        }
        tpfed_wipe(&other, sizeof other);
        tpfed_wipe(ks, sizeof ks);
        return;
    }
    if (p->sess.established) end_session(p);   // idle: replaced, with its assignment
    tpfed_auth_session_init(&p->sess, ks, p->hs_session);
    tpfed_wipe(ks, sizeof ks);
    memcpy(p->cur_proof_c, proof_c, TPFED_PROOF_SIZE);
    p->session = p->hs_session;
    p->device_id = p->hs_device;
    p->last_rx_ms = now;
    p->stats.sessions++;
    send_auth_ack(p, &p->sess, my_src(p), h->src, h->seq);
}

static void on_auth(tpfed_peer *p, const tpfed_header_t *h, const uint8_t *pl) {
    tpfed_auth_t m;
    if (tpfed_auth_decode(pl, h->length, &m) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (!p->keyed) {
        p->stats.auth_dropped++;
        return;
    }
    if (m.step == TPFED_AUTH_CHALLENGE) on_challenge(p, h, m.body);
    else if (m.step == TPFED_AUTH_CONFIRM) on_confirm(p, h, m.body);
    else p->stats.auth_dropped++;   // a RESPONSE is for coordinators
}

void tpfed_peer_handle_frame(tpfed_peer *p, const uint8_t *frame, size_t len) {
    tpfed_header_t h;
    const uint8_t *pl = NULL;
    p->stats.frames_in++;
    if (tpfed_frame_decode(frame, len, payload_cap(p), &h, &pl) != TPFED_OK) {
        p->stats.dropped++;
        return;
    }
    if (h.type == TPFED_MSG_AUTH || h.type == TPFED_MSG_PROVISION) {
        // The only frames without AUTH: handshake and key provisioning (never sealed).
        if (h.flags & TPFED_FLAG_AUTH) p->stats.auth_dropped++;
        else if (h.type == TPFED_MSG_AUTH) on_auth(p, &h, pl);
        else on_provision(p, &h, pl);
        return;
    }
    int rc = p->keyed ? tpfed_auth_session_open(&p->sess, frame, len) : TPFED_E_BAD_TAG;
    if (rc != TPFED_OK) {
        if (rc == TPFED_E_REPLAYED) p->stats.replayed++;
        else p->stats.auth_dropped++;
        return;
    }
    p->last_rx_ms = p->hal->millis(p->hal->ctx);
    if (tpfed_payload_validate(h.type, pl, h.length) != TPFED_OK ||
        (h.dst != TPFED_BROADCAST && h.dst != p->device_id)) {
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
    case TPFED_MSG_BYE: on_bye(p); break;
    default: {
        char msg[64];
        snprintf(msg, sizeof msg, "a peer does not take %s frames", type_name(h.type));
        send_error(p, h.src, TPFED_ERR_BAD_STATE, msg);
    }
    }
}
