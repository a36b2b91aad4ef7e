// Kernel server for the firmware unit tests: the host (test/test_custom_runner.py) sends
// requests as COBS frames over UART0 and checks every answer bit for bit against the host's
// CFFI build of the same kernel sources.
//
// Request: u8 op, then the op's arguments (little-endian). Reply: u8 op, then the results;
// a malformed request is answered with the single byte 0xEE.
#include <stddef.h>
#include <string.h>

#include "board.h"
#include "tpfed_cobs.h"
#include "tpfed_kernels.h"
#include "tpfed_math.h"
#include "tpfed_sha256.h"

enum {
    OP_INFO = 0x01,
    OP_QUANTIZE = 0x02,
    OP_MATMUL = 0x03,
    OP_SWIGLU = 0x04,
    OP_ATTENTION = 0x05,
    OP_ROPE = 0x06,
    OP_RMSNORM = 0x07,
    OP_SOFTMAX = 0x08,
    OP_SHA256 = 0x09,
    OP_DEQUANTIZE = 0x0A,
    OP_MATH = 0x0B,     // u8 function (0 exp, 1 log, 2 sincos), u16 n, n floats
    OP_BAD = 0xEE,
};

// Sized for the largest request (a 64 x 172 matmul, about 12 KB) within the 64 KiB SRAM.
#define WORK_BYTES 14336
#define FRAME_BYTES 13312
#define REPLY_BYTES 2048

static uint8_t rx_frame[FRAME_BYTES];
static uint8_t tx_plain[REPLY_BYTES];
static uint8_t tx_cobs[REPLY_BYTES + REPLY_BYTES / 254 + 8];
static uint32_t work[WORK_BYTES / 4];   // word-aligned scratch for kernel arguments

typedef struct {
    const uint8_t *p;
    size_t left;
    int bad;
} reader;

static uint32_t rd(reader *r, int size) {
    if (r->bad || r->left < (size_t)size) { r->bad = 1; return 0; }
    uint32_t v = 0;
    for (int i = 0; i < size; i++) v |= (uint32_t)r->p[i] << (8 * i);
    r->p += size;
    r->left -= (size_t)size;
    return v;
}

// Copy n bytes of the request into the scratch area at *used; returns the aligned pointer.
static void *take(reader *r, size_t n, size_t *used) {
    size_t at = (*used + 3u) & ~(size_t)3u;
    if (r->bad || r->left < n || at + n > WORK_BYTES) { r->bad = 1; return NULL; }
    uint8_t *dst = (uint8_t *)work + at;
    memcpy(dst, r->p, n);
    r->p += n;
    r->left -= n;
    *used = at + n;
    return dst;
}

static void *scratch(size_t n, size_t *used, reader *r) {
    size_t at = (*used + 3u) & ~(size_t)3u;
    if (at + n > WORK_BYTES) { r->bad = 1; return NULL; }
    *used = at + n;
    return (uint8_t *)work + at;
}

static void send_reply(size_t n) {
    size_t m = tpfed_cobs_encode(tx_cobs, sizeof tx_cobs - 1, tx_plain, n);
    tx_cobs[m++] = 0;
    uart_write(tx_cobs, (uint32_t)m);
}

static size_t put(size_t at, const void *src, size_t n) {
    if (at + n > REPLY_BYTES) return at;   // callers keep replies below REPLY_BYTES
    memcpy(tx_plain + at, src, n);
    return at + n;
}

