// Musca-B1 board support under QEMU: PL011 UART0 through the shared driver
// (ports/common/pl011.c), SysTick as the clock, WFI while idle. Everything runs Secure, so
// peripherals are used through their Secure aliases (0x5xxxxxxx); the PPCs and MPCs keep
// their reset configuration (all Secure), no TrustZone setup is needed.
#include "board.h"

#include <stddef.h>

#include "cortex_m.h"
#include "pl011.h"

// UART0: 0x40105000 Non-secure, 0x50105000 Secure (QEMU hw/arm/musca.c, apb_ppcexp1 port 4).
#define UART0_BASE 0x50105000u
#define LINK_BAUD 115200u

static pl011 uart0;

void UART0_Handler(void) {
    pl011_irq(&uart0);
}

void board_early_init(void) {
    pl011_early_init(UART0_BASE);
}

void board_init(void) {
    pl011_init(&uart0, UART0_BASE, UART0_IRQn, BOARD_CPU_HZ, LINK_BAUD);
    cm_clock_start();
    cm_irq_enable();
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
    pl011_write(&uart0, buf, n);
}

uint32_t uart_read(uint8_t *buf, uint32_t cap) {
    return pl011_read(&uart0, buf, cap);
}

uint32_t uart_available(void) {
    return pl011_available(&uart0);
}

void board_sleep(void) {
    pl011_wait(&uart0);
}

static void hal_write(void *ctx, const uint8_t *buf, uint32_t n) { (void)ctx; uart_write(buf, n); }
static uint32_t hal_read(void *ctx, uint8_t *buf, uint32_t cap) { (void)ctx; return uart_read(buf, cap); }
static uint32_t hal_millis(void *ctx) { (void)ctx; return board_millis(); }
static void hal_wait(void *ctx, uint32_t max_ms) { (void)ctx; (void)max_ms; board_sleep(); }

static const tpfed_hal hal = {NULL, hal_write, hal_read, hal_millis, hal_wait};

// The core has an FPU and the DSP extension, but the firmware is built soft-float (IEEE
// results identical to the host's) with plain C kernels, so neither is announced.
static const tpfed_device_info info = {
    .board = "musca-b1",
    .port = "qemu-cortex-m33",
    .cpu_hz = BOARD_CPU_HZ,
    .ram_bytes = BOARD_RAM_BYTES,
    .psram_bytes = 0,
    .flash_bytes = BOARD_FLASH_BYTES,
    .link_baud = LINK_BAUD,
    .cores = 1,          // the peer runs on CPU0; the SSE-200's CPU1 is left alone
    .has_fpu = 0,
    .has_simd = 0,
};

const tpfed_hal *board_hal(void) { return &hal; }
const tpfed_device_info *board_info(void) { return &info; }
