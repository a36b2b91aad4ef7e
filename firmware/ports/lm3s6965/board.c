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

void board_early_init(void) {
    SYSCTL_RCGC1 |= 1u;   // UART0 clock gate
    pl011_early_init(UART0_BASE);
}

void board_init(void) {
    SYSCTL_RCGC1 |= 1u;   // UART0 clock
    SYSCTL_RCGC2 |= 1u;   // GPIO A (UART0 pins)
    pl011_init(&board_uart, UART0_BASE, UART0_IRQn, BOARD_CPU_HZ, LINK_BAUD);
    cm_clock_start();
    cm_irq_enable();
}

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

const tpfed_device_info *board_info(void) { return &info; }
