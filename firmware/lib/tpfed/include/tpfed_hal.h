// tpfed hardware abstraction: what a port gives the portable peer core (tpfed_peer.h).
// The core is frame-level: it is handed whole received frames (tpfed_peer_handle_frame) and
// hands whole frames back through send_frame. How frames travel is the port's business: a
// byte stream COBS-frames them (tpfed_stream.h), a datagram link sends each as one datagram
// or fragments it (tpfed_datagram.h). Nothing here allocates.
#ifndef TPFED_HAL_H
#define TPFED_HAL_H

#include <stdint.h>

// cffi:begin
typedef struct tpfed_hal {
    void *ctx;
    // Send one whole frame (header + payload + CRC, n bytes); may block until it is queued.
    // The bytes are only valid during the call.
    void (*send_frame)(void *ctx, const uint8_t *frame, uint32_t n);
    // Milliseconds since boot; wraps at 2^32.
    uint32_t (*millis)(void *ctx);
    // Fill buf[0..n) with random bytes for handshake nonces. Required (tpfed_peer_init refuses a
    // HAL without it). ESP32: esp_fill_random; QEMU boards: a weak timing-based source
    // (ports/common/qemu_board.c says how weak); hosts: tpfed_os_random (tpfed_auth.h) or
    // os.urandom through a callback.
    void (*random)(void *ctx, uint8_t *buf, uint32_t n);
} tpfed_hal;

typedef struct tpfed_device_info {
    const char *board;        // board name, e.g. "lm3s6965evb", "esp32dev"
    const char *port;         // port and framework, e.g. "qemu-cortex-m3", "esp32-arduino"
    uint32_t cpu_hz;
    uint64_t ram_bytes;       // internal RAM of the chip (a desktop's RAM: beyond 4 GiB)
    uint32_t psram_bytes;     // external RAM usable by the arena (0 if none)
    uint32_t flash_bytes;
    uint32_t link_baud;       // UART baud rate, 0 if the link is not a UART
    uint8_t cores;
    uint8_t has_fpu;
    uint8_t has_simd;
} tpfed_device_info;
// cffi:end

#endif
