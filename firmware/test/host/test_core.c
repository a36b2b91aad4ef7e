// Host test of the peer core and its transport helpers, built with plain gcc (no PlatformIO):
//
//   gcc -std=c99 -Wall -Wextra -O1 -I firmware/lib/tpfed/include -I firmware/lib/tpfed/src
//       firmware/test/host/test_core.c firmware/lib/tpfed/src/*.c -o /tmp/tpfed_test_core
//   /tmp/tpfed_test_core shared_protocol/golden      (from the repository root)
//
// Datagram fragmentation against the golden fragment files (byte for byte), reassembly with
// loss, duplicates, reordering and expiry; the stream helper round trip; the peer core: HELLO,
// ASSIGN validation and 64-bit sizing (BAD_PAYLOAD / UNSUPPORTED / OUT_OF_MEMORY, the old
// assignment kept), WEIGHTS out of order with duplicates, READY, ACTIVATION -> PARTIAL; frame
// authentication: HMAC-SHA256 (RFC 4231 vectors), replay window, the handshake (wrong keys,
// repeats, busy, idle takeover, BYE), sealed frames both ways, drops and provisioning.
// `test_core DIR --bench` also prints the cost of a frame tag at typical sizes.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tpfed_auth.h"
#include "tpfed_datagram.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"
#include "tpfed_sha256.h"
#include "tpfed_stream.h"

static int failures;
#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                              \
        }                                                                            \
    } while (0)

static uint8_t *read_file(const char *dir, const char *name, size_t *n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size + 1);
    *n = fread(buf, 1, (size_t)size, f);
    fclose(f);
    buf[*n] = 0;
    return buf;
}

// ------------------------------------------------------------------------- datagrams

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    uint32_t sizes[300];
    uint32_t count;
} collect;

static void collect_emit(void *ctx, const uint8_t *d, uint32_t n) {
    collect *c = ctx;
    if (c->len + n > c->cap) {
        c->cap = 2 * (c->len + n);
        c->buf = realloc(c->buf, c->cap);
    }
    memcpy(c->buf + c->len, d, n);
    c->len += n;
    if (c->count < 300) c->sizes[c->count] = n;
    c->count++;
}

static void test_golden_fragments(const char *dir, const char *manifest, const char *frags_name,
                                  const char *frame_name, uint32_t mtu, uint16_t first_id) {
    char key[128];
    snprintf(key, sizeof key, "\"file\":\"%s\",\"kind\":\"fragments\",\"frame\":\"%s\",\"mtu\":%u,"
             "\"first_id\":%u", frags_name, frame_name, (unsigned)mtu, (unsigned)first_id);
    CHECK(strstr(manifest, key) != NULL);
    size_t fn, gn;
    uint8_t *frame = read_file(dir, frame_name, &fn);
    uint8_t *golden = read_file(dir, frags_name, &gn);
    collect c = {0};
    uint8_t *scratch = malloc(mtu);
    tpfed_datagram_tx tx;
    tpfed_datagram_tx_init(&tx, scratch, mtu, first_id, collect_emit, &c);
    tpfed_datagram_send_frame(&tx, frame, (uint32_t)fn);
    CHECK(tx.refused == 0);
    CHECK(c.len == gn && memcmp(c.buf, golden, gn) == 0);
    CHECK(tx.next_id == (uint16_t)(first_id + 1u));

    // Reassemble: last fragment first, then the rest backwards, each twice, with a whole frame
    // and another sender's fragments in between.
    uint32_t slots = 2, max_frame = 65551;
    size_t mem_size = tpfed_datagram_rx_bytes(slots, max_frame);
    uint8_t *mem = malloc(mem_size);
    tpfed_datagram_rx rx;
    CHECK(tpfed_datagram_rx_init(&rx, mem, mem_size, slots, max_frame, 2000) == 0);
    size_t offs[300];
    size_t at = 0;
    for (uint32_t i = 0; i < c.count; i++) {
        offs[i] = at;
        at += c.sizes[i];
    }
    const uint8_t *out = NULL;
    int32_t got = 0, delivered = 0;
    for (int32_t i = (int32_t)c.count - 1; i >= 0; i--) {
        for (int rep = 0; rep < 2; rep++) {
            int32_t r = tpfed_datagram_rx_feed(&rx, c.buf + offs[i], c.sizes[i], 7, 100, &out);
            if (r > 0) {
                got = r;
                delivered++;
                CHECK((size_t)r == fn && memcmp(out, frame, fn) == 0);
            }
        }
        if (i == (int32_t)c.count / 2) {
            // a whole small frame passes straight through
            uint8_t small[16] = {TPFED_MAGIC};
            CHECK(tpfed_datagram_rx_feed(&rx, small, sizeof small, 9, 100, &out) == 16 && out == small);
        }
    }
    CHECK(delivered == 1 && (size_t)got == fn);
    if (c.count > 1) {
        CHECK(rx.stats.duplicates == c.count);   // every second copy, incl. the late one
        // Loss: all but one fragment of the next frame, then the timeout passes.
        c.len = 0;
        c.count = 0;
        tpfed_datagram_send_frame(&tx, frame, (uint32_t)fn);
        at = 0;
        for (uint32_t i = 0; i < c.count; i++) {
            offs[i] = at;
            at += c.sizes[i];
        }
        for (uint32_t i = 1; i < c.count; i++)
            CHECK(tpfed_datagram_rx_feed(&rx, c.buf + offs[i], c.sizes[i], 7, 200, &out) == 0);
        CHECK(tpfed_datagram_rx_expire(&rx, 1000) == 1);
        CHECK(tpfed_datagram_rx_expire(&rx, 2300) == 0);
        CHECK(rx.stats.expired == 1);
        // Sent again (same id): complete now.
        int32_t r = 0;
        for (uint32_t i = 0; i < c.count; i++)
            r = tpfed_datagram_rx_feed(&rx, c.buf + offs[i], c.sizes[i], 7, 2400, &out);
        CHECK((size_t)r == fn && memcmp(out, frame, fn) == 0);
    }
    // Garbage is counted, never delivered.
    uint8_t junk[8] = {0x55, 1, 2, 3, 4, 5, 6, 7};
    uint8_t badfrag[8] = {TPFED_FRAG_MAGIC, 0, 0, 3, 2, 1, 1, 1};   // index >= count
    uint32_t dropped = rx.stats.dropped;
    CHECK(tpfed_datagram_rx_feed(&rx, junk, sizeof junk, 7, 2500, &out) == 0);
    CHECK(tpfed_datagram_rx_feed(&rx, badfrag, sizeof badfrag, 7, 2500, &out) == 0);
    CHECK(rx.stats.dropped == dropped + 2);
    free(mem);
    free(scratch);
    free(c.buf);
    free(frame);
    free(golden);
}

