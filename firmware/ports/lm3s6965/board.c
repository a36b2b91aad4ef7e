// LM3S6965 board support under QEMU: PL011 UART0 at 0x4000C000 (IRQ 5) through the shared
// driver (ports/common/pl011.c), SysTick as the clock, WFI while idle.
#include "board.h"

#include <stddef.h>

#include "cortex_m.h"
#include "pl011.h"

#define SYSCTL_RCGC1 CM_REG(0x400FE104u)
#define SYSCTL_RCGC2 CM_REG(0x400FE108u)

#define UART0_BASE 0x4000C000u
#define LINK_BAUD 115200u

static pl011 uart0;

void UART0_Handler(void) {
    pl011_irq(&uart0);
}

void board_early_init(void) {
    SYSCTL_RCGC1 |= 1u;   // UART0 clock gate
    pl011_early_init(UART0_BASE);
}

void board_init(void) {
    SYSCTL_RCGC1 |= 1u;   // UART0 clock
    SYSCTL_RCGC2 |= 1u;   // GPIO A (UART0 pins)
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

static const tpfed_device_info info = {
    .board = "lm3s6965evb",
    .port = "qemu-cortex-m3",
    .cpu_hz = BOARD_CPU_HZ,
    .ram_bytes = BOARD_RAM_BYTES,
    .psram_bytes = 0,
    .flash_bytes = BOARD_FLASH_BYTES,
    .link_baud = LINK_BAUD,
    .cores = 1,
    .has_fpu = 0,
    .has_simd = 0,
};

const tpfed_hal *board_hal(void) { return &hal; }
const tpfed_device_info *board_info(void) { return &info; }
