// libFuzzer harness: COBS framing (tpfed_cobs.h).
//
// The first input byte picks:
//   even  the rest is a frame: encode (exact-size buffers, and one byte short: 0 and no
//         stray write), the encoding holds no 0x00 and fits tpfed_cobs_max_encoded, decodes
//         back (out of place and in place), and fed byte by byte to the stream decoder
//         (after some garbage and a delimiter) yields exactly that frame.
//   odd   the rest is a raw byte stream fed byte by byte to the stream decoder, whose
//         buffer size is drawn from the second byte (small, to reach the overflow path);
//         every frame it returns and its dropped count must match a reference model, and
//         the whole input also goes through tpfed_cobs_decode, whose successes must
//         survive decode(encode(x)) == x.
// A failed check aborts (a finding).
// fuzz-sources: cobs.c
#include "fuzz_common.h"
#include "tpfed_cobs.h"

// Reference decoder of one delimiter-free segment: -1 if malformed.
static long ref_decode(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t in = 0, out = 0, k;
    while (in < n) {
        uint8_t code = src[in++];
        if (code == 0) return -1;
        if ((size_t)code - 1u > n - in) return -1;
        for (k = 1; k < code; k++) {
            if (src[in] == 0) return -1;
            dst[out++] = src[in++];
        }
        if (code != 0xFF && in < n) dst[out++] = 0;
    }
    return (long)out;
}

static void check_frame(const uint8_t *d, size_t n, uint8_t sel) {
    size_t max = tpfed_cobs_max_encoded(n), enc_len, cap, i;
    uint8_t *enc, *dec, *tmp, *sbuf;
    int32_t r;
    tpfed_cobs_stream_t s;
    int got_frame = 0;

    FUZZ_CHECK(max >= n + 2u);
    enc = (uint8_t *)malloc(max - 1u); // no delimiter
    FUZZ_CHECK(enc != NULL);
    enc_len = tpfed_cobs_encode(enc, max - 1u, d, n);
    FUZZ_CHECK(enc_len >= 1u && enc_len <= max - 1u);
    FUZZ_CHECK(enc_len >= n + 1u);
    FUZZ_CHECK(memchr(enc, 0, enc_len) == NULL);

    // Exactly enc_len fits; one less does not (and writes nothing past the buffer).
    tmp = (uint8_t *)malloc(enc_len);
    FUZZ_CHECK(tmp != NULL);
    FUZZ_CHECK(tpfed_cobs_encode(tmp, enc_len, d, n) == enc_len);
    FUZZ_CHECK(memcmp(tmp, enc, enc_len) == 0);
    free(tmp);
    cap = enc_len - 1u - (sel % enc_len);
    tmp = (uint8_t *)malloc(cap ? cap : 1u);
    FUZZ_CHECK(tmp != NULL);
    FUZZ_CHECK(tpfed_cobs_encode(tmp, cap, d, n) == 0);
    free(tmp);

    // Decode back, into an exact-size buffer; one byte short fails.
    dec = (uint8_t *)malloc(n ? n : 1u);
    FUZZ_CHECK(dec != NULL);
    r = tpfed_cobs_decode(dec, n, enc, enc_len);
    FUZZ_CHECK(r == (int32_t)n);
    FUZZ_CHECK(n == 0 || memcmp(dec, d, n) == 0);
    if (n > 0) {
        tmp = (uint8_t *)malloc(n - 1u ? n - 1u : 1u);
        FUZZ_CHECK(tmp != NULL);
        FUZZ_CHECK(tpfed_cobs_decode(tmp, n - 1u, enc, enc_len) == -1);
        free(tmp);
    }
    free(dec);

    // In place.
    tmp = (uint8_t *)malloc(enc_len);
    FUZZ_CHECK(tmp != NULL);
    memcpy(tmp, enc, enc_len);
    r = tpfed_cobs_decode(tmp, enc_len, tmp, enc_len);
    FUZZ_CHECK(r == (int32_t)n);
    FUZZ_CHECK(n == 0 || memcmp(tmp, d, n) == 0);
    free(tmp);

    // Stream: garbage, delimiter, the frame, delimiter. The buffer is as small as the
    // documented minimum allows (max_encoded(n) - 1 holds the segment).
    sbuf = (uint8_t *)malloc(max - 1u);
    FUZZ_CHECK(sbuf != NULL);
    tpfed_cobs_stream_init(&s, sbuf, max - 1u);
    for (i = 0; i < (size_t)(sel & 7u); i++) FUZZ_CHECK(tpfed_cobs_stream_feed(&s, (uint8_t)(0x11 * (i + 1))) == 0);
    (void)tpfed_cobs_stream_feed(&s, 0);
    for (i = 0; i < enc_len; i++) FUZZ_CHECK(tpfed_cobs_stream_feed(&s, enc[i]) == 0);
    {
        uint32_t dropped = s.dropped;
        r = tpfed_cobs_stream_feed(&s, 0);
        if (n == 0) {
            FUZZ_CHECK(r == 0 && s.dropped == dropped + 1u); // an empty frame is no frame
        } else {
            FUZZ_CHECK(r == (int32_t)n);
            FUZZ_CHECK(memcmp(s.buf, d, n) == 0);
            got_frame = 1;
        }
    }
    (void)got_frame;
    // Repeated delimiters are ignored.
    FUZZ_CHECK(tpfed_cobs_stream_feed(&s, 0) == 0);
    free(sbuf);
    free(enc);
}

