// libFuzzer harness: the peer core (tpfed_peer.h), fed a sequence of frames.
//
// Input layout (tests/fuzz/gen_corpus.py writes whole sessions in it):
//   byte 0   configuration:
//            bits 0-1  max_frame: 1024, 320, 4096, 65535
//            bit  2    arena: 2 MiB (else 64 KiB)
//            bit  3    fix up every frame before handing it over, so that mutations get past
//                      the frame and tag checks and reach the state machine: its length field,
//                      for a frame with the AUTH flag its tag (re-stamped with its own counter
//                      under the session key the harness derived from the handshake it saw),
//                      then its CRC
//            bits 4-6  arena misalignment 0..7 bytes; 7 also makes init measure int8 MAC/s
//            bit  7    tight limits: max_groups 1, max_ranges 1 (else 255)
//   byte 1   authentication: bit 0  no federation key in the config (else FUZZ_KEY)
//                            bit 1  provision: a keyless peer takes one PROVISION frame
//   then     frames, each a u16 little-endian length and that many bytes (the last one cut
//            short if the input ends).
// The HAL's random is deterministic: byte i of everything it hands out is (uint8_t)i, so the
// first handshake's peer nonce is 00 01 .. 0f, the next one's 10 11 .. 1f (gen_corpus.py
// computes proofs, session keys and tags from that).
// Every frame goes to tpfed_peer_handle_frame from its own exactly-sized heap block. The HAL's
// send_frame checks every outgoing frame: at most max_frame bytes, tpfed_frame_decode OK (so
// the CRC is right), payload decodes, a type a peer sends, from the peer's own id (a RESPONSE
// and a BUSY ERROR: from the id the CHALLENGE gave); unsealed only for a handshake RESPONSE and
// a PROVISION ACK; sealed ones verify under the session key derived from the handshake the
// harness saw (the peer's nonce from its RESPONSE, the federation key of the config or of the
// PROVISION it ACKed), and a new session's ACK and a BUSY ERROR under the newest handshake's.
// Its millis is a counter. The arena is an exactly-sized heap block (its end is the block's
// end), so ASan catches writes past it. After each frame: the stats count it, the arena use
// stays inside the arena, and the state agrees with the layer counts.
// FUZZ_PEER_TRACE=1 in the environment prints what the peer sends (to look at a seed).
// fuzz-flags: -max_len=131072
#include "fuzz_common.h"
#include "tpfed_auth.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"

#define SMALL_ARENA (64u * 1024u)
#define BIG_ARENA (2u * 1024u * 1024u)

// The harness's federation key (gen_corpus.py FUZZ_KEY): 0x30, 0x31, .. 0x4f.
static const uint8_t FUZZ_KEY[TPFED_KEY_SIZE] = {
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f,
    0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x4b, 0x4c, 0x4d, 0x4e, 0x4f};

typedef struct {
    uint8_t nonce_c[TPFED_NONCE_SIZE], nonce_p[TPFED_NONCE_SIZE];
    uint16_t session;
    uint8_t device_id;
    uint8_t valid;
} handshake_seen;

typedef struct {
    uint32_t now;
    uint32_t max_frame;
    uint32_t sent;           // frames sent during the current handle_frame call
    uint32_t random_bytes;   // handed out by hal_random so far
    const tpfed_peer *peer;  // set once init returned
    // What the harness knows of the peer's keys, from the frames it saw go in and out.
    tpfed_hmac_key fed;      // the federation key (config, or the PROVISION the peer ACKed)
    int keyed;
    const uint8_t *provision_key;  // the key of the PROVISION frame being handled, if any
    handshake_seen incoming; // the CHALLENGE being handled, if any
    handshake_seen pending;  // the newest CHALLENGE the peer answered, with its nonce
    tpfed_hmac_key ks;       // the current session's key
    int have_ks;
} hal_ctx;

static uint32_t hal_millis(void *ctx) {
    hal_ctx *c = (hal_ctx *)ctx;
    return ++c->now;
}

