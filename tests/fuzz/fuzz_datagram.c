// libFuzzer harness: datagram fragmentation and reassembly (tpfed_datagram.h).
//
// Input: a configuration (slots, max_frame, timeout, alignment of the caller's memory),
// then operations until the input runs out:
//   raw      a datagram from one of four sources, at a drawn time step: whatever
//            tpfed_datagram_rx_feed returns must be at most max_frame bytes, lie inside the
//            datagram or the rx memory (read in full: ASan), and the stats only grow.
//   split    a frame is split by tpfed_datagram_send_frame at a drawn MTU and its datagrams
//            are fed from a source of their own, in a drawn order with drawn repeats (some
//            dropped): exactly the frame must come back, once, when all fragments are in and
//            it is at most max_frame bytes; nothing when a fragment is missing or it is too big.
//   expire   tpfed_datagram_rx_expire at a later time.
// The rx memory is an exactly-sized heap block, so ASan catches any access outside it.
// fuzz-sources: datagram.c
// fuzz-flags: -max_len=16384
#include "fuzz_common.h"
#include "tpfed_datagram.h"
#include "tpfed_proto.h"

#define MAX_DGRAMS 300

typedef struct {
    uint8_t *d[MAX_DGRAMS];
    uint32_t n[MAX_DGRAMS];
    int count;
    int overflow;
} dgram_list;

static void collect(void *ctx, const uint8_t *d, uint32_t len) {
    dgram_list *l = (dgram_list *)ctx;
    if (l->count >= MAX_DGRAMS) {
        l->overflow = 1;
        return;
    }
    l->d[l->count] = fuzz_dup(d, len); // exactly sized: what rx reads of it is checked
    l->n[l->count] = len;
    l->count++;
}

static void check_stats_grow(const tpfed_datagram_stats *a, const tpfed_datagram_stats *b) {
    FUZZ_CHECK(b->frames >= a->frames && b->fragments >= a->fragments);
    FUZZ_CHECK(b->duplicates >= a->duplicates && b->expired >= a->expired);
    FUZZ_CHECK(b->evicted >= a->evicted && b->dropped >= a->dropped);
}

