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

void board_early_init(void) {
    pl011_early_init(UART0_BASE);
}

void board_init(void) {
    pl011_init(&board_uart, UART0_BASE, UART0_IRQn, BOARD_CPU_HZ, LINK_BAUD);
    cm_clock_start();
    cm_irq_enable();
}

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

const tpfed_device_info *board_info(void) { return &info; }