static void hal_random(void *ctx, uint8_t *buf, uint32_t n) {
    hal_ctx *c = (hal_ctx *)ctx;
    for (uint32_t i = 0; i < n; i++) buf[i] = (uint8_t)c->random_bytes++;
}

// The key the newest handshake the peer answered derives (0 if there is none).
static int pending_key(const hal_ctx *c, tpfed_hmac_key *k) {
    uint8_t ks[TPFED_KEY_SIZE];
    if (!c->pending.valid || !c->keyed) return 0;
    FUZZ_CHECK(tpfed_auth_derive(ks, &c->fed, TPFED_AUTH_SESSION_KEY, c->pending.nonce_c,
                                 c->pending.nonce_p, c->pending.device_id, c->pending.session) == TPFED_OK);
    tpfed_hmac_key_init(k, ks, sizeof ks);
    return 1;
}

static int verifies(const uint8_t *frame, uint32_t n, const tpfed_hmac_key *k) {
    uint32_t counter;
    return tpfed_auth_verify(frame, n, k, &counter) == TPFED_OK && counter > 0;
}

// What an incoming frame tells the harness (before the peer handles it).
static void note_incoming(hal_ctx *c, const uint8_t *fr, size_t n) {
    tpfed_header_t h;
    const uint8_t *pl;
    c->incoming.valid = 0;
    c->provision_key = NULL;
    if (tpfed_frame_decode(fr, n, TPFED_MAX_PAYLOAD, &h, &pl) != TPFED_OK || (h.flags & TPFED_FLAG_AUTH))
        return;
    if (h.type == TPFED_MSG_AUTH) {
        tpfed_auth_t m;
        tpfed_auth_challenge_t ch;
        size_t used;
        if (tpfed_auth_decode(pl, h.length, &m) == TPFED_OK && m.step == TPFED_AUTH_CHALLENGE &&
            tpfed_auth_challenge_decode(m.body, TPFED_NONCE_SIZE + 3u, &ch, &used) == TPFED_OK) {
            memcpy(c->incoming.nonce_c, ch.nonce_c, TPFED_NONCE_SIZE);
            c->incoming.session = ch.session;
            c->incoming.device_id = ch.device_id;
            c->incoming.valid = 1;
        }
    } else if (h.type == TPFED_MSG_PROVISION) {
        tpfed_provision_t m;
        if (tpfed_provision_decode(pl, h.length, &m) == TPFED_OK) c->provision_key = m.key;
    }
}

// Length field, tag (under the harness's session key, with the frame's own counter) and CRC.
static void fix_up(const hal_ctx *c, uint8_t *fr, size_t n) {
    if (n < TPFED_FRAME_OVERHEAD) return;
    size_t overhead = (fr[3] & TPFED_FLAG_AUTH) ? TPFED_AUTH_FRAME_OVERHEAD : TPFED_FRAME_OVERHEAD;
    if (n < overhead || n - overhead > 0xFFFFu) return;
    size_t pl = n - overhead;
    fr[10] = (uint8_t)pl;
    fr[11] = (uint8_t)(pl >> 8);
    if ((fr[3] & TPFED_FLAG_AUTH) && c->have_ks &&
        tpfed_auth_stamp(fr, n, &c->ks, tpfed_rd_u32(fr + TPFED_HEADER_SIZE + pl)) == TPFED_OK)
        return;   // (stamp wrote the CRC)
    tpfed_wr_u32(fr + n - 4, tpfed_crc32(0, fr, n - 4));
}

