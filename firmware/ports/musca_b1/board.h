// Musca-B1 port (QEMU musca-b1: SSE-200 with Cortex-M33 CPU0, running in the Secure state):
// UART0 (PL011) with an interrupt-fed receive ring, SysTick clock, sleep with WFI (main.c runs
// the tpfed peer on them).
#ifndef TPFED_BOARD_H
#define TPFED_BOARD_H

#include <stdint.h>

#include "qemu_board.h"

// UART0 is expansion interrupt 7 + 5 (UARTINTR, combined) of the SSE-200, whose expansion
// interrupts start at NVIC line 32 (QEMU hw/arm/musca.c make_uart, hw/arm/armsse.c).
#define UART0_IRQn (32 + 12)
// SSE-200 MAINCLK as QEMU 7.2 models it (hw/arm/musca.c SYSCLK_FRQ); SysTick counts it.
#define BOARD_CPU_HZ 40000000u
// SSE-200 system SRAM, 4 banks of 128 KiB (the firmware's data, stack and arena).
#define BOARD_RAM_BYTES (512u * 1024u)
// QSPI flash on the board, which the image boots from (QEMU maps a 32 MiB window).
#define BOARD_FLASH_BYTES (8u * 1024u * 1024u)

#endif
