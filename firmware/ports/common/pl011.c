// ARM PL011 UART driver (PrimeCell UART, ARM DDI 0183): receive ring fed by the combined
// interrupt, transmit by polling the FIFO. Used by the lm3s6965 and musca_b1 ports.
#include "pl011.h"

#include "cortex_m.h"

#define UART_DR(u)   CM_REG((u)->base + 0x000u)
#define UART_FR(u)   CM_REG((u)->base + 0x018u)
#define UART_IBRD(u) CM_REG((u)->base + 0x024u)
#define UART_FBRD(u) CM_REG((u)->base + 0x028u)
#define UART_LCRH(u) CM_REG((u)->base + 0x02Cu)
#define UART_CR(u)   CM_REG((u)->base + 0x030u)
#define UART_IMSC(u) CM_REG((u)->base + 0x038u)
#define UART_ICR(u)  CM_REG((u)->base + 0x044u)

#define FR_RXFE (1u << 4)
#define FR_TXFF (1u << 5)
#define LCRH_WLEN8 (3u << 5)
#define LCRH_FEN (1u << 4)
#define CR_UARTEN (1u << 0)
#define CR_TXE (1u << 8)
#define CR_RXE (1u << 9)
#define INT_RX (1u << 4)
#define INT_RT (1u << 6)
#define INT_ALL 0x7FFu

void pl011_early_init(uintptr_t base) {
    CM_REG(base + 0x02Cu) = LCRH_WLEN8 | LCRH_FEN;
    // A byte that reached QEMU's PL011 before this (FIFO off: one byte fills it) made QEMU stop
    // reading the socket, and the FIFO reset above dropped the byte without letting QEMU read
    // on: the link would stay silent for good. A DR read makes QEMU poll the socket again.
    (void)CM_REG(base + 0x000u);
}

void pl011_init(pl011 *u, uintptr_t base, uint32_t irq, uint32_t uart_clk_hz, uint32_t baud) {
    u->base = base;
    u->irq = irq;
    u->rx_head = u->rx_tail = 0;
    UART_CR(u) = 0;
    // Divisor in 1/64ths: clk / (16 * baud). The emulated UART ignores it; silicon would not.
    uint32_t div64 = (uint32_t)(((uint64_t)uart_clk_hz * 4u + baud / 2u) / baud);
    UART_IBRD(u) = div64 >> 6;
    UART_FBRD(u) = div64 & 63u;
    UART_LCRH(u) = LCRH_WLEN8 | LCRH_FEN;
    UART_ICR(u) = INT_ALL;
    UART_IMSC(u) = INT_RX | INT_RT;
    UART_CR(u) = CR_UARTEN | CR_TXE | CR_RXE;
    cm_nvic_enable(u->irq);
    // Bytes already waiting lost their interrupt to the ICR write: QEMU raises RX only when
    // the FIFO reaches its trigger level, so let the handler drain them now.
    if (!(UART_FR(u) & FR_RXFE)) cm_nvic_set_pending(u->irq);
}

// The interrupt is cleared before the FIFO is drained, never after: QEMU raises RX only when
// a byte lands in an empty FIFO, so clearing it after the last read could swallow the edge of
// a byte that arrived in between and leave it (and all after it) unnoticed.
// When the ring is full the receive interrupt is masked and bytes stay in the FIFO, so the
// sender is held back (QEMU stops reading the socket) instead of losing data; pl011_read
// unmasks it, and pends the interrupt, once there is room again.
void pl011_irq(pl011 *u) {
    UART_ICR(u) = INT_RX | INT_RT;
    uint32_t head = u->rx_head;
    while (!(UART_FR(u) & FR_RXFE)) {
        if (head - u->rx_tail >= PL011_RX_RING) {
            UART_IMSC(u) = 0;
            break;
        }
        u->rx_ring[head & (PL011_RX_RING - 1u)] = (uint8_t)UART_DR(u);
        head++;
    }
    u->rx_head = head;
}

void pl011_write(pl011 *u, const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (UART_FR(u) & FR_TXFF) {}
        UART_DR(u) = buf[i];
    }
}

uint32_t pl011_available(const pl011 *u) {
    return u->rx_head - u->rx_tail;
}

uint32_t pl011_read(pl011 *u, uint8_t *buf, uint32_t cap) {
    uint32_t tail = u->rx_tail, n = 0;
    uint32_t head = u->rx_head;
    while (tail != head && n < cap) buf[n++] = u->rx_ring[tail++ & (PL011_RX_RING - 1u)];
    u->rx_tail = tail;
    if (n && UART_IMSC(u) == 0) {   // room again: resume receiving, and drain what waits now
        UART_IMSC(u) = INT_RX | INT_RT;
        if (!(UART_FR(u) & FR_RXFE)) cm_nvic_set_pending(u->irq);
    }
    return n;
}

void pl011_wait(pl011 *u) {
    // Interrupts masked between the check and WFI, so a byte that lands in between still
    // wakes the core (WFI wakes on a pending interrupt even with PRIMASK set).
    cm_irq_disable();
    if (u->rx_head == u->rx_tail) cm_wfi();
    cm_irq_enable();
}
