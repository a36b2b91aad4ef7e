// The board functions every QEMU Cortex-M port shares (see qemu_board.h).
#include "board.h"

#include <stddef.h>

#include "cortex_m.h"

pl011 board_uart;

void UART0_Handler(void) {
    pl011_irq(&board_uart);
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