static void test_fragment_limits(void) {
    uint8_t frame[2000] = {TPFED_MAGIC}, scratch[16];
    collect c = {0};
    // 2000 bytes at mtu 16 (11-byte slices): 182 fragments; 4000 bytes would need 364: refused,
    // nothing emitted.
    CHECK(tpfed_datagram_split(frame, sizeof frame, 16, 1, scratch, collect_emit, &c) == 182);
    c.len = c.count = 0;
    uint8_t big[4000] = {TPFED_MAGIC};
    CHECK(tpfed_datagram_split(big, sizeof big, 16, 1, scratch, collect_emit, &c) == -1 && c.count == 0);
    CHECK(tpfed_datagram_split(big, sizeof big, 5, 1, scratch, collect_emit, &c) == -1);
    free(c.buf);
}

// ------------------------------------------------------------------------- peer harness

typedef struct {
    uint8_t frames[64][1100];
    size_t lens[64];
    int n;
    uint32_t now;
} link_t;

static void link_send(void *ctx, const uint8_t *frame, uint32_t n) {
    link_t *l = ctx;
    CHECK(n <= 1100);
    if (l->n < 64 && n <= 1100) {
        memcpy(l->frames[l->n], frame, n);
        l->lens[l->n++] = n;
    }
}
static uint32_t link_millis(void *ctx) { return ((link_t *)ctx)->now += 7; }

// Deterministic "random" bytes for the peer's nonces (a counter through SHA-256).
static uint32_t rnd_calls;
static void test_random(void *ctx, uint8_t *buf, uint32_t n) {
    (void)ctx;
    uint8_t d[32], in[4];
    for (uint32_t i = 0; i < n; i += 32) {
        rnd_calls++;
        tpfed_wr_u32(in, rnd_calls);
        tpfed_sha256(d, in, 4);
        memcpy(buf + i, d, n - i < 32 ? n - i : 32);
    }
}

static link_t lk;
static const tpfed_hal hal = {&lk, link_send, link_millis, test_random};
static const uint8_t fed_key[32] = "tpfed test federation key 32 by";
// The coordinator's end of the session with the peer under test (NULL: send unsealed frames).
static tpfed_auth_session coord;
static tpfed_auth_session *sealing;
static const tpfed_device_info info = {"hostboard", "host-test", 100000000u, 1u << 20, 0, 0, 0, 1, 1, 0};

static uint8_t txbuf[70000];
static uint16_t seq;

static size_t make(uint8_t type, uint8_t dst, uint16_t session, const uint8_t *payload, size_t n) {
    tpfed_header_t h;
    memset(&h, 0, sizeof h);
    h.type = type;
    h.src = 0;
    h.dst = dst;
    h.seq = ++seq;
    h.session = session;
    memcpy(txbuf + TPFED_HEADER_SIZE, payload, n);
    size_t len = 0;
    if (sealing) CHECK(tpfed_auth_session_finish(sealing, txbuf, sizeof txbuf, &h, n, &len) == TPFED_OK);
    else CHECK(tpfed_frame_finish(txbuf, sizeof txbuf, &h, n, &len) == TPFED_OK);
    return len;
}

// Frame i the peer sent: decoded, and (when sealing) opened with the coordinator's session.
static int reply(int i, tpfed_header_t *h, const uint8_t **pl) {
    if (tpfed_frame_decode(lk.frames[i], lk.lens[i], 0xFFFF, h, pl) != TPFED_OK) return 0;
    if (sealing && h->type != TPFED_MSG_AUTH)
        return tpfed_auth_session_open(sealing, lk.frames[i], lk.lens[i]) == TPFED_OK;
    return 1;
}

// Send one frame to the peer; returns the number of replies, the last decoded into *h, *pl.
static int exchange(tpfed_peer *p, uint8_t type, uint16_t session, const uint8_t *payload, size_t n,
                    tpfed_header_t *h, const uint8_t **pl) {
    lk.n = 0;
    size_t len = make(type, 1, session, payload, n);
    tpfed_peer_handle_frame(p, txbuf, len);
    if (lk.n && h) CHECK(reply(lk.n - 1, h, pl));
    return lk.n;
}

// The handshake as a coordinator would run it (device id 1): CHALLENGE, RESPONSE checked,
// CONFIRM, the peer's sealed ACK. Fills coord and seals from then on. Returns 1 on success.
static int handshake(tpfed_peer *p, const uint8_t *key, uint16_t session, uint8_t dev) {
    uint8_t pl[64], nonce_c[16], want[32];
    tpfed_hmac_key k;
    tpfed_hmac_key_init(&k, key, 32);
    for (int i = 0; i < 16; i++) nonce_c[i] = (uint8_t)(session * 7u + (unsigned)i);
    sealing = NULL;
    pl[0] = TPFED_AUTH_CHALLENGE;
    memcpy(pl + 1, nonce_c, 16);
    tpfed_wr_u16(pl + 17, session);
    pl[19] = dev;
    tpfed_header_t h;
    const uint8_t *rp;
    if (exchange(p, TPFED_MSG_AUTH, session, pl, 20, &h, &rp) != 1 || h.type != TPFED_MSG_AUTH) return 0;
    tpfed_auth_t a;
    tpfed_auth_response_t r;
    size_t used;
    if (tpfed_auth_decode(rp, h.length, &a) != TPFED_OK || a.step != TPFED_AUTH_RESPONSE) return 0;
    CHECK(tpfed_auth_response_decode(a.body, 48, &r, &used) == TPFED_OK);
    CHECK(h.src == dev && h.session == session && !(h.flags & TPFED_FLAG_AUTH));
    tpfed_auth_derive(want, &k, TPFED_AUTH_PEER_PROOF, nonce_c, r.nonce_p, dev, session);
    if (!tpfed_ct_equal(want, r.proof_p, 32)) return 0;
    uint8_t nonce_p[16], ks[32];
    memcpy(nonce_p, r.nonce_p, 16);
    pl[0] = TPFED_AUTH_CONFIRM;
    tpfed_auth_derive(pl + 1, &k, TPFED_AUTH_COORD_PROOF, nonce_c, nonce_p, dev, session);
    tpfed_auth_derive(ks, &k, TPFED_AUTH_SESSION_KEY, nonce_c, nonce_p, dev, session);
    tpfed_auth_session_init(&coord, ks, session);
    if (exchange(p, TPFED_MSG_AUTH, session, pl, 33, NULL, NULL) != 1) return 0;
    sealing = &coord;
    if (!reply(0, &h, &rp) || h.type != TPFED_MSG_ACK) return 0;
    tpfed_ack_t ack;
    CHECK(tpfed_ack_decode(rp, h.length, &ack) == TPFED_OK && ack.acked_type == TPFED_MSG_AUTH);
    return 1;
}

