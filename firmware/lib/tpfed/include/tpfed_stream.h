// Byte-stream side of a peer (UART, TCP): COBS framing around the frame-level core.
// Outgoing: tpfed_stream_send_frame is a tpfed_hal send_frame (ctx = the tpfed_stream): it
// COBS-encodes the frame straight onto the port's write function and ends it with 0x00.
// Incoming: tpfed_stream_poll reads what the port's read function has (or tpfed_stream_feed
// takes bytes the port got some other way), decodes COBS in the caller's buffer and hands each
// complete frame to tpfed_peer_handle_frame. No heap.
#ifndef TPFED_STREAM_H
#define TPFED_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_cobs.h"
#include "tpfed_peer.h"

// Decode buffer bytes for frames up to max_frame (a COBS-encoded frame, decoded in place), as
// a constant expression for static buffers.
#define TPFED_STREAM_BUFFER_SIZE(max_frame) ((max_frame) + (max_frame) / 254u + 2u)

// cffi:begin
typedef struct {
    // Queue all n bytes on the link; may block until they fit.
    void (*write)(void *port_ctx, const uint8_t *buf, uint32_t n);
    // Copy up to cap received bytes into buf without blocking; returns how many (0: none).
    // May be NULL when the port feeds bytes with tpfed_stream_feed.
    uint32_t (*read)(void *port_ctx, uint8_t *buf, uint32_t cap);
    void *port_ctx;
    tpfed_cobs_stream_t cobs;
} tpfed_stream;

// Decode buffer bytes for frames up to max_frame.
size_t tpfed_stream_buffer_bytes(uint32_t max_frame);
// buf: buf_size bytes (tpfed_stream_buffer_bytes(max_frame)), owned by the caller, kept.
void tpfed_stream_init(tpfed_stream *s, uint8_t *buf, size_t buf_size,
                       void (*write)(void *port_ctx, const uint8_t *buf, uint32_t n),
                       uint32_t (*read)(void *port_ctx, uint8_t *buf, uint32_t cap),
                       void *port_ctx);
// A tpfed_hal send_frame: stream_ctx is the tpfed_stream.
void tpfed_stream_send_frame(void *stream_ctx, const uint8_t *frame, uint32_t n);
// Feed received bytes; every complete frame goes to tpfed_peer_handle_frame(p, ...).
// Returns the number of frames handled.
int tpfed_stream_feed(tpfed_stream *s, tpfed_peer *p, const uint8_t *data, size_t n);
// Read everything the port's read function has and feed it. Returns frames handled.
int tpfed_stream_poll(tpfed_stream *s, tpfed_peer *p);
// Segments thrown away so far (malformed COBS, over-long).
uint32_t tpfed_stream_dropped(const tpfed_stream *s);
// cffi:end

#endif
