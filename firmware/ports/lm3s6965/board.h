// LM3S6965 port (QEMU lm3s6965evb): UART0 (PL011) with an interrupt-fed receive ring,
// SysTick clock, sleep with WFI (main.c runs the tpfed peer on them).
#ifndef TPFED_BOARD_H
#define TPFED_BOARD_H

#include <stdint.h>

#include "qemu_board.h"

#define UART0_IRQn 5
// QEMU's Stellaris system clock at reset (RCC SYSDIV field 0xF: 80 ns period).
#define BOARD_CPU_HZ 12500000u
#define BOARD_RAM_BYTES (64u * 1024u)
#define BOARD_FLASH_BYTES (256u * 1024u)

#endif