static uint16_t error_code(tpfed_header_t *h, const uint8_t *pl) {
    tpfed_error_t e;
    if (h->type != TPFED_MSG_ERROR || tpfed_error_decode(pl, h->length, &e) != TPFED_OK) return 0;
    return e.code;
}

typedef struct {
    uint16_t layer;
    uint8_t ng;
    uint16_t groups[8];
    uint8_t nr;
    uint32_t ranges[8][2];
} ent;

// ASSIGN naming, per entry, the sha256 shas[i] of the share it wants (shas NULL: all zero).
static size_t assign_payload_sha(uint8_t *out, uint16_t dim, uint32_t hidden, uint16_t n_layers,
                                 uint16_t n_heads, uint16_t n_kv, uint16_t seq_len, const ent *es,
                                 int ne, const uint8_t (*shas)[32]) {
    uint8_t entries[4096];
    size_t el = 0;
    for (int i = 0; i < ne; i++) {
        tpfed_wr_u16(entries + el, es[i].layer);
        entries[el + 2] = es[i].ng;
        el += 3;
        for (int j = 0; j < es[i].ng; j++, el += 2) tpfed_wr_u16(entries + el, es[i].groups[j]);
        entries[el++] = es[i].nr;
        for (int r = 0; r < es[i].nr; r++, el += 8) {
            tpfed_wr_u32(entries + el, es[i].ranges[r][0]);
            tpfed_wr_u32(entries + el + 4, es[i].ranges[r][1]);
        }
        if (shas) memcpy(entries + el, shas[i], 32);
        else memset(entries + el, 0, 32);
        el += 32;
    }
    tpfed_assign_t a = {dim, hidden, n_layers, n_heads, n_kv, seq_len, 1e-5f, 10000.0f, 0,
                        (uint16_t)ne, entries, (uint16_t)el};
    size_t len = 0;
    CHECK(tpfed_assign_encode(out, 65535, &a, &len) == TPFED_OK);
    return len;
}

static size_t assign_payload(uint8_t *out, uint16_t dim, uint32_t hidden, uint16_t n_layers,
                             uint16_t n_heads, uint16_t n_kv, uint16_t seq_len, const ent *es, int ne) {
    return assign_payload_sha(out, dim, hidden, n_layers, n_heads, n_kv, seq_len, es, ne, NULL);
}

// A valid share: header, tables, every matrix zero (zero scales are finite).
static size_t make_share(uint8_t *s, const ent *e, uint32_t dim, uint32_t hidden, uint16_t hs,
                         uint16_t gs, uint16_t n_kv) {
    uint32_t ranges[16];
    for (int r = 0; r < e->nr; r++) {
        ranges[2 * r] = e->ranges[r][0];
        ranges[2 * r + 1] = e->ranges[r][1];
    }
    uint64_t total = tpfed_share_bytes(dim, hs, gs, e->ng, ranges, e->nr);
    memset(s, 0, (size_t)total);
    tpfed_share_header_t h = {TPFED_SHARE_VERSION, TPFED_SHARE_HEADER_SIZE, e->layer, dim, hidden,
                              hs, gs, e->ng, e->nr, n_kv, 0, total};
    size_t used;
    CHECK(tpfed_share_header_encode(s, 64, &h, &used) == TPFED_OK);
    size_t off = TPFED_SHARE_HEADER_SIZE;
    for (int i = 0; i < e->ng; i++) tpfed_wr_u16(s + off + 2 * i, e->groups[i]);
    off += (2u * e->ng + 3u) & ~3u;
    for (int r = 0; r < e->nr; r++) {
        tpfed_wr_u32(s + off + 8 * r, e->ranges[r][0]);
        tpfed_wr_u32(s + off + 8 * r + 4, e->ranges[r][1]);
    }
    return (size_t)total;
}

static size_t weights_payload(uint8_t *out, uint16_t layer, uint32_t off, uint32_t total,
                              const uint8_t *sha, const uint8_t *data, uint16_t n) {
    tpfed_weights_t w = {layer, off, total, sha, data, n};
    size_t len = 0;
    CHECK(tpfed_weights_encode(out, 65535, &w, &len) == TPFED_OK);
    return len;
}

static void test_share_bytes(void) {
    // stories260K, one group + range [128, 172): the formula of host's shard module.
    uint32_t r[2] = {128, 172};
    // header 40 + groups pad4(2)=4 + ranges 8; wq (16,64): 1024 + 64; wk, wv (8,64): 512+32 each;
    // wo (64,16): 1024 + 128; w1, w3 (44,64): 2816 + 176 each; w2 (64,44): 2816 + 256.
    uint64_t want = 40 + 4 + 8 + (1088 + 2 * 544 + 1152) + (2 * 2992 + 3072);
    CHECK(tpfed_share_bytes(64, 8, 2, 1, r, 1) == want);
    uint32_t huge[2] = {0, 0xFFFFFFFFu};
    CHECK(tpfed_share_bytes(65535, 65535, 65535, 255, huge, 1) != 0);   // big, but no overflow
    uint32_t bad[2] = {10, 5};
    CHECK(tpfed_share_bytes(64, 8, 2, 0, bad, 1) == 0);
    CHECK(tpfed_share_bytes(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 255, huge, 1) == 0);   // overflow
}