static size_t handle(const uint8_t *req, size_t len) {
    reader r = {req + 1, len - 1, 0};
    size_t used = 0, out = 1;
    tx_plain[0] = req[0];
    switch (req[0]) {
    case OP_INFO: {
        const char *v = tpfed_kernels_variant();
        uint32_t hz = BOARD_CPU_HZ;
        out = put(out, &hz, 4);
        out = put(out, v, strlen(v));
        break;
    }
    case OP_QUANTIZE: {
        int n = (int)rd(&r, 2);
        float *x = take(&r, 4u * n, &used);
        int8_t *qs = scratch((size_t)n, &used, &r);
        uint16_t *d = scratch(2u * ((n + 31) / 32), &used, &r);
        if (r.bad || r.left) return 0;
        quantize_q8_0(qs, d, x, n);
        out = put(out, qs, (size_t)n);
        out = put(out, d, 2u * ((n + 31) / 32));
        break;
    }
    case OP_DEQUANTIZE: {
        int n = (int)rd(&r, 2);
        int8_t *qs = take(&r, (size_t)n, &used);
        uint16_t *d = take(&r, 2u * ((n + 31) / 32), &used);
        float *x = scratch(4u * n, &used, &r);
        if (r.bad || r.left) return 0;
        dequantize_q8_0(x, qs, d, n);
        out = put(out, x, 4u * n);
        break;
    }
    case OP_MATMUL: {
        int rows = (int)rd(&r, 2), cols = (int)rd(&r, 2);
        int nb = (cols + 31) / 32;
        int8_t *wqs = take(&r, (size_t)rows * cols, &used);
        uint16_t *wd = take(&r, 2u * rows * nb, &used);
        int8_t *xqs = take(&r, (size_t)cols, &used);
        uint16_t *xd = take(&r, 2u * nb, &used);
        float *o = scratch(4u * rows, &used, &r);
        if (r.bad || r.left) return 0;
        matmul_q8_0_f32(o, wqs, wd, xqs, xd, rows, cols);
        out = put(out, o, 4u * rows);
        break;
    }
    case OP_SWIGLU: {
        int n = (int)rd(&r, 2);
        float *g = take(&r, 4u * n, &used);
        float *u = take(&r, 4u * n, &used);
        if (r.bad || r.left) return 0;
        swiglu_f32(g, g, u, n);
        out = put(out, g, 4u * n);
        break;
    }
    case OP_ATTENTION: {
        int n_q = (int)rd(&r, 2), hs = (int)rd(&r, 2), pos = (int)rd(&r, 2);
        float *q = take(&r, 4u * n_q * hs, &used);
        float *k = take(&r, 4u * (pos + 1) * hs, &used);
        float *v = take(&r, 4u * (pos + 1) * hs, &used);
        float *o = scratch(4u * n_q * hs, &used, &r);
        float *s = scratch(4u * (pos + 1), &used, &r);
        if (r.bad || r.left) return 0;
        attention_f32(o, q, k, v, n_q, hs, pos, hs, s);
        out = put(out, o, 4u * n_q * hs);
        break;
    }
    case OP_ROPE: {
        int n = (int)rd(&r, 2), hs = (int)rd(&r, 2), pos = (int)rd(&r, 2);
        uint32_t bits = rd(&r, 4);
        float theta;
        memcpy(&theta, &bits, 4);
        float *x = take(&r, 4u * n, &used);
        if (r.bad || r.left || hs <= 0 || n % hs) return 0;
        rope_f32(x, n, hs, pos, theta);
        out = put(out, x, 4u * n);
        break;
    }
    case OP_RMSNORM: {
        int n = (int)rd(&r, 2);
        uint32_t bits = rd(&r, 4);
        float eps;
        memcpy(&eps, &bits, 4);
        float *x = take(&r, 4u * n, &used);
        float *w = take(&r, 4u * n, &used);
        if (r.bad || r.left) return 0;
        rmsnorm_f32(x, x, w, n, eps);
        out = put(out, x, 4u * n);
        break;
    }
    case OP_SOFTMAX: {
        int n = (int)rd(&r, 2);
        float *x = take(&r, 4u * n, &used);
        if (r.bad || r.left) return 0;
        softmax_f32(x, n);
        out = put(out, x, 4u * n);
        break;
    }
    case OP_MATH: {
        int fn = (int)rd(&r, 1), n = (int)rd(&r, 2);
        float *x = take(&r, 4u * n, &used);
        float *y = scratch(8u * n, &used, &r);
        if (r.bad || r.left || fn > 2 || 1 + (fn == 2 ? 8u : 4u) * n > REPLY_BYTES) return 0;
        if (fn == 0) {
            exp_f32_n(y, x, n);
        } else if (fn == 1) {
            log_f32_n(y, x, n);
        } else {
            sincos_f32_n(y, y + n, x, n);
        }
        out = put(out, y, (fn == 2 ? 8u : 4u) * n);
        break;
    }
    case OP_SHA256: {
        uint8_t digest[TPFED_SHA256_DIGEST];
        tpfed_sha256(digest, r.p, r.left);
        out = put(out, digest, sizeof digest);
        break;
    }
    default:
        return 0;
    }
    return out;
}

int main(void) {
    board_init();
    static tpfed_cobs_stream_t stream;
    tpfed_cobs_stream_init(&stream, rx_frame, sizeof rx_frame);
    uint8_t chunk[64];
    for (;;) {
        uint32_t n = uart_read(chunk, sizeof chunk);
        if (!n) {
            board_sleep();
            continue;
        }
        for (uint32_t i = 0; i < n; i++) {
            int32_t len = tpfed_cobs_stream_feed(&stream, chunk[i]);
            if (len <= 0) continue;
            size_t reply = handle(rx_frame, (size_t)len);
            if (!reply) {
                tx_plain[0] = OP_BAD;
                reply = 1;
            }
            send_reply(reply);
        }
    }
}
