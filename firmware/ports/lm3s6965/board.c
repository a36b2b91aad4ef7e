// LM3S6965 board support under QEMU: PL011 UART0 at 0x4000C000 (IRQ 5) feeding a receive
// ring from its interrupt, SysTick as the clock, WFI while idle.
#include "board.h"

#include <stddef.h>

#define REG(addr) (*(volatile uint32_t *)(addr))

#define UART0_BASE 0x4000C000u
#define UART_DR    REG(UART0_BASE + 0x000)
#define UART_FR    REG(UART0_BASE + 0x018)
#define UART_IBRD  REG(UART0_BASE + 0x024)
#define UART_FBRD  REG(UART0_BASE + 0x028)
#define UART_LCRH  REG(UART0_BASE + 0x02C)
#define UART_CR    REG(UART0_BASE + 0x030)
#define UART_IFLS  REG(UART0_BASE + 0x034)
#define UART_IMSC  REG(UART0_BASE + 0x038)
#define UART_ICR   REG(UART0_BASE + 0x044)
#define FR_RXFE (1u << 4)
#define FR_TXFF (1u << 5)
#define LCRH_WLEN8 (3u << 5)
#define LCRH_FEN (1u << 4)
#define CR_UARTEN (1u << 0)
#define CR_TXE (1u << 8)
#define CR_RXE (1u << 9)
#define INT_RX (1u << 4)
#define INT_RT (1u << 6)

#define SYSCTL_RCGC1 REG(0x400FE104u)
#define SYSCTL_RCGC2 REG(0x400FE108u)

#define SYST_CSR REG(0xE000E010u)
#define SYST_RVR REG(0xE000E014u)
#define SYST_CVR REG(0xE000E018u)
#define NVIC_ISER0 REG(0xE000E100u)
#define NVIC_ISPR0 REG(0xE000E200u)
#define SCB_AIRCR REG(0xE000ED0Cu)
#define SCB_ICSR REG(0xE000ED04u)
#define ICSR_PENDSTSET (1u << 26)

#define LINK_BAUD 115200u
#define SYSTICK_RELOAD 0xFFFFFFu

// Receive ring, written by the UART interrupt, read by the main loop. Power of two.
#ifndef BOARD_RX_RING
#define BOARD_RX_RING 2048u
#endif
static volatile uint8_t rx_ring[BOARD_RX_RING];
static volatile uint32_t rx_head;   // written by the ISR only
static volatile uint32_t rx_tail;   // written by the main loop only
static volatile uint32_t systick_wraps;

void SysTick_Handler(void) {
    systick_wraps++;
}

// Moves received bytes into the ring. When the ring is full the receive interrupt is masked
// and bytes stay in the FIFO, so the sender is held back (QEMU stops reading the socket)
// instead of losing data; uart_read unmasks it once there is room again.
void UART0_Handler(void) {
    uint32_t head = rx_head;
    while (!(UART_FR & FR_RXFE)) {
        if (head - rx_tail >= BOARD_RX_RING) {
            UART_IMSC = 0;   // FIFO left full: no ICR write, the pending level must survive
            rx_head = head;
            return;
        }
        rx_ring[head & (BOARD_RX_RING - 1)] = (uint8_t)UART_DR;
        head++;
    }
    rx_head = head;
    UART_ICR = INT_RX | INT_RT;
}

// Called first thing after reset: enabling the FIFO flushes the receiver, so it must happen
// before the host's first bytes can land. (With the FIFO off, QEMU 7.2's PL011 drops bytes.)
void board_early_init(void) {
    SYSCTL_RCGC1 |= 1u;
    UART_LCRH = LCRH_WLEN8 | LCRH_FEN;
}

void board_init(void) {
    SYSCTL_RCGC1 |= 1u;          // UART0 clock
    SYSCTL_RCGC2 |= 1u;          // GPIO A (UART0 pins)
    UART_CR = 0;
    // 115200 baud from the system clock (the emulated UART ignores it; real silicon would not).
    uint32_t div64 = (BOARD_CPU_HZ * 4u + LINK_BAUD / 2u) / LINK_BAUD;
    UART_IBRD = div64 >> 6;
    UART_FBRD = div64 & 63u;
    UART_LCRH = LCRH_WLEN8 | LCRH_FEN;
    UART_ICR = 0x7FFu;
    UART_IMSC = INT_RX | INT_RT;
    UART_CR = CR_UARTEN | CR_TXE | CR_RXE;
    NVIC_ISER0 = 1u << UART0_IRQn;

    SYST_RVR = SYSTICK_RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7u;               // processor clock, interrupt on wrap, enable
    __asm__ volatile("cpsie i" ::: "memory");
}

void board_reset(void) {
    __asm__ volatile("dsb" ::: "memory");
    SCB_AIRCR = (0x05FAu << 16) | (1u << 2);   // SYSRESETREQ
    for (;;) __asm__ volatile("wfi");
}

uint64_t board_micros(void) {
    static uint64_t last;
    __asm__ volatile("cpsid i" ::: "memory");
    uint32_t wraps = systick_wraps;
    uint32_t val = SYST_CVR;
    if (SCB_ICSR & ICSR_PENDSTSET) {   // wrapped, interrupt not taken yet
        wraps++;
        val = SYST_CVR;
    }
    uint64_t ticks = ((uint64_t)wraps << 24) + (SYSTICK_RELOAD - val);
    uint64_t us = ticks * 4u / (BOARD_CPU_HZ / 250000u);
    if (us < last) us = last;          // never backwards
    last = us;
    __asm__ volatile("cpsie i" ::: "memory");
    return us;
}

uint32_t board_millis(void) {
    return (uint32_t)(board_micros() / 1000u);
}

void uart_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (UART_FR & FR_TXFF) {}
        UART_DR = buf[i];
    }
}

uint32_t uart_available(void) {
    return rx_head - rx_tail;
}

uint32_t uart_read(uint8_t *buf, uint32_t cap) {
    uint32_t tail = rx_tail, n = 0;
    uint32_t head = rx_head;
    while (tail != head && n < cap) buf[n++] = rx_ring[tail++ & (BOARD_RX_RING - 1)];
    rx_tail = tail;
    if (n && UART_IMSC == 0) {   // room again: resume receiving, and drain what waits now
        UART_IMSC = INT_RX | INT_RT;
        if (!(UART_FR & FR_RXFE)) NVIC_ISPR0 = 1u << UART0_IRQn;
    }
    return n;
}

void board_sleep(void) {
    // Interrupts masked between the check and WFI, so a byte that lands in between still
    // wakes the core (WFI wakes on a pending interrupt even with PRIMASK set).
    __asm__ volatile("cpsid i" ::: "memory");
    if (rx_head == rx_tail) __asm__ volatile("wfi");
    __asm__ volatile("cpsie i" ::: "memory");
}

static void hal_write(void *ctx, const uint8_t *buf, uint32_t n) { (void)ctx; uart_write(buf, n); }
static uint32_t hal_read(void *ctx, uint8_t *buf, uint32_t cap) { (void)ctx; return uart_read(buf, cap); }
static uint32_t hal_millis(void *ctx) { (void)ctx; return board_millis(); }
static void hal_wait(void *ctx, uint32_t max_ms) { (void)ctx; (void)max_ms; board_sleep(); }

static const tpfed_hal hal = {NULL, hal_write, hal_read, hal_millis, hal_wait};

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

const tpfed_hal *board_hal(void) { return &hal; }
const tpfed_device_info *board_info(void) { return &info; }
