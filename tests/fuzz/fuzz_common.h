// Shared helpers of the libFuzzer harnesses in tests/fuzz (built by tools/fuzz.sh).
// A failed check prints what failed and aborts, so libFuzzer records a crash with the input.
#ifndef TPFED_FUZZ_COMMON_H
#define TPFED_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: fuzz check failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                      \
        }                                                                                 \
    } while (0)

// An exactly-sized heap copy, so ASan flags any access past its end (libFuzzer's own
// buffer is exactly sized too, but sub-slices of it are not).
static inline uint8_t *fuzz_dup(const uint8_t *p, size_t n) {
    uint8_t *q = (uint8_t *)malloc(n ? n : 1u);
    FUZZ_CHECK(q != NULL);
    if (n) memcpy(q, p, n);
    return q;
}

// A little cursor over the fuzz input, for harnesses that draw parameters from it.
typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_in;

static inline uint8_t fuzz_u8(fuzz_in *in) {
    uint8_t v;
    if (!in->n) return 0;
    v = in->p[0];
    in->p++;
    in->n--;
    return v;
}

static inline uint16_t fuzz_u16(fuzz_in *in) {
    uint16_t lo = fuzz_u8(in);
    return (uint16_t)(lo | ((uint16_t)fuzz_u8(in) << 8));
}

static inline uint32_t fuzz_u32(fuzz_in *in) {
    uint32_t lo = fuzz_u16(in);
    return lo | ((uint32_t)fuzz_u16(in) << 16);
}

static inline uint64_t fuzz_u64(fuzz_in *in) {
    uint64_t lo = fuzz_u32(in);
    return lo | ((uint64_t)fuzz_u32(in) << 32);
}

// Take up to want bytes (fewer if the input runs out); *got says how many.
static inline const uint8_t *fuzz_take(fuzz_in *in, size_t want, size_t *got) {
    const uint8_t *p = in->p;
    if (want > in->n) want = in->n;
    in->p += want;
    in->n -= want;
    *got = want;
    return p;
}

#endif
