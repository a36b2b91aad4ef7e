// What every QEMU Cortex-M board offers (ports/<board>/board.h adds its constants: UART0_IRQn,
// BOARD_CPU_HZ, BOARD_RAM_BYTES, BOARD_FLASH_BYTES). qemu_board.c implements the parts that
// are the same on every board: the clock and the link UART's byte functions (main.c puts the
// tpfed stream helper and HAL on top of them).
#ifndef TPFED_QEMU_BOARD_H
#define TPFED_QEMU_BOARD_H

#include <stdint.h>

#include "pl011.h"
#include "tpfed_hal.h"

// The link UART (PL011 UART0), set up by the board's board_init().
extern pl011 board_uart;

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

// Random bytes for handshake nonces (tpfed_hal.random). WEAK: see qemu_board.c.
void board_random(uint8_t *buf, uint32_t n);

// The device description of this board.
const tpfed_device_info *board_info(void);

void UART0_Handler(void);

#endif