static void test_peer(void) {
    static uint8_t arena[256 * 1024];
    static uint8_t pl[70000], share[70000];
    tpfed_peer_config cfg = {&hal, &info, 6, TPFED_TRANSPORT_UDP | TPFED_TRANSPORT_SERIAL, 1024, 4, 2, 0,
                             fed_key, 0};
    CHECK(tpfed_peer_init(arena, 100, &cfg) == NULL);
    tpfed_hal no_random = hal;
    no_random.random = NULL;
    cfg.hal = &no_random;
    CHECK(tpfed_peer_init(arena, sizeof arena, &cfg) == NULL);
    cfg.hal = &hal;
    cfg.max_frame = 100;
    CHECK(tpfed_peer_init(arena, sizeof arena, &cfg) == NULL);
    cfg.max_frame = 1024;
    tpfed_peer *p = tpfed_peer_init(arena + 1, sizeof arena - 1, &cfg);   // unaligned on purpose
    CHECK(p != NULL && ((uintptr_t)p & 7u) == 0);
    CHECK(tpfed_peer_int8_macs(p) > 0);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_IDLE && tpfed_peer_device_id(p) == 255);
    tpfed_header_t h;
    const uint8_t *rp;
    CHECK(handshake(p, fed_key, 1, 1));
    CHECK(tpfed_peer_session(p) == 1 && tpfed_peer_device_id(p) == 1 && tpfed_peer_in_session(p));

    // HELLO
    tpfed_hello_t hello;
    memset(&hello, 0, sizeof hello);
    hello.name = (const uint8_t *)"coordinator";
    hello.name_len = 11;
    size_t n = 0;
    CHECK(tpfed_hello_encode(pl, sizeof pl, &hello, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_HELLO, 0, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_HELLO);
    tpfed_hello_t got;
    CHECK(tpfed_hello_decode(rp, h.length, &got) == TPFED_OK);
    CHECK(got.max_frame == 1024 && got.transports == (TPFED_TRANSPORT_UDP | TPFED_TRANSPORT_SERIAL));
    CHECK(got.device_class == 6 && got.name_len == 9 && h.src == 1);
    CHECK(got.arena_kb == (tpfed_peer_arena_size(p) - tpfed_peer_arena_used(p) - TPFED_PEER_WORK_RESERVE) / 1024);

    // stories260K geometry: dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads.
    // kv_groups [9,3,3] and range [5, 999): malformed -> BAD_PAYLOAD, also with 3 > max_groups.
    ent bad = {0, 3, {9, 3, 3}, 1, {{5, 999}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, &bad, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_BAD_PAYLOAD);
    ent unsorted = {0, 2, {2, 1}, 0, {{0}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, &unsorted, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_BAD_PAYLOAD);
    ent twice[2] = {{1, 1, {0}, 0, {{0}}}, {1, 1, {1}, 0, {{0}}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, twice, 2);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_BAD_PAYLOAD);
    ent out_of_range = {5, 1, {0}, 0, {{0}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, &out_of_range, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_BAD_PAYLOAD);
    // valid but more ranges than this peer takes (max_ranges 2) -> UNSUPPORTED
    ent many = {0, 0, {0}, 3, {{0, 32}, {32, 64}, {64, 96}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, &many, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_UNSUPPORTED);
    // frames beyond max_frame -> UNSUPPORTED
    n = assign_payload(pl, 512, 172, 5, 8, 4, 64, NULL, 0);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_UNSUPPORTED);
    // sizes that wrap 32 bits: hidden 2^31-1, one range [0, 2^31-1) with dim 128 -> OOM (not a fault)
    ent wrap = {0, 0, {0}, 1, {{0, 0x7FFFFFFFu}}};
    n = assign_payload(pl, 128, 0x7FFFFFFFu, 1, 1, 1, 8, &wrap, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_OUT_OF_MEMORY);
    // KV cache for 65535 positions of 4 groups: too large -> OOM
    ent kv = {0, 4, {0, 1, 2, 3}, 0, {{0}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 65535, &kv, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_OUT_OF_MEMORY);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_IDLE);

    // A valid assignment: layer 2 holds group 1 and [128, 172); layer 0 range [0, 32).
    ent good[2] = {{2, 1, {1}, 1, {{128, 172}}}, {0, 0, {0}, 1, {{0, 32}}}};
    n = assign_payload(pl, 64, 172, 5, 8, 4, 64, good, 2);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_ACK);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_ASSIGNED && tpfed_peer_layers_assigned(p) == 2);
    CHECK(tpfed_peer_session(p) == 1 && tpfed_peer_device_id(p) == 1);
    size_t used_after_assign = tpfed_peer_arena_used(p);

    for (int li = 0; li < 2; li++) {
        size_t total = make_share(share, &good[li], 64, 172, 8, 2, 4);
        uint8_t sha[32], wrong[32];
        tpfed_sha256(sha, share, total);
        memset(wrong, 0xAB, sizeof wrong);
        const uint32_t chunk = 512;
        uint32_t nchunks = (uint32_t)((total + chunk - 1) / chunk);
        // a chunk not on the granule -> BAD_PAYLOAD
        n = weights_payload(pl, good[li].layer, 100, (uint32_t)total, sha, share + 100, 64);
        CHECK(exchange(p, TPFED_MSG_WEIGHTS, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_BAD_PAYLOAD);
        // half of a share with another sha256 first: replaced by the real one below
        n = weights_payload(pl, good[li].layer, 0, (uint32_t)total, wrong, share, 64);
        CHECK(exchange(p, TPFED_MSG_WEIGHTS, 1, pl, n, NULL, NULL) == 0);
        // backwards, each chunk twice; replies only at the end
        for (int32_t c = (int32_t)nchunks - 1; c >= 0; c--) {
            uint32_t off = (uint32_t)c * chunk, len = (uint32_t)(total - off < chunk ? total - off : chunk);
            for (int rep = 0; rep < 2; rep++) {
                n = weights_payload(pl, good[li].layer, off, (uint32_t)total, sha, share + off, (uint16_t)len);
                int replies = exchange(p, TPFED_MSG_WEIGHTS, 1, pl, n, NULL, NULL);
                if (c == 0 && rep == 0) {
                    CHECK(replies == (li == 0 ? 1 : 2));
                    tpfed_header_t a;
                    const uint8_t *ap;
                    CHECK(reply(0, &a, &ap));
                    CHECK(a.type == TPFED_MSG_ACK);
                    if (li == 1) {
                        CHECK(reply(1, &a, &ap));
                        CHECK(a.type == TPFED_MSG_READY);
                        tpfed_ready_t r;
                        CHECK(tpfed_ready_decode(ap, a.length, &r) == TPFED_OK);
                        CHECK(r.arena_used == used_after_assign);
                    }
                } else {
                    CHECK(replies == 0);
                }
            }
        }
    }
    CHECK(tpfed_peer_state(p) == TPFED_PEER_READY && tpfed_peer_layers_held(p) == 2);

    // ACTIVATION -> PARTIAL of zeros (the share is all zeros), seq echoed
    int8_t qs[64];
    uint8_t scales[4];
    memset(qs, 3, sizeof qs);
    tpfed_wr_u16(scales, 0x3C00);
    tpfed_wr_u16(scales + 2, 0x3C00);
    tpfed_activation_t act = {2, TPFED_STAGE_ATTENTION, 0, 64, scales, qs};
    CHECK(tpfed_activation_encode(pl, sizeof pl, &act, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 1, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_PARTIAL);
    CHECK(h.seq == seq);
    tpfed_partial_t part;
    CHECK(tpfed_partial_decode(rp, h.length, &part) == TPFED_OK && part.n == 64 && part.layer == 2);
    act.stage = TPFED_STAGE_MLP;
    act.layer = 0;
    CHECK(tpfed_activation_encode(pl, sizeof pl, &act, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 1, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_PARTIAL);

    // An ASSIGN that does not fit: OOM, and the old assignment still answers.
    n = assign_payload(pl, 64, 172, 5, 8, 4, 65535, &kv, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_OUT_OF_MEMORY);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_READY && tpfed_peer_session(p) == 1);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 1, pl, n == 0 ? 0 : 0, NULL, NULL) == 0);   // empty: dropped
    CHECK(tpfed_activation_encode(pl, sizeof pl, &act, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 1, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_PARTIAL);

    // The last chunk of a held share again: ACK and READY again (a lost ACK is recovered).
    size_t total = make_share(share, &good[0], 64, 172, 8, 2, 4);
    uint8_t sha[32];
    tpfed_sha256(sha, share, total);
    uint32_t last_off = (uint32_t)((total - 1) / 512 * 512);
    n = weights_payload(pl, 2, last_off, (uint32_t)total, sha, share + last_off, (uint16_t)(total - last_off));
    CHECK(exchange(p, TPFED_MSG_WEIGHTS, 1, pl, n, &h, &rp) == 2 && h.type == TPFED_MSG_READY);

    // Replies of the session are sealed; a replayed ACTIVATION gets nothing.
    CHECK(tpfed_activation_encode(pl, sizeof pl, &act, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 1, pl, n, &h, &rp) == 1 && (h.flags & TPFED_FLAG_AUTH));
    uint32_t replayed = tpfed_peer_get_stats(p)->replayed;
    lk.n = 0;
    tpfed_peer_handle_frame(p, txbuf, n + TPFED_AUTH_FRAME_OVERHEAD);
    CHECK(lk.n == 0 && tpfed_peer_get_stats(p)->replayed == replayed + 1);

    // BYE of another session (sealed with the right key, but another session number): dropped;
    // of this one: ends the session and the assignment; then nothing is answered.
    uint8_t reason = 0;
    coord.session = 5;
    uint32_t dropped = tpfed_peer_get_stats(p)->auth_dropped;
    CHECK(exchange(p, TPFED_MSG_BYE, 5, &reason, 1, NULL, NULL) == 0 && tpfed_peer_state(p) == TPFED_PEER_READY);
    CHECK(tpfed_peer_get_stats(p)->auth_dropped == dropped + 1);
    coord.session = 1;
    CHECK(exchange(p, TPFED_MSG_BYE, 1, &reason, 1, NULL, NULL) == 0 && tpfed_peer_state(p) == TPFED_PEER_IDLE);
    CHECK(!tpfed_peer_in_session(p) && tpfed_peer_session(p) == 0);
    CHECK(exchange(p, TPFED_MSG_HEARTBEAT, 1, pl, 5, NULL, NULL) == 0);
    CHECK(tpfed_peer_get_stats(p)->activations == 4);
    sealing = NULL;
}

// ------------------------------------------------------------------------- shares kept

// ASSIGN es (naming shas); returns the number of replies and the ACK's held bitmap (first
// byte; -1 if the first reply is not that ACK).
static int assign_held(tpfed_peer *p, uint16_t session, const ent *es, int ne,
                       const uint8_t (*shas)[32], int *held) {
    static uint8_t pl[8192];
    size_t n = assign_payload_sha(pl, 64, 172, 5, 8, 4, 64, es, ne, shas);
    int replies = exchange(p, TPFED_MSG_ASSIGN, session, pl, n, NULL, NULL);
    tpfed_header_t h;
    const uint8_t *rp;
    tpfed_ack_t ack;
    *held = -1;
    if (replies && reply(0, &h, &rp) && h.type == TPFED_MSG_ACK &&
        tpfed_ack_decode(rp, h.length, &ack) == TPFED_OK && ack.acked_type == TPFED_MSG_ASSIGN)
        *held = ack.held_len == (size_t)(ne + 7) / 8 ? (ne ? ack.held[0] : 0) : -2;
    return replies;
}

// WEIGHTS of share (total bytes) for layer, 512-byte chunks from chunk `from` on, up to
// (excluding) `to`; returns the replies to the last one sent.
static int push_share(tpfed_peer *p, uint16_t session, uint16_t layer, const uint8_t *share,
                      size_t total, uint32_t from, uint32_t to) {
    static uint8_t pl[2048];
    uint8_t sha[32];
    tpfed_sha256(sha, share, total);
    int replies = 0;
    for (uint32_t off = from * 512u; off < total && off < to * 512u; off += 512u) {
        uint32_t len = (uint32_t)(total - off < 512u ? total - off : 512u);
        size_t n = weights_payload(pl, layer, off, (uint32_t)total, sha, share + off, (uint16_t)len);
        replies = exchange(p, TPFED_MSG_WEIGHTS, session, pl, n, NULL, NULL);
    }
    return replies;
}

static int last_is(int i, uint8_t type) {
    tpfed_header_t h;
    const uint8_t *rp;
    return reply(i, &h, &rp) && h.type == type;
}

// Shares outlive ASSIGNs and sessions: an ASSIGN naming a share's sha256 keeps it (moved into
// the new layout), one naming another drops it; a share half received is not held; READY comes
// at once when every share is held.
static void test_kept(void) {
    static uint8_t arena[256 * 1024];
    static uint8_t s2[32768], s0[32768], s1[32768], s0b[32768];
    tpfed_peer_config cfg = {&hal, &info, 6, TPFED_TRANSPORT_UDP, 1024, 4, 2, 1000000u, fed_key, 0};
    tpfed_peer *p = tpfed_peer_init(arena + 3, sizeof arena - 5, &cfg);   // odd size on purpose
    CHECK(p != NULL && handshake(p, fed_key, 1, 1));
    ent a[2] = {{2, 1, {1}, 1, {{128, 172}}}, {0, 0, {0}, 1, {{0, 32}}}};
    size_t n2 = make_share(s2, &a[0], 64, 172, 8, 2, 4), n0 = make_share(s0, &a[1], 64, 172, 8, 2, 4);
    uint8_t shas[3][32];
    tpfed_sha256(shas[0], s2, n2);
    tpfed_sha256(shas[1], s0, n0);
    int held;
    CHECK(assign_held(p, 1, a, 2, (const uint8_t (*)[32])shas, &held) == 1 && held == 0);
    CHECK(push_share(p, 1, 2, s2, n2, 0, 1000) == 1 && last_is(0, TPFED_MSG_ACK));
    CHECK(push_share(p, 1, 0, s0, n0, 0, 1) == 0);   // layer 0: one chunk of several
    CHECK(tpfed_peer_shares_kept(p) == 1);
    // The same ASSIGN again: layer 2 held; layer 0 claimed (its sha256) but not complete.
    CHECK(assign_held(p, 1, a, 2, (const uint8_t (*)[32])shas, &held) == 1 && held == 1);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_ASSIGNED && tpfed_peer_layers_held(p) == 1);
    CHECK(push_share(p, 1, 0, s0, n0, 0, 1000) == 2 && last_is(1, TPFED_MSG_READY));
    size_t used = tpfed_peer_arena_used(p);
    // Everything held: ACK (both bits) and READY at once; the layout is the same.
    CHECK(assign_held(p, 1, a, 2, (const uint8_t (*)[32])shas, &held) == 2 && held == 3 &&
          last_is(1, TPFED_MSG_READY));
    CHECK(tpfed_peer_state(p) == TPFED_PEER_READY && tpfed_peer_arena_used(p) == used);
    // The last chunk of a kept share again: ACK and READY again.
    CHECK(push_share(p, 1, 0, s0, n0, (uint32_t)((n0 - 1) / 512), 1000) == 2 && last_is(1, TPFED_MSG_READY));
    // A sha256 the peer does not hold for layer 2: its share is dropped, layer 0's kept.
    uint8_t other[2][32];
    memcpy(other, shas, sizeof other);
    other[0][5] ^= 1;
    CHECK(assign_held(p, 1, a, 2, (const uint8_t (*)[32])other, &held) == 1 && held == 2);
    CHECK(tpfed_peer_shares_kept(p) == 1 && tpfed_peer_state(p) == TPFED_PEER_ASSIGNED);
    CHECK(push_share(p, 1, 2, s2, n2, 0, 1000) == 2 && last_is(1, TPFED_MSG_READY));
    // An ASSIGN that does not fit: OOM; the assignment and its shares stay.
    ent kv = {0, 4, {0, 1, 2, 3}, 0, {{0}}};
    static uint8_t pl[8192];
    tpfed_header_t h;
    const uint8_t *rp;
    size_t n = assign_payload(pl, 64, 172, 5, 8, 4, 65535, &kv, 1);
    CHECK(exchange(p, TPFED_MSG_ASSIGN, 1, pl, n, &h, &rp) == 1 && error_code(&h, rp) == TPFED_ERR_OUT_OF_MEMORY);
    CHECK(tpfed_peer_state(p) == TPFED_PEER_READY && tpfed_peer_shares_kept(p) == 2);
    // BYE ends the session and the assignment, not the shares.
    uint8_t reason = 0;
    CHECK(exchange(p, TPFED_MSG_BYE, 1, &reason, 1, NULL, NULL) == 0 && tpfed_peer_state(p) == TPFED_PEER_IDLE);
    CHECK(tpfed_peer_layers_assigned(p) == 0 && tpfed_peer_shares_kept(p) == 2);
    // A new session: layer 1 first (new, more groups), then layer 0 kept (it moves), layer 2
    // not named (dropped).
    CHECK(handshake(p, fed_key, 2, 1));
    ent b[2] = {{0, 0, {0}, 1, {{0, 32}}}, {1, 2, {0, 3}, 1, {{32, 96}}}};
    size_t n1 = make_share(s1, &b[1], 64, 172, 8, 2, 4);
    uint8_t shb[2][32];
    memcpy(shb[0], shas[1], 32);
    tpfed_sha256(shb[1], s1, n1);
    CHECK(assign_held(p, 2, b, 2, (const uint8_t (*)[32])shb, &held) == 1 && held == 1);
    CHECK(tpfed_peer_shares_kept(p) == 1 && tpfed_peer_layers_held(p) == 1);
    CHECK(push_share(p, 2, 1, s1, n1, 0, 1000) == 2 && last_is(1, TPFED_MSG_READY));
    // The kept share still computes: an MLP of layer 0 gives a PARTIAL (all-zero weights).
    int8_t qs[64];
    uint8_t scales[4];
    memset(qs, 3, sizeof qs);
    tpfed_wr_u16(scales, 0x3C00);
    tpfed_wr_u16(scales + 2, 0x3C00);
    tpfed_activation_t act = {0, TPFED_STAGE_MLP, 0, 64, scales, qs};
    CHECK(tpfed_activation_encode(pl, sizeof pl, &act, &n) == TPFED_OK);
    CHECK(exchange(p, TPFED_MSG_ACTIVATION, 2, pl, n, &h, &rp) == 1 && h.type == TPFED_MSG_PARTIAL);
    // Layer 0's sha256 for another range of layer 0: not that share (not held, dropped).
    ent c = {0, 0, {0}, 1, {{0, 64}}};
    make_share(s0b, &c, 64, 172, 8, 2, 4);
    CHECK(assign_held(p, 2, &c, 1, (const uint8_t (*)[32])shb, &held) == 1 && held == 0);
    CHECK(tpfed_peer_shares_kept(p) == 0);
    sealing = NULL;
}

// ------------------------------------------------------------------------- authentication

static void hex_to(uint8_t *out, const char *hex) {
    for (size_t i = 0; hex[2 * i]; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

static void test_hmac(void) {
    // RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
    uint8_t key[131], mac[32], want[32];
    memset(key, 0x0b, 20);
    tpfed_hmac_sha256(mac, key, 20, (const uint8_t *)"Hi There", 8);
    hex_to(want, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
    CHECK(memcmp(mac, want, 32) == 0);
    tpfed_hmac_sha256(mac, (const uint8_t *)"Jefe", 4, (const uint8_t *)"what do ya want for nothing?", 28);
    hex_to(want, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    CHECK(memcmp(mac, want, 32) == 0);
    memset(key, 0xaa, sizeof key);
    const char *m6 = "Test Using Larger Than Block-Size Key - Hash Key First";
    tpfed_hmac_sha256(mac, key, 131, (const uint8_t *)m6, strlen(m6));
    hex_to(want, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    CHECK(memcmp(mac, want, 32) == 0);
    // incremental == one-shot
    tpfed_hmac_key k;
    tpfed_hmac_ctx c;
    tpfed_hmac_key_init(&k, (const uint8_t *)"Jefe", 4);
    tpfed_hmac_init(&c, &k);
    tpfed_hmac_update(&c, (const uint8_t *)"what do ya ", 11);
    tpfed_hmac_update(&c, (const uint8_t *)"want for nothing?", 17);
    tpfed_hmac_final(&c, mac);
    hex_to(want, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    CHECK(memcmp(mac, want, 32) == 0);
    CHECK(tpfed_ct_equal(mac, want, 32) && !tpfed_ct_equal(mac, want + 1, 31));
}

static void test_replay_window(void) {
    tpfed_replay_window w;
    tpfed_replay_init(&w);
    CHECK(!tpfed_replay_fresh(&w, 0) && tpfed_replay_fresh(&w, 1) && tpfed_replay_fresh(&w, 1000));
    tpfed_replay_accept(&w, 5);
    CHECK(!tpfed_replay_fresh(&w, 5) && tpfed_replay_fresh(&w, 4) && tpfed_replay_fresh(&w, 6));
    tpfed_replay_accept(&w, 4);
    CHECK(!tpfed_replay_fresh(&w, 4));
    tpfed_replay_accept(&w, 70);   // 5 and 4 slide out of the window: too old
    CHECK(!tpfed_replay_fresh(&w, 5) && !tpfed_replay_fresh(&w, 6) && tpfed_replay_fresh(&w, 7));
    CHECK(tpfed_replay_fresh(&w, 69) && !tpfed_replay_fresh(&w, 70));
    tpfed_replay_accept(&w, 0xFFFFFFFFu);
    CHECK(!tpfed_replay_fresh(&w, 0xFFFFFFFFu) && tpfed_replay_fresh(&w, 0xFFFFFFFFu - 63u) &&
          !tpfed_replay_fresh(&w, 0xFFFFFFFFu - 64u));
}

static uint32_t ack_type_of_last(void) {
    tpfed_header_t h;
    const uint8_t *rp;
    tpfed_ack_t a;
    if (!lk.n || tpfed_frame_decode(lk.frames[lk.n - 1], lk.lens[lk.n - 1], 0xFFFF, &h, &rp) != TPFED_OK ||
        h.type != TPFED_MSG_ACK || tpfed_ack_decode(rp, h.length, &a) != TPFED_OK)
        return 0;
    return a.acked_type;
}

static void test_auth_peer(void) {
    static uint8_t arena[64 * 1024];
    static uint8_t pl[256];
    uint8_t other_key[32];
    memset(other_key, 0x42, sizeof other_key);
    tpfed_header_t h;
    const uint8_t *rp;

    // No key: everything is dropped, the handshake too.
    tpfed_peer_config cfg = {&hal, &info, 6, TPFED_TRANSPORT_SERIAL, 512, 4, 2, 1000, NULL, 0};
    tpfed_peer *p = tpfed_peer_init(arena, sizeof arena, &cfg);
    CHECK(p != NULL && !tpfed_peer_keyed(p));
    CHECK(!handshake(p, fed_key, 7, 2) && lk.n == 0);
    sealing = NULL;
    CHECK(exchange(p, TPFED_MSG_HELLO, 0, pl, 0, NULL, NULL) == 0);
    memcpy(pl, fed_key, 32);
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 32, NULL, NULL) == 0);   // not provisionable
    CHECK(tpfed_peer_get_stats(p)->auth_dropped >= 3);

    // Provisionable: the first PROVISION keys it (ACK), the same key again is ACKed again,
    // another key is dropped.
    cfg.provision = 1;
    p = tpfed_peer_init(arena, sizeof arena, &cfg);
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 31, NULL, NULL) == 0);   // malformed
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 32, NULL, NULL) == 1 && ack_type_of_last() == TPFED_MSG_PROVISION);
    CHECK(tpfed_peer_keyed(p));
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 32, NULL, NULL) == 1 && ack_type_of_last() == TPFED_MSG_PROVISION);
    memcpy(pl, other_key, 32);
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 32, NULL, NULL) == 0);
    CHECK(handshake(p, fed_key, 7, 2));
    CHECK(tpfed_peer_device_id(p) == 2 && tpfed_peer_session(p) == 7);

    // A keyed board (key given at build) drops PROVISION altogether.
    cfg.provision = 0;
    cfg.key = fed_key;
    p = tpfed_peer_init(arena, sizeof arena, &cfg);
    sealing = NULL;
    memcpy(pl, fed_key, 32);
    CHECK(exchange(p, TPFED_MSG_PROVISION, 0, pl, 32, NULL, NULL) == 0);

    // Unsealed frames get nothing; a coordinator with another key gets a RESPONSE it cannot
    // verify, and its CONFIRM is dropped without an answer.
    CHECK(exchange(p, TPFED_MSG_HELLO, 0, pl, 0, NULL, NULL) == 0);
    CHECK(!handshake(p, other_key, 9, 1));
    CHECK(!tpfed_peer_in_session(p));
    uint32_t dropped = tpfed_peer_get_stats(p)->auth_dropped;
    sealing = NULL;
    pl[0] = TPFED_AUTH_CONFIRM;
    memset(pl + 1, 0x11, 32);
    CHECK(exchange(p, TPFED_MSG_AUTH, 9, pl, 33, NULL, NULL) == 0);
    CHECK(tpfed_peer_get_stats(p)->auth_dropped == dropped + 1 && !tpfed_peer_in_session(p));

    // The right key: a session. A repeated CHALLENGE gets the same RESPONSE; a repeated CONFIRM
    // is ACKed again (sealed).
    CHECK(handshake(p, fed_key, 11, 1));
    CHECK(exchange(p, TPFED_MSG_HEARTBEAT, 11, pl, 5, &h, &rp) == 1 && h.type == TPFED_MSG_HEARTBEAT);
    // A frame whose tag was tampered with: dropped.
    size_t n = make(TPFED_MSG_HEARTBEAT, 1, 11, pl, 5);
    txbuf[n - 5] ^= 1;
    tpfed_frame_put_crc(txbuf, n);
    lk.n = 0;
    dropped = tpfed_peer_get_stats(p)->auth_dropped;
    tpfed_peer_handle_frame(p, txbuf, n);
    CHECK(lk.n == 0 && tpfed_peer_get_stats(p)->auth_dropped == dropped + 1);
    // Addressed to another device id: dropped (it is sealed, but not for us).
    lk.n = 0;
    n = make(TPFED_MSG_HEARTBEAT, 9, 11, pl, 5);
    tpfed_peer_handle_frame(p, txbuf, n);
    CHECK(lk.n == 0);

    // A second coordinator with the key, while the session is live: RESPONSE, then BUSY sealed
    // with its own session key (reply() opened it with that key); the first session goes on.
    tpfed_auth_session first = coord;
    CHECK(!handshake(p, fed_key, 12, 1));
    CHECK(lk.n == 1);
    tpfed_header_t eh;
    const uint8_t *ep;
    CHECK(tpfed_frame_decode(lk.frames[0], lk.lens[0], 0xFFFF, &eh, &ep) == TPFED_OK);
    CHECK(eh.type == TPFED_MSG_ERROR && eh.session == 12 && (eh.flags & TPFED_FLAG_AUTH));
    CHECK(coord.rx.highest == 1 && coord.session == 12);
    tpfed_error_t e;
    CHECK(tpfed_error_decode(ep, eh.length, &e) == TPFED_OK && e.code == TPFED_ERR_BUSY);
    CHECK(e.text_len == 30 && memcmp(e.text, "peer busy with another session", 30) == 0);
    CHECK(tpfed_peer_session(p) == 11 && tpfed_peer_get_stats(p)->busy == 1);
    coord = first;
    sealing = &coord;
    CHECK(exchange(p, TPFED_MSG_HEARTBEAT, 11, pl, 5, &h, &rp) == 1 && h.type == TPFED_MSG_HEARTBEAT);

    // Silent for longer than TPFED_SESSION_IDLE_MS: a new handshake replaces the session.
    lk.now += TPFED_SESSION_IDLE_MS + 1u;
    CHECK(handshake(p, fed_key, 13, 4));
    CHECK(tpfed_peer_session(p) == 13 && tpfed_peer_device_id(p) == 4);
    CHECK(exchange(p, TPFED_MSG_HEARTBEAT, 13, pl, 5, NULL, NULL) == 0);   // dst 1 is not us now
    CHECK(tpfed_peer_get_stats(p)->sessions == 2);
    sealing = NULL;
}

