// COBS byte-stream helper around the peer core (see tpfed_stream.h).
#include "tpfed_stream.h"

#include <string.h>

size_t tpfed_stream_buffer_bytes(uint32_t max_frame) { return tpfed_cobs_max_encoded(max_frame); }

void tpfed_stream_init(tpfed_stream *s, uint8_t *buf, size_t buf_size,
                       void (*write)(void *port_ctx, const uint8_t *buf, uint32_t n),
                       uint32_t (*read)(void *port_ctx, uint8_t *buf, uint32_t cap),
                       void *port_ctx) {
    s->write = write;
    s->read = read;
    s->port_ctx = port_ctx;
    tpfed_cobs_stream_init(&s->cobs, buf, buf_size);
}

// COBS-encode frame[0..n) straight onto the link, one block at a time, then the delimiter.
void tpfed_stream_send_frame(void *stream_ctx, const uint8_t *frame, uint32_t n) {
    tpfed_stream *s = (tpfed_stream *)stream_ctx;
    uint8_t block[255];
    uint32_t i = 0;
    for (;;) {
        uint32_t len = 0;
        while (i + len < n && len < 254 && frame[i + len] != 0) len++;
        block[0] = (uint8_t)(len + 1);
        memcpy(block + 1, frame + i, len);
        s->write(s->port_ctx, block, len + 1);
        i += len;
        if (i == n) break;
        if (len < 254) i++;   // the zero this block stands for
        if (i == n && len < 254) {
            block[0] = 1;
            s->write(s->port_ctx, block, 1);
            break;
        }
    }
    block[0] = 0;
    s->write(s->port_ctx, block, 1);
}

int tpfed_stream_feed(tpfed_stream *s, tpfed_peer *p, const uint8_t *data, size_t n) {
    int frames = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t len = tpfed_cobs_stream_feed(&s->cobs, data[i]);
        if (len > 0) {
            tpfed_peer_handle_frame(p, s->cobs.buf, (size_t)len);
            frames++;
        }
    }
    return frames;
}

int tpfed_stream_poll(tpfed_stream *s, tpfed_peer *p) {
    uint8_t chunk[64];
    int frames = 0;
    uint32_t n;
    if (!s->read) return 0;
    while ((n = s->read(s->port_ctx, chunk, sizeof chunk)) > 0) frames += tpfed_stream_feed(s, p, chunk, n);
    return frames;
}

uint32_t tpfed_stream_dropped(const tpfed_stream *s) { return s->cobs.dropped; }
