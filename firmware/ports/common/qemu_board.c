// The board functions every QEMU Cortex-M port shares (see qemu_board.h).
#include "board.h"

#include <stddef.h>
#include <string.h>

#include "cortex_m.h"
#include "tpfed_sha256.h"

pl011 board_uart;

// Entropy, such as it is. These boards have no hardware random source, so board_random hashes
// (SHA-256) a pool stirred at every UART interrupt with the SysTick counter at that moment and
// the receive position, the clock when asked, a call counter and its previous output. Under
// QEMU the interrupt timing follows the host's scheduling and the coordinator's sending, so
// nonces differ from boot to boot in practice, but an attacker who can time the link or
// replay the exact byte timing could predict them: this is NOT a cryptographic random source.
// What a predictable peer nonce costs: the peer's freshness guarantee (an attacker holding a
// recording of an old handshake with the same nonces could replay that old session's frames
// to this board; it still cannot forge new ones or learn the key). Real boards use hardware
// RNGs (ESP32: esp_fill_random).
static volatile uint32_t entropy_pool[16];
static volatile uint32_t entropy_events;

void UART0_Handler(void) {
    pl011_irq(&board_uart);
    uint32_t i = entropy_events++;
    uint32_t v = entropy_pool[i & 15u];
    entropy_pool[i & 15u] = ((v << 7) | (v >> 25)) ^ cm_systick_value() ^ (board_uart.rx_head << 24);
}

void board_random(uint8_t *buf, uint32_t n) {
    static uint8_t prev[TPFED_SHA256_DIGEST];
    static uint32_t calls;
    while (n) {
        tpfed_sha256_ctx c;
        uint32_t pool[16], extra[4];
        for (int i = 0; i < 16; i++) pool[i] = entropy_pool[i];
        uint64_t us = board_micros();
        extra[0] = cm_systick_value();
        extra[1] = (uint32_t)us;
        extra[2] = entropy_events;
        extra[3] = ++calls;
        tpfed_sha256_init(&c);
        tpfed_sha256_update(&c, prev, sizeof prev);
        tpfed_sha256_update(&c, (const uint8_t *)pool, sizeof pool);
        tpfed_sha256_update(&c, (const uint8_t *)extra, sizeof extra);
        tpfed_sha256_final(&c, prev);
        uint32_t take = n < sizeof prev ? n : (uint32_t)sizeof prev;
        memcpy(buf, prev, take);
        buf += take;
        n -= take;
        // Fold the output forward so that what was handed out is not the next state.
        tpfed_sha256(prev, prev, sizeof prev);
    }
}

void board_reset(void) {
    cm_reset();
}

uint64_t board_micros(void) {
    return cm_micros(BOARD_CPU_HZ);
}

uint32_t board_millis(void) {
    return (uint32_t)(board_micros() / 1000u);
}

void uart_write(const uint8_t *buf, uint32_t n) {
    pl011_write(&board_uart, buf, n);
}

uint32_t uart_read(uint8_t *buf, uint32_t cap) {
    return pl011_read(&board_uart, buf, cap);
}

uint32_t uart_available(void) {
    return pl011_available(&board_uart);
}

void board_sleep(void) {
    pl011_wait(&board_uart);
}
