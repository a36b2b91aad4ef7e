// LM3S6965 port (QEMU lm3s6965evb): UART0 (PL011) with an interrupt-fed receive ring,
// SysTick clock, sleep with WFI, and the tpfed_hal built from them.
#ifndef TPFED_BOARD_H
#define TPFED_BOARD_H

#include <stdint.h>

#include "tpfed_hal.h"

#define UART0_IRQn 5
// QEMU's Stellaris system clock at reset (RCC SYSDIV field 0xF: 80 ns period).
#define BOARD_CPU_HZ 12500000u
#define BOARD_RAM_BYTES (64u * 1024u)
#define BOARD_FLASH_BYTES (256u * 1024u)

void board_early_init(void);
void board_init(void);
void board_reset(void);
uint32_t board_millis(void);
uint64_t board_micros(void);

void uart_write(const uint8_t *buf, uint32_t n);
uint32_t uart_read(uint8_t *buf, uint32_t cap);
uint32_t uart_available(void);
// Sleep until an interrupt; returns at once if received bytes are waiting.
void board_sleep(void);

// The HAL and device description of this board.
const tpfed_hal *board_hal(void);
const tpfed_device_info *board_info(void);

void UART0_Handler(void);

#endif
