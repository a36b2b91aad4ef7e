// libFuzzer harness: the peer core (tpfed_peer.h), fed a sequence of frames.
//
// Input layout (tests/fuzz/gen_corpus.py writes whole sessions in it):
//   byte 0   configuration:
//            bits 0-1  max_frame: 1024, 320, 4096, 65535
//            bit  2    arena: 2 MiB (else 64 KiB)
//            bit  3    fix up every frame's length field and CRC before handing it over (so
//                      mutations get past the frame check and reach the state machine)
//            bits 4-6  arena misalignment 0..7 bytes; 7 also makes init measure int8 MAC/s
//            bit  7    tight limits: max_groups 1, max_ranges 1 (else 255)
//   then     frames, each a u16 little-endian length and that many bytes (the last one cut
//            short if the input ends).
// Every frame goes to tpfed_peer_handle_frame from its own exactly-sized heap block. The HAL's
// send_frame checks every outgoing frame: at most max_frame bytes, tpfed_frame_decode OK (so
// the CRC is right), payload decodes, a type a peer sends, from the peer's own id; its
// millis is a counter. The arena is an exactly-sized heap block (its end is the block's end),
// so ASan catches writes past it. After each frame: the stats count it, the arena use stays
// inside the arena, and the state agrees with the layer counts.
// FUZZ_PEER_TRACE=1 in the environment prints what the peer sends (to look at a seed).
// fuzz-flags: -max_len=131072
#include "fuzz_common.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"

#define SMALL_ARENA (64u * 1024u)
#define BIG_ARENA (2u * 1024u * 1024u)

typedef struct {
    uint32_t now;
    uint32_t max_frame;
    uint32_t sent;           // frames sent during the current handle_frame call
    const tpfed_peer *peer;  // set once init returned
} hal_ctx;

static uint32_t hal_millis(void *ctx) {
    hal_ctx *c = (hal_ctx *)ctx;
    return ++c->now;
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
    if (c->peer) {
        uint8_t id = tpfed_peer_device_id(c->peer);
        FUZZ_CHECK(h.src == (id != TPFED_BROADCAST ? id : 0xFE));
    }
    free(copy);
}

static uint8_t *big_block; // allocated once: 2 MiB + 7 per execution would be slow

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const uint32_t frames[4] = {1024u, 320u, 4096u, 65535u};
    fuzz_in in = {data, size};
    uint8_t cfgb;
    hal_ctx ctx;
    tpfed_hal hal;
    tpfed_device_info info;
    tpfed_peer_config cfg;
    tpfed_peer *p;
    uint8_t *block, *arena;
    size_t arena_size, skew;
    int big;

    if (size < 1) return 0;
    cfgb = fuzz_u8(&in);
    big = (cfgb & 4u) != 0;
    skew = (cfgb >> 4) & 7u;

    memset(&ctx, 0, sizeof ctx);
    ctx.max_frame = frames[cfgb & 3u];
    hal.ctx = &ctx;
    hal.send_frame = hal_send_frame;
    hal.millis = hal_millis;
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
        c2.max_frame = TPFED_PEER_MIN_FRAME - 1u;
        FUZZ_CHECK(tpfed_peer_init(arena, arena_size, &c2) == NULL);
        FUZZ_CHECK(tpfed_peer_arena_min(c2.max_frame) == 0);
    }
    p = tpfed_peer_init(arena, arena_size, &cfg);
    FUZZ_CHECK(p != NULL);
    FUZZ_CHECK((const uint8_t *)p >= arena && (const uint8_t *)p < arena + 8);
    ctx.peer = p;
    FUZZ_CHECK(tpfed_peer_state(p) == TPFED_PEER_IDLE);
    FUZZ_CHECK(tpfed_peer_int8_macs(p) > 0 || skew == 7);
    FUZZ_CHECK(tpfed_peer_arena_size(p) <= arena_size);

    while (in.n >= 2) {
        size_t want = fuzz_u16(&in), n;
        const uint8_t *f = fuzz_take(&in, want, &n);
        uint8_t *fr = fuzz_dup(f, n);
        uint32_t frames_in = tpfed_peer_get_stats(p)->frames_in;
        uint32_t frames_out = tpfed_peer_get_stats(p)->frames_out;
        if ((cfgb & 8u) && n >= TPFED_FRAME_OVERHEAD && n - TPFED_FRAME_OVERHEAD <= 0xFFFFu) {
            size_t pl = n - TPFED_FRAME_OVERHEAD;
            fr[10] = (uint8_t)pl;
            fr[11] = (uint8_t)(pl >> 8);
            tpfed_wr_u32(fr + n - 4, tpfed_crc32(0, fr, n - 4));
        }
        ctx.sent = 0;
        tpfed_peer_handle_frame(p, fr, n);
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
        }
    }
    if (!big) free(block);
    return 0;
}