static void hal_send_frame(void *ctx, const uint8_t *frame, uint32_t n) {
    hal_ctx *c = (hal_ctx *)ctx;
    tpfed_header_t h;
    const uint8_t *pl;
    uint8_t *copy;
    int rc;
    c->sent++;
    if (n > c->max_frame) {
        fprintf(stderr, "peer sent a frame of %u bytes, max_frame is %u\n", n, c->max_frame);
        abort();
    }
    copy = fuzz_dup(frame, n); // reading all n bytes of the original checks they are there
    rc = tpfed_frame_decode(copy, n, TPFED_MAX_PAYLOAD, &h, &pl);
    if (rc != TPFED_OK) {
        fprintf(stderr, "peer sent a frame that does not decode: %s\n", tpfed_status_str(rc));
        abort();
    }
    FUZZ_CHECK(h.version == TPFED_VERSION);
    rc = tpfed_payload_validate(h.type, pl, h.length);
    if (rc != TPFED_OK) {
        fprintf(stderr, "peer sent a type %u frame whose payload does not decode: %s\n",
                (unsigned)h.type, tpfed_status_str(rc));
        abort();
    }
    switch (h.type) {
    case TPFED_MSG_AUTH:
    case TPFED_MSG_HELLO:
    case TPFED_MSG_READY:
    case TPFED_MSG_PARTIAL:
    case TPFED_MSG_HEARTBEAT:
    case TPFED_MSG_ACK:
    case TPFED_MSG_ERROR:
    case TPFED_MSG_PROBE_REPLY:
        break;
    default:
        fprintf(stderr, "peer sent a frame of type %u\n", (unsigned)h.type);
        abort();
    }
    if (h.type == TPFED_MSG_PARTIAL) {
        tpfed_partial_t m;
        FUZZ_CHECK(tpfed_partial_decode(pl, h.length, &m) == TPFED_OK);
        FUZZ_CHECK(m.encoding == TPFED_ENC_F32 && m.n > 0);
    }
    if (getenv("FUZZ_PEER_TRACE")) {
        fprintf(stderr, "peer -> type %u len %u", (unsigned)h.type, (unsigned)h.length);
        if (h.type == TPFED_MSG_ERROR) {
            tpfed_error_t e;
            if (tpfed_error_decode(pl, h.length, &e) == TPFED_OK)
                fprintf(stderr, " error %u: %.*s", (unsigned)e.code, (int)e.text_len, (const char *)e.text);
        }
        fprintf(stderr, "\n");
    }
    {
        // Authentication: who may send what unsealed, and which key every sealed frame is under.
        int handshake_reply = 0;   // a RESPONSE or BUSY: from the CHALLENGE's device id
        if (h.type == TPFED_MSG_AUTH) {
            tpfed_auth_t m;
            tpfed_auth_response_t r;
            size_t used;
            FUZZ_CHECK(!(h.flags & TPFED_FLAG_AUTH));
            FUZZ_CHECK(tpfed_auth_decode(pl, h.length, &m) == TPFED_OK && m.step == TPFED_AUTH_RESPONSE);
            FUZZ_CHECK(tpfed_auth_response_decode(m.body, h.length - 1u, &r, &used) == TPFED_OK);
            // Only in answer to a CHALLENGE, which is now the newest handshake.
            FUZZ_CHECK(c->incoming.valid && c->keyed);
            c->pending = c->incoming;
            memcpy(c->pending.nonce_p, r.nonce_p, TPFED_NONCE_SIZE);
            FUZZ_CHECK(h.session == c->pending.session);
            handshake_reply = 1;
        } else if (!(h.flags & TPFED_FLAG_AUTH)) {
            tpfed_ack_t a;
            FUZZ_CHECK(h.type == TPFED_MSG_ACK);
            FUZZ_CHECK(tpfed_ack_decode(pl, h.length, &a) == TPFED_OK && a.acked_type == TPFED_MSG_PROVISION);
            FUZZ_CHECK(c->provision_key != NULL);
            tpfed_hmac_key_init(&c->fed, c->provision_key, TPFED_KEY_SIZE);
            c->keyed = 1;
        } else {
            tpfed_hmac_key k;
            int opening = 0;   // a handshake's answer: the new session's ACK, or BUSY
            if (h.type == TPFED_MSG_ACK) {
                tpfed_ack_t a;
                FUZZ_CHECK(tpfed_ack_decode(pl, h.length, &a) == TPFED_OK);
                opening = a.acked_type == TPFED_MSG_AUTH;
            } else if (h.type == TPFED_MSG_ERROR) {
                tpfed_error_t e;
                FUZZ_CHECK(tpfed_error_decode(pl, h.length, &e) == TPFED_OK);
                opening = e.code == TPFED_ERR_BUSY;
            }
            if (opening && pending_key(c, &k) && verifies(frame, n, &k)) {
                FUZZ_CHECK(h.session == c->pending.session);
                handshake_reply = 1;
                if (h.type == TPFED_MSG_ACK) {   // a new session
                    c->ks = k;
                    c->have_ks = 1;
                }
            } else if (!(c->have_ks && verifies(frame, n, &c->ks))) {
                fprintf(stderr, "peer sent a type %u frame sealed under no key the harness knows\n",
                        (unsigned)h.type);
                abort();
            }
        }
        if (handshake_reply && h.type != TPFED_MSG_ACK) {
            FUZZ_CHECK(h.src == c->pending.device_id);   // RESPONSE, BUSY: the CHALLENGE's id
        } else if (c->peer) {
            uint8_t id = tpfed_peer_device_id(c->peer);
            FUZZ_CHECK(h.src == (id != TPFED_BROADCAST ? id : 0xFE));
        }
    }
    free(copy);
}

