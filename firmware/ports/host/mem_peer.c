// A peer core replying into memory (see tpfed_mem_peer.h). POSIX clock.
#define _POSIX_C_SOURCE 200809L
#include "tpfed_mem_peer.h"

#include "tpfed_auth.h"

#include <string.h>
#include <time.h>

void tpfed_mem_peer_send_frame(void *ctx, const uint8_t *frame, uint32_t n) {
    tpfed_mem_peer *m = (tpfed_mem_peer *)ctx;
    m->sent++;
    uint64_t need = (uint64_t)TPFED_MEM_RECORD_HEADER + n;
    if (!m->buf || need > (uint64_t)(m->cap - m->used)) {
        m->overflow++;
        return;
    }
    uint8_t *at = m->buf + m->used;
    at[0] = (uint8_t)n;
    at[1] = (uint8_t)(n >> 8);
    at[2] = (uint8_t)(n >> 16);
    at[3] = (uint8_t)(n >> 24);
    memcpy(at + TPFED_MEM_RECORD_HEADER, frame, n);
    m->used += (uint32_t)need;
    m->count++;
}

uint32_t tpfed_mem_peer_millis(void *ctx) {
    const tpfed_mem_peer *m = (const tpfed_mem_peer *)ctx;
    if (m->manual_clock) return m->now_ms;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

void tpfed_mem_peer_init(tpfed_mem_peer *m, uint8_t *outbox, uint32_t cap) {
    memset(m, 0, sizeof *m);
    m->hal.ctx = m;
    m->hal.send_frame = tpfed_mem_peer_send_frame;
    m->hal.millis = tpfed_mem_peer_millis;
    m->hal.random = tpfed_os_random;
    m->buf = outbox;
    m->cap = outbox ? cap : 0;
}

void tpfed_mem_peer_clear(tpfed_mem_peer *m) {
    m->used = 0;
    m->count = 0;
}

uint32_t tpfed_mem_peer_handle(tpfed_mem_peer *m, tpfed_peer *p, const uint8_t *frame, size_t len) {
    uint32_t before = m->sent;
    tpfed_mem_peer_clear(m);
    tpfed_peer_handle_frame(p, frame, len);
    return m->sent - before;
}
