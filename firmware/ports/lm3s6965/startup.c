// Vector table of the LM3S6965 (Cortex-M3); the handlers are in ports/common/cortex_m.c.
#include <stdint.h>

#include "board.h"
#include "cortex_m.h"

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