static uint8_t *big_block; // allocated once: 2 MiB + 7 per execution would be slow

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const uint32_t frames[4] = {1024u, 320u, 4096u, 65535u};
    fuzz_in in = {data, size};
    uint8_t cfgb, authb;
    hal_ctx ctx;
    tpfed_hal hal;
    tpfed_device_info info;
    tpfed_peer_config cfg;
    tpfed_peer *p;
    uint8_t *block, *arena;
    size_t arena_size, skew;
    int big;

    if (size < 2) return 0;
    cfgb = fuzz_u8(&in);
    authb = fuzz_u8(&in);
    big = (cfgb & 4u) != 0;
    skew = (cfgb >> 4) & 7u;

    memset(&ctx, 0, sizeof ctx);
    ctx.max_frame = frames[cfgb & 3u];
    hal.ctx = &ctx;
    hal.send_frame = hal_send_frame;
    hal.millis = hal_millis;
    hal.random = hal_random;
    memset(&info, 0, sizeof info);
    info.board = "fuzz-board-with-a-name-longer-than-sixty-four-bytes-to-check-the-clamp-0123456789";
    info.port = "libfuzzer";
    info.cpu_hz = 240000000u;
    info.ram_bytes = 512u * 1024u;
    info.flash_bytes = 4u * 1024u * 1024u;
    info.cores = 2;
    info.has_fpu = 1;
    memset(&cfg, 0, sizeof cfg);
    cfg.hal = &hal;
    cfg.info = &info;
    cfg.device_class = TPFED_DEV_OTHER;
    cfg.transports = TPFED_TRANSPORT_SERIAL | TPFED_TRANSPORT_UDP;
    cfg.max_frame = ctx.max_frame;
    cfg.max_groups = (cfgb & 0x80u) ? 1u : 255u;
    cfg.max_ranges = (cfgb & 0x80u) ? 1u : 255u;
    cfg.int8_macs = skew == 7 ? 0u : 12345678u;
    cfg.key = (authb & 1u) ? NULL : FUZZ_KEY;
    cfg.provision = (authb & 2u) ? 1u : 0u;
    if (cfg.key) {
        tpfed_hmac_key_init(&ctx.fed, FUZZ_KEY, TPFED_KEY_SIZE);
        ctx.keyed = 1;
    }

    if (big) {
        if (!big_block) big_block = (uint8_t *)malloc(BIG_ARENA + 7u);
        FUZZ_CHECK(big_block != NULL);
        block = big_block;
        arena = block + skew;
        arena_size = BIG_ARENA + 7u - skew;
        memset(block, 0xA5, BIG_ARENA + 7u); // same start every time: reproducible
    } else {
        block = (uint8_t *)malloc(SMALL_ARENA + 7u);
        FUZZ_CHECK(block != NULL);
        arena = block + skew;
        arena_size = SMALL_ARENA + 7u - skew;
        memset(block, 0xA5, SMALL_ARENA + 7u);
    }

    // The documented minimum works at any alignment; less than the fixed part does not.
    {
        size_t min = tpfed_peer_arena_min(cfg.max_frame);
        tpfed_peer_config c2 = cfg;
        FUZZ_CHECK(min > 0);
        if (min > arena_size) { // 65535-byte frames do not fit the small arena
            FUZZ_CHECK(tpfed_peer_init(arena, arena_size, &cfg) == NULL);
            if (!big) free(block);
            return 0;
        }
        c2.int8_macs = 1;
        FUZZ_CHECK(tpfed_peer_init(arena, min, &c2) != NULL);
        FUZZ_CHECK(tpfed_peer_init(arena, min - 8u, &c2) == NULL);
        c2.hal = &(tpfed_hal){hal.ctx, hal.send_frame, hal.millis, NULL};   // random is required
        FUZZ_CHECK(tpfed_peer_init(arena, arena_size, &c2) == NULL);
        c2.hal = &hal;
        c2.max_frame = TPFED_PEER_MIN_FRAME - 1u;
        FUZZ_CHECK(tpfed_peer_init(arena, arena_size, &c2) == NULL);
        FUZZ_CHECK(tpfed_peer_arena_min(c2.max_frame) == 0);
    }
    p = tpfed_peer_init(arena, arena_size, &cfg);
    FUZZ_CHECK(p != NULL);
    FUZZ_CHECK((const uint8_t *)p >= arena && (const uint8_t *)p < arena + 8);
    ctx.peer = p;
    FUZZ_CHECK(tpfed_peer_state(p) == TPFED_PEER_IDLE);
    FUZZ_CHECK(tpfed_peer_keyed(p) == (cfg.key != NULL) && !tpfed_peer_in_session(p));
    FUZZ_CHECK(tpfed_peer_int8_macs(p) > 0 || skew == 7);
    FUZZ_CHECK(tpfed_peer_arena_size(p) <= arena_size);

    while (in.n >= 2) {
        size_t want = fuzz_u16(&in), n;
        const uint8_t *f = fuzz_take(&in, want, &n);
        uint8_t *fr = fuzz_dup(f, n);
        uint32_t frames_in = tpfed_peer_get_stats(p)->frames_in;
        uint32_t frames_out = tpfed_peer_get_stats(p)->frames_out;
        if (cfgb & 8u) fix_up(&ctx, fr, n);
        note_incoming(&ctx, fr, n);
        ctx.sent = 0;
        tpfed_peer_handle_frame(p, fr, n);
        ctx.provision_key = NULL;   // (points into fr)
        free(fr);
        {
            const tpfed_peer_stats *st = tpfed_peer_get_stats(p);
            int state = tpfed_peer_state(p);
            uint32_t assigned = tpfed_peer_layers_assigned(p), held = tpfed_peer_layers_held(p);
            FUZZ_CHECK(st->frames_in == frames_in + 1u);
            FUZZ_CHECK(st->frames_out - frames_out == ctx.sent);
            FUZZ_CHECK(ctx.sent <= 3u);
            FUZZ_CHECK(tpfed_peer_arena_used(p) <= tpfed_peer_arena_size(p));
            FUZZ_CHECK(held <= assigned);
            FUZZ_CHECK(state == TPFED_PEER_IDLE || state == TPFED_PEER_ASSIGNED ||
                       state == TPFED_PEER_READY);
            if (state == TPFED_PEER_IDLE) FUZZ_CHECK(assigned == 0);
            if (state == TPFED_PEER_READY) FUZZ_CHECK(held == assigned);
            // Nothing is assigned outside a session; without a key nothing is answered.
            if (!tpfed_peer_in_session(p)) FUZZ_CHECK(assigned == 0 && tpfed_peer_session(p) == 0);
            if (!tpfed_peer_keyed(p)) FUZZ_CHECK(ctx.sent == 0);
        }
    }
    if (!big) free(block);
    return 0;
}
