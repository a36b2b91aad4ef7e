// Float <-> IEEE-754 bit pattern, without type-punning through pointers (internal header).
#ifndef TPFED_BITS_H
#define TPFED_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
