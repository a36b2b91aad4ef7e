// SHA-256 (FIPS 180-4), incremental, no heap. A peer verifies each received weight shard with
// it before parsing the shard.
#ifndef TPFED_SHA256_H
#define TPFED_SHA256_H

#include <stddef.h>
#include <stdint.h>

// cffi:begin
#define TPFED_SHA256_DIGEST 32

typedef struct {
    uint32_t state[8];
    uint64_t nbytes;     // message bytes hashed so far
    uint8_t block[64];   // pending partial block
    uint32_t nblock;     // bytes in block
} tpfed_sha256_ctx;

void tpfed_sha256_init(tpfed_sha256_ctx *c);
void tpfed_sha256_update(tpfed_sha256_ctx *c, const uint8_t *data, size_t n);
void tpfed_sha256_final(tpfed_sha256_ctx *c, uint8_t *digest);
// One-shot: digest (32 bytes) of data[0..n).
void tpfed_sha256(uint8_t *digest, const uint8_t *data, size_t n);
// cffi:end

#endif
