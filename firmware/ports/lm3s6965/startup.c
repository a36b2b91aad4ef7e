// Reset handler and vector table of the LM3S6965 (Cortex-M3).
#include <stdint.h>

#include "board.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);

void Reset_Handler(void);
void fault_handler(void);

void Reset_Handler(void) {
    board_early_init();
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    main();
    board_reset();
}

// A fault is never recovered from: request a system reset. The emulator runs QEMU with
// -no-reboot, so a crash ends the QEMU process and the host sees it.
void fault_handler(void) {
    board_reset();
}

// The table stops at UART0 (IRQ 5), the last interrupt the port enables.
__attribute__((section(".isr_vector"), used))
void (*const vector_table[16 + UART0_IRQn + 1])(void) = {
    (void (*)(void))&_estack,
    Reset_Handler,
    fault_handler,      // NMI
    fault_handler,      // HardFault
    fault_handler,      // MemManage
    fault_handler,      // BusFault
    fault_handler,      // UsageFault
    0, 0, 0, 0,
    fault_handler,      // SVCall
    fault_handler,      // DebugMon
    0,
    fault_handler,      // PendSV
    SysTick_Handler,
    fault_handler,      // GPIO A
    fault_handler,      // GPIO B
    fault_handler,      // GPIO C
    fault_handler,      // GPIO D
    fault_handler,      // GPIO E
    UART0_Handler,
};
