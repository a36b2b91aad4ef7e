// Datagram fragmentation and reassembly (see tpfed_datagram.h).
#include "tpfed_datagram.h"

#include <string.h>

#include "tpfed_proto.h"

#define FRAG_HDR TPFED_FRAGMENT_HEADER_SIZE

// ------------------------------------------------------------------------------ sending

int tpfed_datagram_split(const uint8_t *frame, uint32_t n, uint32_t mtu, uint16_t frame_id,
                         uint8_t *buf, void (*emit)(void *emit_ctx, const uint8_t *d, uint32_t len),
                         void *emit_ctx) {
    if (mtu <= FRAG_HDR || mtu < TPFED_FRAME_OVERHEAD) return -1;
    if (n <= mtu) {
        emit(emit_ctx, frame, n);
        return 1;
    }
    uint32_t chunk = mtu - FRAG_HDR;
    uint32_t count = n / chunk + (n % chunk != 0);
    if (count > TPFED_DATAGRAM_MAX_FRAGMENTS) return -1;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t at = i * chunk, len = n - at < chunk ? n - at : chunk;
        buf[0] = TPFED_FRAG_MAGIC;
        buf[1] = (uint8_t)frame_id;
        buf[2] = (uint8_t)(frame_id >> 8);
        buf[3] = (uint8_t)i;
        buf[4] = (uint8_t)count;
        memcpy(buf + FRAG_HDR, frame + at, len);
        emit(emit_ctx, buf, FRAG_HDR + len);
    }
    return (int)count;
}

void tpfed_datagram_tx_init(tpfed_datagram_tx *t, uint8_t *buf, uint32_t mtu, uint16_t first_id,
                            void (*emit)(void *emit_ctx, const uint8_t *d, uint32_t len),
                            void *emit_ctx) {
    t->mtu = mtu;
    t->next_id = first_id;
    t->buf = buf;
    t->emit = emit;
    t->emit_ctx = emit_ctx;
    t->refused = 0;
}

void tpfed_datagram_send_frame(void *tx_ctx, const uint8_t *frame, uint32_t n) {
    tpfed_datagram_tx *t = (tpfed_datagram_tx *)tx_ctx;
    int k = tpfed_datagram_split(frame, n, t->mtu, t->next_id, t->buf, t->emit, t->emit_ctx);
    if (k < 0) t->refused++;
    else if (k > 1) t->next_id = (uint16_t)(t->next_id + 1u);
}

// ------------------------------------------------------------------------------ receiving

enum { SLOT_FREE = 0, SLOT_PENDING = 1, SLOT_DONE = 2 };

// A frame in reassembly. Fragments are stored at index * chunk; chunk is the body length of
// any fragment but the last, unknown until one of those arrives: a last fragment that comes
// first is parked at the end of the buffer and moved in place once chunk is known.
typedef struct {
    uint32_t source;
    uint32_t born_ms;
    uint32_t age;          // allocation order
    uint32_t chunk;        // 0 = not known yet
    uint32_t last_len;     // body length of the last fragment, 0 = not here yet
    uint32_t got;          // fragments held
    uint16_t frame_id;
    uint8_t state;
    uint8_t count;
    uint8_t have[32];      // bitmap of fragment indices held
} slot_t;

static size_t align8(size_t n) { return (n + 7u) & ~(size_t)7u; }

size_t tpfed_datagram_rx_bytes(uint32_t slots, uint32_t max_frame) {
    return 7u + align8(sizeof(slot_t) * (size_t)slots) + (size_t)slots * align8(max_frame);
}

static slot_t *slot_at(const tpfed_datagram_rx *r, uint32_t i) { return (slot_t *)r->mem + i; }

static uint8_t *slot_buf(const tpfed_datagram_rx *r, uint32_t i) {
    return r->mem + align8(sizeof(slot_t) * (size_t)r->slots) + (size_t)i * align8(r->max_frame);
}

int tpfed_datagram_rx_init(tpfed_datagram_rx *r, uint8_t *mem, size_t mem_size, uint32_t slots,
                           uint32_t max_frame, uint32_t timeout_ms) {
    memset(r, 0, sizeof *r);
    if (!mem || !slots || max_frame < TPFED_FRAME_OVERHEAD ||
        mem_size < tpfed_datagram_rx_bytes(slots, max_frame))
        return -1;
    r->mem = mem + ((8u - ((uintptr_t)mem & 7u)) & 7u);
    r->slots = slots;
    r->max_frame = max_frame;
    r->timeout_ms = timeout_ms;
    for (uint32_t i = 0; i < slots; i++) memset(slot_at(r, i), 0, sizeof(slot_t));
    return 0;
}

uint32_t tpfed_datagram_rx_expire(tpfed_datagram_rx *r, uint32_t now_ms) {
    uint32_t left = 0;
    for (uint32_t i = 0; i < r->slots; i++) {
        slot_t *s = slot_at(r, i);
        if (s->state != SLOT_PENDING) continue;
        if (now_ms - s->born_ms >= r->timeout_ms) {
            s->state = SLOT_FREE;
            r->stats.expired++;
        } else {
            left++;
        }
    }
    return left;
}

