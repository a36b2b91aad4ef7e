#include "board.h"
#ifndef PIO_UNIT_TESTING
int main(void) {
    board_init();
    uint8_t buf[64];
    for (;;) {
        uint32_t n = uart_read(buf, sizeof buf);
        if (n == 1 && buf[0] == 't') { uint64_t us = board_micros(); uart_write((uint8_t*)&us, 8); continue; }
        if (n) uart_write(buf, n);
        else board_sleep();
    }
}
#endif
