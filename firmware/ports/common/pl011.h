// ARM PL011 UART with an interrupt-fed receive ring, shared by the QEMU Cortex-M ports.
// One pl011 value per UART: its base address (the alias the CPU's security state may use),
// the NVIC line of its combined interrupt, and the ring its interrupt handler fills.
#ifndef TPFED_PL011_H
#define TPFED_PL011_H

#include <stdint.h>

// Receive ring size in bytes; a power of two.
#ifndef PL011_RX_RING
#define PL011_RX_RING 2048u
#endif

typedef struct pl011 {
    uintptr_t base;                     // register block
    uint32_t irq;                       // NVIC interrupt number of UARTINTR (RX and RX timeout)
    volatile uint32_t rx_head;          // written by the interrupt handler only
    volatile uint32_t rx_tail;          // written by the main loop only
    volatile uint8_t rx_ring[PL011_RX_RING];
} pl011;

// First thing after reset, before .data and .bss exist: enables the FIFO of the UART at base
// (which flushes the receiver) and makes sure QEMU keeps feeding it. With the FIFO off,
// QEMU 7.2's PL011 drops bytes; bytes that arrive before this may be lost (the host's frames
// begin with a delimiter and HELLO is retried), but the link never stalls.
void pl011_early_init(uintptr_t base);
// Takes the UART at base with its interrupt line irq: 8N1 at baud from a uart_clk_hz
// reference, FIFO on, receive interrupts on, NVIC line enabled.
void pl011_init(pl011 *u, uintptr_t base, uint32_t irq, uint32_t uart_clk_hz, uint32_t baud);
// The body of the UART's interrupt handler: moves received bytes into the ring.
void pl011_irq(pl011 *u);
// Blocks until all n bytes are in the transmit FIFO.
void pl011_write(pl011 *u, const uint8_t *buf, uint32_t n);
// Copies up to cap received bytes; never blocks.
uint32_t pl011_read(pl011 *u, uint8_t *buf, uint32_t cap);
uint32_t pl011_available(const pl011 *u);
// Sleeps (WFI) until an interrupt, unless received bytes are already waiting.
void pl011_wait(pl011 *u);

#endif
