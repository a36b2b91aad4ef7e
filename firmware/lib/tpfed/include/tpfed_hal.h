// tpfed hardware abstraction: what a port gives the portable peer core.
// A port fills one tpfed_hal (function pointers plus its context), one tpfed_device_info and
// one arena, then drives the peer (see tpfed_peer.h). Nothing here allocates.
#ifndef TPFED_HAL_H
#define TPFED_HAL_H

#include <stdint.h>

typedef struct tpfed_hal {
    void *ctx;
    // Queue all n bytes for the link; may block until they fit.
    void (*write)(void *ctx, const uint8_t *buf, uint32_t n);
    // Copy up to cap received bytes into buf without blocking; returns how many.
    uint32_t (*read)(void *ctx, uint8_t *buf, uint32_t cap);
    // Milliseconds since boot; wraps at 2^32.
    uint32_t (*millis)(void *ctx);
    // Sleep until input may have arrived or up to max_ms passed (may return early).
    void (*wait)(void *ctx, uint32_t max_ms);
} tpfed_hal;

typedef struct tpfed_device_info {
    const char *board;        // board name, e.g. "lm3s6965evb", "esp32dev"
    const char *port;         // port and framework, e.g. "qemu-cortex-m3", "esp32-arduino"
    uint32_t cpu_hz;
    uint32_t ram_bytes;       // internal RAM of the chip
    uint32_t psram_bytes;     // external RAM usable by the arena (0 if none)
    uint32_t flash_bytes;
    uint32_t link_baud;       // UART baud rate, 0 if the link is not a UART
    uint8_t cores;
    uint8_t has_fpu;
    uint8_t has_simd;
} tpfed_device_info;

#endif
