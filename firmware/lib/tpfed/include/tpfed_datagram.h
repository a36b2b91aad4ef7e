// Datagram side of a peer (UDP, BLE, WebSocket): fragmentation and reassembly of frames,
// byte-compatible with shared_protocol/framing.py's DatagramFramer. A frame of at most mtu
// bytes travels as one datagram, unchanged; a larger one as count (<= 255) fragments, each
// FragmentHeader (magic 0xA8, frame_id u16 LE, index u8, count u8) + the index-th slice of
// mtu - 5 bytes (the last one shorter). No heap: memory comes from the caller.
#ifndef TPFED_DATAGRAM_H
#define TPFED_DATAGRAM_H

#include <stddef.h>
#include <stdint.h>

// cffi:begin
#define TPFED_DATAGRAM_MAX_FRAGMENTS 255

// ------------------------------------------------------------------ sending
// Emit frame[0..n) as datagrams of at most mtu bytes through emit(emit_ctx, datagram, len)
// (one call per datagram, in index order; the datagram bytes are valid during the call only).
// buf: mtu bytes of scratch for a fragment. frame_id is used only if the frame is split.
// Returns the number of datagrams emitted, or -1 if mtu is too small (<= 5 or below a frame
// header + CRC) or the frame needs more than 255 fragments (nothing is emitted then).
int tpfed_datagram_split(const uint8_t *frame, uint32_t n, uint32_t mtu, uint16_t frame_id,
                         uint8_t *buf, void (*emit)(void *emit_ctx, const uint8_t *d, uint32_t len),
                         void *emit_ctx);

// A sender that numbers its frames: usable as a tpfed_hal send_frame (ctx = the sender).
typedef struct {
    uint32_t mtu;
    uint16_t next_id;      // frame_id of the next split frame (wraps)
    uint8_t *buf;          // mtu bytes, caller-owned
    void (*emit)(void *emit_ctx, const uint8_t *d, uint32_t len);
    void *emit_ctx;
    uint32_t refused;      // frames too large to send at this mtu
} tpfed_datagram_tx;

// first_id should differ across restarts of the sender (e.g. from a clock or random source).
void tpfed_datagram_tx_init(tpfed_datagram_tx *t, uint8_t *buf, uint32_t mtu, uint16_t first_id,
                            void (*emit)(void *emit_ctx, const uint8_t *d, uint32_t len),
                            void *emit_ctx);
void tpfed_datagram_send_frame(void *tx_ctx, const uint8_t *frame, uint32_t n);

// ------------------------------------------------------------------ receiving
typedef struct {
    uint32_t frames;       // frames delivered (whole or reassembled)
    uint32_t fragments;    // fragments accepted
    uint32_t duplicates;   // fragments seen before (ignored)
    uint32_t expired;      // incomplete frames dropped by timeout
    uint32_t evicted;      // incomplete frames dropped to make room (or restarted)
    uint32_t dropped;      // datagrams thrown away (bad magic, bad fragment, too large)
} tpfed_datagram_stats;

typedef struct {
    uint8_t *mem;          // slot table then slot buffers (caller's memory, 8-aligned inside)
    uint32_t slots;        // frames in flight at most
    uint32_t max_frame;    // largest frame reassembled
    uint32_t timeout_ms;   // an incomplete frame older than this is dropped
    uint32_t clock;        // allocation counter (age order of slots)
    tpfed_datagram_stats stats;
} tpfed_datagram_rx;

// Memory tpfed_datagram_rx_init needs for `slots` frames of up to max_frame bytes in flight.
size_t tpfed_datagram_rx_bytes(uint32_t slots, uint32_t max_frame);
// Returns 0, or -1 if mem_size is below tpfed_datagram_rx_bytes(slots, max_frame) or slots is 0.
int tpfed_datagram_rx_init(tpfed_datagram_rx *r, uint8_t *mem, size_t mem_size, uint32_t slots,
                           uint32_t max_frame, uint32_t timeout_ms);
// One received datagram from `source` (any key that tells senders apart, e.g. an address
// hash) at time now_ms. Returns the length of a complete frame and sets *frame to it (the
// datagram itself if it was a whole frame, else a slot buffer valid until the next call), or 0
// (fragment stored, duplicate, or dropped). Frames are not CRC-checked here: the peer does.
int32_t tpfed_datagram_rx_feed(tpfed_datagram_rx *r, const uint8_t *d, size_t n, uint32_t source,
                               uint32_t now_ms, const uint8_t **frame);
// Drop incomplete frames older than the timeout; returns how many are still in flight.
uint32_t tpfed_datagram_rx_expire(tpfed_datagram_rx *r, uint32_t now_ms);
// cffi:end

#endif
