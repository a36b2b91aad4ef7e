// SHA-256 as specified in FIPS 180-4, section 6.2.
#include "tpfed_sha256.h"

#include <string.h>

static const uint32_t K[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(uint32_t *state, const uint8_t *p) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++) {
        w[t] = ((uint32_t)p[4 * t] << 24) | ((uint32_t)p[4 * t + 1] << 16) |
               ((uint32_t)p[4 * t + 2] << 8) | (uint32_t)p[4 * t + 3];
    }
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = ROTR(w[t - 15], 7) ^ ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = ROTR(w[t - 2], 17) ^ ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    state[0] += a; state[1] += b; state[2] += c; state[3] += d;
    state[4] += e; state[5] += f; state[6] += g; state[7] += h;
}

// x86-64 with the SHA extensions (checked at run time): the same compression in hardware,
// several times faster (every sealed frame and every weight share is hashed). Elsewhere, and
// with TPFED_NO_SHA_NI, the portable code above.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TPFED_NO_SHA_NI)
#include <cpuid.h>
#include <immintrin.h>

__attribute__((target("sha,sse4.1,ssse3")))
static void compress_shani(uint32_t *state, const uint8_t *data, size_t nblocks) {
    const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i tmp = _mm_loadu_si128((const __m128i *)&state[0]);
    __m128i st1 = _mm_loadu_si128((const __m128i *)&state[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);            // CDAB
    st1 = _mm_shuffle_epi32(st1, 0x1B);            // EFGH
    __m128i st0 = _mm_alignr_epi8(tmp, st1, 8);    // ABEF
    st1 = _mm_blend_epi16(st1, tmp, 0xF0);         // CDGH
    for (; nblocks; nblocks--, data += 64) {
        __m128i abef = st0, cdgh = st1, m[4];
        for (int i = 0; i < 16; i++) {
            if (i < 4) {
                m[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * i)), mask);
            } else {   // W[4i..4i+3] from the four groups before (FIPS 180-4, 6.2.2 step 1)
                __m128i x = _mm_sha256msg1_epu32(m[i & 3], m[(i + 1) & 3]);
                x = _mm_add_epi32(x, _mm_alignr_epi8(m[(i + 3) & 3], m[(i + 2) & 3], 4));
                m[i & 3] = _mm_sha256msg2_epu32(x, m[(i + 3) & 3]);
            }
            __m128i msg = _mm_add_epi32(m[i & 3], _mm_loadu_si128((const __m128i *)&K[4 * i]));
            st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
            msg = _mm_shuffle_epi32(msg, 0x0E);
            st0 = _mm_sha256rnds2_epu32(st0, st1, msg);
        }
        st0 = _mm_add_epi32(st0, abef);
        st1 = _mm_add_epi32(st1, cdgh);
    }
    tmp = _mm_shuffle_epi32(st0, 0x1B);            // FEBA
    st1 = _mm_shuffle_epi32(st1, 0xB1);            // DCHG
    st0 = _mm_blend_epi16(tmp, st1, 0xF0);         // DCBA
    st1 = _mm_alignr_epi8(st1, tmp, 8);            // HGFE
    _mm_storeu_si128((__m128i *)&state[0], st0);
    _mm_storeu_si128((__m128i *)&state[4], st1);
}

static int have_shani(void) {
    static int known = -1;   // a benign race: every thread finds the same answer
    if (known < 0) {
        unsigned a, b, c, d;
        int ok = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 19)) && (c & (1u << 9));
        ok = ok && __get_cpuid_max(0, NULL) >= 7;
        if (ok) {
            __cpuid_count(7, 0, a, b, c, d);
            ok = (b >> 29) & 1u;
        }
        known = ok;
    }
    return known;
}

static void compress_blocks(uint32_t *state, const uint8_t *data, size_t nblocks) {
    if (nblocks && have_shani()) {
        compress_shani(state, data, nblocks);
        return;
    }
    for (; nblocks; nblocks--, data += 64) compress(state, data);
}
#else
static void compress_blocks(uint32_t *state, const uint8_t *data, size_t nblocks) {
    for (; nblocks; nblocks--, data += 64) compress(state, data);
}
#endif

void tpfed_sha256_init(tpfed_sha256_ctx *c) {
    static const uint32_t h0[8] = {
        0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
        0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u,
    };
    memcpy(c->state, h0, sizeof h0);
    c->nbytes = 0;
    c->nblock = 0;
}

void tpfed_sha256_update(tpfed_sha256_ctx *c, const uint8_t *data, size_t n) {
    c->nbytes += n;
    if (c->nblock) {
        size_t take = 64 - c->nblock < n ? 64 - c->nblock : n;
        memcpy(c->block + c->nblock, data, take);
        c->nblock += (uint32_t)take;
        data += take;
        n -= take;
        if (c->nblock < 64) return;
        compress_blocks(c->state, c->block, 1);
        c->nblock = 0;
    }
    compress_blocks(c->state, data, n / 64);
    data += n - n % 64;
    n %= 64;
    memcpy(c->block, data, n);
    c->nblock = (uint32_t)n;
}

void tpfed_sha256_final(tpfed_sha256_ctx *c, uint8_t *digest) {
    uint64_t bits = c->nbytes * 8u;
    c->block[c->nblock++] = 0x80;
    if (c->nblock > 56) {
        memset(c->block + c->nblock, 0, 64 - c->nblock);
        compress_blocks(c->state, c->block, 1);
        c->nblock = 0;
    }
    memset(c->block + c->nblock, 0, 56 - c->nblock);
    for (int i = 0; i < 8; i++) c->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    compress_blocks(c->state, c->block, 1);   // the hardware path too: HMACs are mostly final blocks
    for (int i = 0; i < 8; i++) {
        digest[4 * i] = (uint8_t)(c->state[i] >> 24);
        digest[4 * i + 1] = (uint8_t)(c->state[i] >> 16);
        digest[4 * i + 2] = (uint8_t)(c->state[i] >> 8);
        digest[4 * i + 3] = (uint8_t)c->state[i];
    }
}

void tpfed_sha256(uint8_t *digest, const uint8_t *data, size_t n) {
    tpfed_sha256_ctx c;
    tpfed_sha256_init(&c);
    tpfed_sha256_update(&c, data, n);
    tpfed_sha256_final(&c, digest);
}
