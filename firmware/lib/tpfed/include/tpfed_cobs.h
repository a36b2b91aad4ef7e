// COBS (Consistent Overhead Byte Stuffing) framing for byte streams (serial, TCP).
// A frame travels as cobs(frame) followed by one 0x00 delimiter; the encoded bytes contain no
// 0x00, so a receiver resynchronises at the next delimiter after garbage.
// Encoding adds at most len/254 + 1 bytes (plus the delimiter). No heap; bounds-checked.
#ifndef TPFED_COBS_H
#define TPFED_COBS_H

#include <stddef.h>
#include <stdint.h>

// cffi:begin
// Worst-case encoded size of n bytes, delimiter included.
size_t tpfed_cobs_max_encoded(size_t n);

// Encode src[0..n) into dst (no delimiter written). Returns bytes written, or 0 if cap is
// too small (an empty input encodes to the single byte 0x01).
size_t tpfed_cobs_encode(uint8_t *dst, size_t cap, const uint8_t *src, size_t n);

// Decode one delimiter-free COBS segment src[0..n) into dst. Returns the decoded length, or
// -1 if the segment is malformed (a 0x00 inside, a code running past the end) or dst too small.
// dst may equal src (in-place decoding: output never overtakes input).
int32_t tpfed_cobs_decode(uint8_t *dst, size_t cap, const uint8_t *src, size_t n);

// Incremental stream decoder: feed bytes one at a time (e.g. from a UART interrupt or a
// read loop). The caller owns buf (at least tpfed_cobs_max_encoded(max frame) bytes).
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    uint8_t overflow; // current segment exceeded cap: discard it up to the next delimiter
    uint32_t dropped; // segments thrown away (malformed or too long)
} tpfed_cobs_stream_t;

void tpfed_cobs_stream_init(tpfed_cobs_stream_t *s, uint8_t *buf, size_t cap);
// Feed one byte. Returns the length (> 0) of a decoded frame now in s->buf (valid until the
// next call), 0 if no frame is complete yet. Malformed and over-long segments are counted in
// s->dropped and skipped; empty segments (repeated delimiters) are ignored.
int32_t tpfed_cobs_stream_feed(tpfed_cobs_stream_t *s, uint8_t byte);
// cffi:end

#endif