// Microseconds per tag of a sealed frame of payload n bytes (tpfed_auth_stamp: HMAC + CRC).
static void bench_tags(void) {
    static uint8_t frame[8192];
    tpfed_hmac_key ks;
    tpfed_hmac_key_init(&ks, fed_key, 32);
    const size_t sizes[] = {95, 270, 1024, 4104};
    for (int i = 0; i < 4; i++) {
        tpfed_header_t h;
        memset(&h, 0, sizeof h);
        h.type = TPFED_MSG_PARTIAL;
        h.flags = TPFED_FLAG_AUTH;
        size_t len = 0;
        CHECK(tpfed_frame_begin(frame, sizeof frame, &h, sizes[i], &len) == TPFED_OK);
        int reps = 200000;
        clock_t t0 = clock();
        for (int r = 1; r <= reps; r++) tpfed_auth_stamp(frame, len, &ks, (uint32_t)r);
        double us_stamp = (double)(clock() - t0) / CLOCKS_PER_SEC * 1e6 / reps;
        t0 = clock();
        uint32_t ctr = 0;
        for (int r = 1; r <= reps; r++) tpfed_auth_verify(frame, len, &ks, &ctr);
        double us_verify = (double)(clock() - t0) / CLOCKS_PER_SEC * 1e6 / reps;
        t0 = clock();
        for (int r = 1; r <= reps; r++) tpfed_frame_put_crc(frame, len);
        double us_crc = (double)(clock() - t0) / CLOCKS_PER_SEC * 1e6 / reps;
        printf("bench: payload %5zu B (frame %5zu B): stamp %.3f us, verify %.3f us (CRC alone %.3f us)\n",
               sizes[i], len, us_stamp, us_verify, us_crc);
    }
}

