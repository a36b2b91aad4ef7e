// Vector table of the Musca-B1's CPU0 (Cortex-M33, ARMv8-M Mainline), placed where the
// Secure VTOR points at reset (0x10000000); the handlers are in ports/common/cortex_m.c.
#include <stdint.h>

#include "board.h"
#include "cortex_m.h"

// The table stops at UART0 (IRQ 44), the last interrupt the port enables.
__attribute__((section(".isr_vector"), used))
void (*const vector_table[16 + UART0_IRQn + 1])(void) = {
    [0] = (void (*)(void))&_estack,
    [1] = Reset_Handler,
    [2] = fault_handler,     // NMI
    [3] = fault_handler,     // HardFault
    [4] = fault_handler,     // MemManage
    [5] = fault_handler,     // BusFault
    [6] = fault_handler,     // UsageFault
    [7] = fault_handler,     // SecureFault
    [11] = fault_handler,    // SVCall
    [12] = fault_handler,    // DebugMonitor
    [14] = fault_handler,    // PendSV
    [15] = SysTick_Handler,
    [16 ... 16 + UART0_IRQn - 1] = fault_handler,   // interrupts the port never enables
    [16 + UART0_IRQn] = UART0_Handler,
};
