// COBS encode/decode and the incremental stream decoder (see tpfed_cobs.h).
#include "tpfed_cobs.h"

size_t tpfed_cobs_max_encoded(size_t n) { return n + n / 254u + 2u; }

size_t tpfed_cobs_encode(uint8_t *dst, size_t cap, const uint8_t *src, size_t n) {
    size_t code_at = 0, out = 1, i;
    uint8_t code = 1;
    if (!dst || cap < 1u || (!src && n)) return 0;
    for (i = 0; i < n; i++) {
        if (src[i] == 0) {
            dst[code_at] = code;
            if (out >= cap) return 0;
            code_at = out++;
            code = 1;
        } else {
            if (out >= cap) return 0;
            dst[out++] = src[i];
            code++;
            // A full block of 254 data bytes ends without an implied zero.
            if (code == 0xFF && i + 1 < n) {
                dst[code_at] = code;
                if (out >= cap) return 0;
                code_at = out++;
                code = 1;
            }
        }
    }
    dst[code_at] = code;
    return out;
}

int32_t tpfed_cobs_decode(uint8_t *dst, size_t cap, const uint8_t *src, size_t n) {
    size_t in = 0, out = 0;
    if (!dst || (!src && n) || n > 0x7FFFFFFFu) return -1;
    while (in < n) {
        uint8_t code = src[in++];
        size_t k;
        if (code == 0) return -1;
        if ((size_t)(code - 1u) > n - in) return -1;
        if ((size_t)(code - 1u) > cap - out) return -1;
        for (k = 1; k < code; k++) {
            uint8_t b = src[in++];
            if (b == 0) return -1;
            dst[out++] = b;
        }
        // Each group but the last and the full (0xFF) ones stands for a zero byte.
        if (code != 0xFF && in < n) {
            if (out >= cap) return -1;
            dst[out++] = 0;
        }
    }
    return (int32_t)out;
}

void tpfed_cobs_stream_init(tpfed_cobs_stream_t *s, uint8_t *buf, size_t cap) {
    s->buf = buf;
    s->cap = cap;
    s->len = 0;
    s->overflow = 0;
    s->dropped = 0;
}

int32_t tpfed_cobs_stream_feed(tpfed_cobs_stream_t *s, uint8_t byte) {
    int32_t n;
    if (byte != 0) {
        if (s->overflow) return 0;
        if (s->len >= s->cap) {
            s->overflow = 1;
            s->dropped++;
            s->len = 0;
            return 0;
        }
        s->buf[s->len++] = byte;
        return 0;
    }
    if (s->overflow) {
        s->overflow = 0;
        return 0;
    }
    if (s->len == 0) return 0;
    n = tpfed_cobs_decode(s->buf, s->cap, s->buf, s->len);
    s->len = 0;
    if (n <= 0) {
        // An empty frame is not a frame either.
        s->dropped++;
        return 0;
    }
    return n;
}
