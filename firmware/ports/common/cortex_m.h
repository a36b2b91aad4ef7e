// Cortex-M core support shared by the QEMU ports (ARMv7-M and ARMv8-M Mainline): NVIC lines,
// a SysTick microsecond clock, system reset, and the reset and fault handlers their vector
// tables point at.
#ifndef TPFED_CORTEX_M_H
#define TPFED_CORTEX_M_H

#include <stdint.h>

#define CM_REG(addr) (*(volatile uint32_t *)(addr))

static inline void cm_irq_disable(void) { __asm__ volatile("cpsid i" ::: "memory"); }
static inline void cm_irq_enable(void) { __asm__ volatile("cpsie i" ::: "memory"); }
static inline void cm_wfi(void) { __asm__ volatile("wfi" ::: "memory"); }

void cm_nvic_enable(uint32_t irq);
void cm_nvic_set_pending(uint32_t irq);

// SysTick on the processor clock, wrapping every 2^24 cycles; counts the wraps.
void cm_clock_start(void);
// Microseconds since cm_clock_start for a core clocked at cpu_hz; never goes backwards.
uint64_t cm_micros(uint32_t cpu_hz);
// The SysTick counter as it stands (24 bits, counting down at the core clock).
uint32_t cm_systick_value(void);
// SYSRESETREQ. QEMU runs the boards with -no-reboot, so this ends the QEMU process.
void cm_reset(void) __attribute__((noreturn));

// Linker script symbols: .data load address and its RAM range, .bss, top of the stack.
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

// Given by the port: runs before .data and .bss are set up (no globals may be relied on).
void board_early_init(void);
int main(void);

// Handlers for the ports' vector tables.
void Reset_Handler(void);
void fault_handler(void);
void SysTick_Handler(void);

#endif