// A slot for a new frame: a free one, else the oldest finished one, else the oldest pending
// one (evicted).
static uint32_t take_slot(tpfed_datagram_rx *r) {
    uint32_t best = 0, best_rank = 0xFFFFFFFFu, best_age = 0;
    for (uint32_t i = 0; i < r->slots; i++) {
        slot_t *s = slot_at(r, i);
        uint32_t rank = s->state == SLOT_FREE ? 0u : s->state == SLOT_DONE ? 1u : 2u;
        uint32_t age = r->clock - s->age;   // larger = older
        if (rank < best_rank || (rank == best_rank && age > best_age)) {
            best = i;
            best_rank = rank;
            best_age = age;
        }
    }
    if (best_rank == 2u) r->stats.evicted++;
    return best;
}

static void start_slot(tpfed_datagram_rx *r, slot_t *s, uint32_t source, uint16_t fid,
                       uint8_t count, uint32_t now_ms) {
    memset(s, 0, sizeof *s);
    s->source = source;
    s->frame_id = fid;
    s->count = count;
    s->state = SLOT_PENDING;
    s->born_ms = now_ms;
    s->age = r->clock++;
}

int32_t tpfed_datagram_rx_feed(tpfed_datagram_rx *r, const uint8_t *d, size_t n, uint32_t source,
                               uint32_t now_ms, const uint8_t **frame) {
    tpfed_datagram_rx_expire(r, now_ms);
    if (n == 0) {
        r->stats.dropped++;
        return 0;
    }
    if (d[0] == TPFED_MAGIC) {
        if (n > r->max_frame || n > 0x7FFFFFFFu) {
            r->stats.dropped++;
            return 0;
        }
        r->stats.frames++;
        *frame = d;
        return (int32_t)n;
    }
    if (d[0] != TPFED_FRAG_MAGIC || n <= FRAG_HDR) {
        r->stats.dropped++;
        return 0;
    }
    uint16_t fid = (uint16_t)(d[1] | (d[2] << 8));
    uint8_t index = d[3], count = d[4];
    const uint8_t *body = d + FRAG_HDR;
    size_t len = n - FRAG_HDR;
    if (count == 0 || index >= count || len > r->max_frame) {
        r->stats.dropped++;
        return 0;
    }
    slot_t *s = NULL;
    uint32_t si = 0;
    for (uint32_t i = 0; i < r->slots; i++) {
        slot_t *c = slot_at(r, i);
        if (c->state != SLOT_FREE && c->source == source && c->frame_id == fid) {
            s = c;
            si = i;
            break;
        }
    }
    if (s && s->state == SLOT_DONE) {
        if (s->count == count) {   // a late copy of a frame delivered already
            r->stats.duplicates++;
            return 0;
        }
        start_slot(r, s, source, fid, count, now_ms);   // the id came round again
    } else if (s && s->count != count) {
        // Same id, different shape: an old frame's leftovers; start over with this one.
        r->stats.evicted++;
        start_slot(r, s, source, fid, count, now_ms);
    } else if (!s) {
        si = take_slot(r);
        s = slot_at(r, si);
        start_slot(r, s, source, fid, count, now_ms);
    }
    if (s->have[index >> 3] & (1u << (index & 7u))) {
        r->stats.duplicates++;
        return 0;
    }
    uint8_t *buf = slot_buf(r, si);
    int last = index == count - 1u;
    int ok = 1;
    if (!last) {
        if (s->chunk == 0) {
            // Now the layout is known: the whole frame must fit, and a parked last fragment
            // moves to its place.
            if ((uint64_t)len * (count - 1u) + 1u > r->max_frame) ok = 0;
            else if (s->last_len) {
                uint64_t at = (uint64_t)len * (count - 1u);
                if (s->last_len > len || at + s->last_len > r->max_frame) ok = 0;
                else memmove(buf + at, buf + r->max_frame - s->last_len, s->last_len);
            }
            if (ok) s->chunk = (uint32_t)len;
        } else if (len != s->chunk) {
            ok = 0;
        }
        if (ok) memcpy(buf + (size_t)index * s->chunk, body, len);
    } else {
        if (s->chunk) {
            if (len > s->chunk || (uint64_t)s->chunk * index + len > r->max_frame) ok = 0;
            else memcpy(buf + (size_t)s->chunk * index, body, len);
        } else if (count == 1u) {
            memcpy(buf, body, len);
        } else {
            memcpy(buf + r->max_frame - len, body, len);   // parked until chunk is known
        }
        if (ok) s->last_len = (uint32_t)len;
    }
    if (!ok) {   // fragments of inconsistent sizes or a frame too large: give it up
        s->state = SLOT_FREE;
        r->stats.dropped++;
        return 0;
    }
    s->have[index >> 3] |= (uint8_t)(1u << (index & 7u));
    s->got++;
    r->stats.fragments++;
    if (s->got < s->count) return 0;
    s->state = SLOT_DONE;
    r->stats.frames++;
    *frame = buf;
    return (int32_t)((count == 1u ? 0u : s->chunk * (count - 1u)) + s->last_len);
}