// ------------------------------------------------------------------------- stream helper

static uint8_t wire[8192];
static size_t wire_len;
static void wire_write(void *ctx, const uint8_t *b, uint32_t n) {
    (void)ctx;
    memcpy(wire + wire_len, b, n);
    wire_len += n;
}

static void test_stream(const char *dir) {
    // The helper's encoder writes what tpfed_cobs_encode gives, then 0x00.
    size_t fn;
    uint8_t *frame = read_file(dir, "hello_esp32s3.bin", &fn);
    static uint8_t buf[2048], enc[2048];
    tpfed_stream s;
    tpfed_stream_init(&s, buf, sizeof buf, wire_write, NULL, NULL);
    wire_len = 0;
    tpfed_stream_send_frame(&s, frame, (uint32_t)fn);
    size_t m = tpfed_cobs_encode(enc, sizeof enc, frame, fn);
    CHECK(wire_len == m + 1 && memcmp(wire, enc, m) == 0 && wire[m] == 0);
    // Edge lengths around 254-byte blocks and trailing zeros.
    static uint8_t data[1100];
    for (size_t n = 250; n < 520; n++) {
        for (size_t i = 0; i < n; i++) data[i] = (uint8_t)((i * 7 + n) % 5 ? i + 1 : 0);
        data[n - 1] = (n % 2) ? 0 : 9;
        wire_len = 0;
        tpfed_stream_send_frame(&s, data, (uint32_t)n);
        m = tpfed_cobs_encode(enc, sizeof enc, data, n);
        CHECK(wire_len == m + 1 && memcmp(wire, enc, m) == 0);
    }
    // A HELLO through the stream reaches a peer, whose reply comes back COBS-framed.
    static uint8_t arena[64 * 1024];
    static uint8_t rbuf[TPFED_STREAM_BUFFER_SIZE(1024u)];
    tpfed_stream st;
    tpfed_stream_init(&st, rbuf, sizeof rbuf, wire_write, NULL, NULL);
    tpfed_hal shal = {&st, tpfed_stream_send_frame, link_millis, test_random};
    tpfed_peer_config cfg = {&shal, &info, 6, TPFED_TRANSPORT_SERIAL, 1024, 32, 8, 1000, fed_key, 0};
    tpfed_peer *p = tpfed_peer_init(arena, sizeof arena, &cfg);
    CHECK(p != NULL && tpfed_peer_int8_macs(p) == 1000);
    // A CHALLENGE (the one frame an unauthenticated sender gets an answer to) through the stream.
    static uint8_t pl[256];
    size_t n = 20;
    memset(pl, 0x5A, n);
    pl[0] = TPFED_AUTH_CHALLENGE;
    pl[19] = 3;
    sealing = NULL;
    size_t len = make(TPFED_MSG_AUTH, 3, 0, pl, n);
    m = tpfed_cobs_encode(enc, sizeof enc, txbuf, len);
    enc[m++] = 0;
    wire_len = 0;
    CHECK(tpfed_stream_feed(&st, p, (const uint8_t *)"\x00\x00garbage\x00", 10) == 0);
    CHECK(tpfed_stream_feed(&st, p, enc, m) == 1);
    CHECK(wire_len > 0 && wire[wire_len - 1] == 0);
    int32_t dl = tpfed_cobs_decode(enc, sizeof enc, wire, wire_len - 1);
    tpfed_header_t h;
    const uint8_t *rp;
    CHECK(dl > 0 && tpfed_frame_decode(enc, (size_t)dl, 0xFFFF, &h, &rp) == TPFED_OK);
    CHECK(h.type == TPFED_MSG_AUTH && h.src == 3 && rp[0] == TPFED_AUTH_RESPONSE);
    free(frame);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "shared_protocol/golden";
    size_t mn;
    char *manifest = (char *)read_file(dir, "manifest.json", &mn);
    test_golden_fragments(dir, manifest, "frags_hello_mtu20.bin", "hello_esp32s3.bin", 20, 0);
    test_golden_fragments(dir, manifest, "frags_activation_max_mtu512.bin", "activation_max.bin", 512, 65535);
    test_golden_fragments(dir, manifest, "frags_weights_max_mtu1400.bin", "weights_max_payload.bin", 1400, 4660);
    test_fragment_limits();
    test_share_bytes();
    test_stream(dir);
    test_peer();
    test_kept();
    test_hmac();
    test_replay_window();
    test_auth_peer();
    if (argc > 2 && strcmp(argv[2], "--bench") == 0) bench_tags();
    free(manifest);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_core: all checks passed\n");
    return 0;
}