// Feed one datagram and check what comes back; returns the frame length (0: none).
static int32_t feed(tpfed_datagram_rx *r, const uint8_t *mem, size_t mem_size, const uint8_t *d,
                    size_t n, uint32_t source, uint32_t now, const uint8_t **frame) {
    tpfed_datagram_stats before = r->stats;
    const uint8_t *f = NULL;
    int32_t got = tpfed_datagram_rx_feed(r, d, n, source, now, &f);
    check_stats_grow(&before, &r->stats);
    FUZZ_CHECK(got >= 0);
    if (got > 0) {
        uint8_t *copy;
        FUZZ_CHECK((uint32_t)got <= r->max_frame);
        FUZZ_CHECK(f != NULL);
        if (f >= d && f < d + n) {
            FUZZ_CHECK(f == d && (size_t)got == n); // a whole frame is the datagram itself
        } else {
            FUZZ_CHECK(f >= mem && f + got <= mem + mem_size);
        }
        FUZZ_CHECK(r->stats.frames == before.frames + 1u);
        copy = fuzz_dup(f, (size_t)got); // reads all of it
        free(copy);
    }
    *frame = f;
    return got;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_in in = {data, size};
    tpfed_datagram_rx r;
    uint32_t slots = 1u + fuzz_u8(&in) % 8u;
    uint32_t max_frame = TPFED_FRAME_OVERHEAD + fuzz_u16(&in) % 4096u;
    uint32_t timeout = 1u + fuzz_u8(&in) * 8u;
    uint32_t skew = fuzz_u8(&in) % 8u;
    size_t need = tpfed_datagram_rx_bytes(slots, max_frame);
    uint8_t *block = (uint8_t *)malloc(need + skew);
    uint8_t *mem = block + skew;
    uint32_t now = fuzz_u32(&in), next_id = 0;
    FUZZ_CHECK(block != NULL);
    // Too little memory or no slots: refused.
    FUZZ_CHECK(tpfed_datagram_rx_init(&r, mem, need - 1u, slots, max_frame, timeout) == -1);
    FUZZ_CHECK(tpfed_datagram_rx_init(&r, mem, need, 0, max_frame, timeout) == -1);
    FUZZ_CHECK(tpfed_datagram_rx_init(&r, mem, need, slots, max_frame, timeout) == 0);

    while (in.n > 0) {
        uint8_t op = fuzz_u8(&in);
        const uint8_t *frame;
        if (op < 0xA0) {
            // raw datagram
            uint32_t source = op & 3u;
            size_t n;
            const uint8_t *d;
            uint8_t *dd;
            now += (op >> 2) & 7u;
            d = fuzz_take(&in, fuzz_u16(&in) % 4200u, &n);
            dd = fuzz_dup(d, n);
            (void)feed(&r, mem, need, dd, n, source, now, &frame);
            free(dd);
        } else if (op < 0xF0) {
            // split and reassemble one frame, from a source of its own
            uint32_t mtu = fuzz_u16(&in) % 1500u;
            size_t flen_want = fuzz_u16(&in) % 8192u, flen, i;
            uint8_t order_seed = fuzz_u8(&in), drop_one = fuzz_u8(&in);
            const uint8_t *fb = fuzz_take(&in, flen_want, &flen);
            uint8_t *fr = (uint8_t *)malloc(flen_want ? flen_want : 1u);
            uint8_t *mtubuf = (uint8_t *)malloc(mtu ? mtu : 1u);
            dgram_list l;
            tpfed_datagram_tx tx;
            int got_frames = 0, k, missing = -1;
            uint32_t source = 0x100u + (op & 0x0Fu);
            FUZZ_CHECK(fr && mtubuf);
            // The frame: drawn bytes, the rest a pattern; it starts with the frame magic.
            if (flen) memcpy(fr, fb, flen);
            for (i = flen; i < flen_want; i++) fr[i] = (uint8_t)(i * 7u + 1u);
            flen = flen_want;
            if (flen) fr[0] = TPFED_MAGIC;
            memset(&l, 0, sizeof l);
            tpfed_datagram_tx_init(&tx, mtubuf, mtu, (uint16_t)next_id, collect, &l);
            tpfed_datagram_send_frame(&tx, fr, (uint32_t)flen);
            FUZZ_CHECK(!l.overflow);
            if (mtu <= TPFED_FRAGMENT_HEADER_SIZE || mtu < TPFED_FRAME_OVERHEAD) {
                FUZZ_CHECK(l.count == 0 && tx.refused == 1u);
            } else if (flen <= mtu) {
                FUZZ_CHECK(l.count == 1 && l.n[0] == flen);
                FUZZ_CHECK(flen == 0 || memcmp(l.d[0], fr, flen) == 0);
                FUZZ_CHECK(tx.next_id == (uint16_t)next_id);
            } else {
                size_t chunk = mtu - TPFED_FRAGMENT_HEADER_SIZE;
                size_t cnt = (flen + chunk - 1u) / chunk;
                if (cnt > 255u) {
                    FUZZ_CHECK(l.count == 0 && tx.refused == 1u);
                } else {
                    size_t at = 0;
                    FUZZ_CHECK((size_t)l.count == cnt);
                    FUZZ_CHECK(tx.next_id == (uint16_t)(next_id + 1u));
                    for (k = 0; k < l.count; k++) {
                        FUZZ_CHECK(l.n[k] <= mtu && l.n[k] > TPFED_FRAGMENT_HEADER_SIZE);
                        FUZZ_CHECK(l.d[k][0] == TPFED_FRAG_MAGIC && l.d[k][3] == k && l.d[k][4] == cnt);
                        FUZZ_CHECK(memcmp(l.d[k] + 5, fr + at, l.n[k] - 5u) == 0);
                        at += l.n[k] - 5u;
                    }
                    FUZZ_CHECK(at == flen);
                }
            }
            if (tx.next_id != (uint16_t)next_id) next_id = tx.next_id;
            // Feed in a drawn order (a rotation and a stride that is coprime with count),
            // each datagram maybe twice; maybe leave one out.
            if (l.count > 0) {
                int n = l.count, start = order_seed % n, stride = 1;
                int s;
                for (s = 1 + (order_seed >> 4); s < 16 + n; s++) {
                    int a = s % n, b = n;
                    while (b) {
                        int t = a % b;
                        a = b;
                        b = t;
                    }
                    if (a == 1) {
                        stride = s % n ? s % n : 1;
                        break;
                    }
                }
                if (drop_one & 1u) missing = (drop_one >> 1) % n;
                for (k = 0; k < n; k++) {
                    int idx = (start + k * stride) % n, rep;
                    for (rep = 0; rep < 1 + (n > 1 && k == 0 && (drop_one & 4u)); rep++) {
                        int32_t got;
                        if (idx == missing) continue;
                        got = feed(&r, mem, need, l.d[idx], l.n[idx], source, now, &frame);
                        if (got > 0) {
                            got_frames++;
                            if ((size_t)got != flen || memcmp(frame, fr, flen) != 0) {
                                fprintf(stderr, "reassembled %d bytes, sent %zu (mtu %u, %d datagrams, max_frame %u)\n",
                                        (int)got, flen, mtu, n, max_frame);
                                abort();
                            }
                        }
                    }
                }
                {
                    int expect = missing < 0 && flen > 0 && flen <= max_frame;
                    if (got_frames != expect) {
                        fprintf(stderr, "got %d frames, expected %d (len %zu, mtu %u, %d datagrams, "
                                "missing %d, max_frame %u, slots %u)\n", got_frames, expect, flen,
                                mtu, n, missing, max_frame, slots);
                        abort();
                    }
                }
            }
            for (k = 0; k < l.count; k++) free(l.d[k]);
            free(mtubuf);
            free(fr);
        } else {
            uint32_t left;
            now += fuzz_u16(&in);
            left = tpfed_datagram_rx_expire(&r, now);
            FUZZ_CHECK(left <= slots);
        }
    }
    free(block);
    return 0;
}