static void check_stream(const uint8_t *d, size_t n) {
    tpfed_cobs_stream_t s;
    size_t cap, i, seg_start, ref_dropped = 0;
    uint8_t *buf, *ref;
    if (n < 1) return;
    cap = d[0] ? d[0] : 1u;
    if (d[0] >= 0xF0) cap = 4096u; // sometimes roomy
    d++;
    n--;
    buf = (uint8_t *)malloc(cap);
    ref = (uint8_t *)malloc(n ? n : 1u);
    FUZZ_CHECK(buf && ref);
    tpfed_cobs_stream_init(&s, buf, cap);
    seg_start = 0;
    for (i = 0; i < n; i++) {
        int32_t r = tpfed_cobs_stream_feed(&s, d[i]);
        if (d[i] != 0) {
            FUZZ_CHECK(r == 0);
            continue;
        }
        {
            // The reference model of the segment d[seg_start .. i).
            size_t seg = i - seg_start;
            long want = 0;
            if (seg == 0) {
                want = 0;
            } else if (seg > cap) {
                ref_dropped++;
                want = 0;
            } else {
                want = ref_decode(ref, d + seg_start, seg);
                if (want <= 0) {
                    ref_dropped++;
                    want = 0;
                }
            }
            if ((long)r != want) {
                fprintf(stderr, "stream returned %d for segment [%zu, %zu) (cap %zu), reference %ld\n",
                        (int)r, seg_start, i, cap, want);
                abort();
            }
            if (r > 0) {
                FUZZ_CHECK((size_t)r <= cap);
                FUZZ_CHECK(memcmp(s.buf, ref, (size_t)r) == 0);
            }
            seg_start = i + 1;
        }
        FUZZ_CHECK(s.dropped == ref_dropped);
    }
    if (n - seg_start > cap) ref_dropped++; // the stream drops an over-long segment early
    FUZZ_CHECK(s.dropped == ref_dropped);
    free(buf);
    free(ref);

    // One-shot decode of the whole input, with a drawn capacity.
    {
        uint8_t *src = fuzz_dup(d, n);
        size_t dcap = n;
        uint8_t *dst = (uint8_t *)malloc(dcap ? dcap : 1u);
        uint8_t *ref2 = (uint8_t *)malloc(n ? n : 1u);
        int32_t r = tpfed_cobs_decode(dst, dcap, src, n);
        long want;
        FUZZ_CHECK(dst != NULL && ref2 != NULL);
        want = ref_decode(ref2, d, n); // a 0x00 inside is malformed there too
        if ((long)r != want) {
            fprintf(stderr, "tpfed_cobs_decode = %d, reference %ld\n", (int)r, want);
            abort();
        }
        FUZZ_CHECK(r <= 0 || memcmp(dst, ref2, (size_t)r) == 0);
        free(ref2);
        if (r >= 0) {
            // decode(encode(decode(x))) == decode(x): the encoding is canonical, the input
            // need not be.
            size_t m = tpfed_cobs_max_encoded((size_t)r);
            uint8_t *enc = (uint8_t *)malloc(m);
            uint8_t *dec2 = (uint8_t *)malloc(r ? (size_t)r : 1u);
            size_t el;
            FUZZ_CHECK(enc && dec2);
            el = tpfed_cobs_encode(enc, m, dst, (size_t)r);
            FUZZ_CHECK(el >= 1u && el + 1u <= m);
            FUZZ_CHECK(tpfed_cobs_decode(dec2, (size_t)r, enc, el) == r);
            FUZZ_CHECK(r == 0 || memcmp(dec2, dst, (size_t)r) == 0);
            free(enc);
            free(dec2);
        }
        free(dst);
        free(src);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t sel;
    if (size < 1) return 0;
    sel = data[0];
    if (sel & 1u) {
        check_stream(data + 1, size - 1u);
    } else {
        uint8_t *p = fuzz_dup(data + 1, size - 1u);
        check_frame(p, size - 1u, (uint8_t)(sel >> 1));
        free(p);
    }
    return 0;
}
