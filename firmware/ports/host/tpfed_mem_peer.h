// tpfed host port: a peer core whose replies go to memory (tests, parity checks, and the
// coordinator's own share, which it computes in-process through the same core).
//
// The HAL's send_frame appends every frame the core sends to a caller-owned outbox as a record
// of (u32 little-endian length, frame bytes); a frame that does not fit is not stored and
// counted in `overflow`. The clock is the host's monotonic clock, or `now_ms` while
// `manual_clock` is set (for reproducible HEARTBEAT answers; the core's start-up MAC/s
// measurement needs a running clock, so configure int8_macs then).
//
//     tpfed_mem_peer m;                       // must outlive the core
//     tpfed_mem_peer_init(&m, outbox, sizeof outbox);
//     cfg.hal = &m.hal;  p = tpfed_peer_init(arena, size, &cfg);
//     n = tpfed_mem_peer_handle(&m, p, frame, len);   // outbox now holds the n replies
#ifndef TPFED_MEM_PEER_H
#define TPFED_MEM_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_hal.h"
#include "tpfed_peer.h"

// cffi:begin
// Bytes of outbox one record takes beyond the frame itself (its u32 length).
#define TPFED_MEM_RECORD_HEADER 4

typedef struct {
    tpfed_hal hal;          // hand &hal to tpfed_peer_config (ctx is this struct)
    uint8_t *buf;           // outbox, caller-owned
    uint32_t cap;           // its size in bytes
    uint32_t used;          // bytes of records in it
    uint32_t count;         // records (frames) in it
    uint32_t overflow;      // frames that did not fit, since init
    uint32_t sent;          // frames sent through this HAL, since init
    uint8_t manual_clock;   // 1: millis() returns now_ms
    uint32_t now_ms;
} tpfed_mem_peer;

void tpfed_mem_peer_init(tpfed_mem_peer *m, uint8_t *outbox, uint32_t cap);
// Empty the outbox (counters other than used/count are kept).
void tpfed_mem_peer_clear(tpfed_mem_peer *m);
// Clear the outbox, hand one frame to the core, return how many frames it answered with
// (all in the outbox unless overflow grew).
uint32_t tpfed_mem_peer_handle(tpfed_mem_peer *m, tpfed_peer *p, const uint8_t *frame, size_t len);
// The HAL functions, for ports that want to wrap them.
void tpfed_mem_peer_send_frame(void *ctx, const uint8_t *frame, uint32_t n);
uint32_t tpfed_mem_peer_millis(void *ctx);
// cffi:end

#endif
