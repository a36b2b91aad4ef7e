// Cortex-M core support shared by the QEMU ports: startup, SysTick clock, NVIC, reset.
#include "cortex_m.h"

#define SYST_CSR REG_SYST(0x0u)
#define SYST_RVR REG_SYST(0x4u)
#define SYST_CVR REG_SYST(0x8u)
#define REG_SYST(off) CM_REG(0xE000E010u + (off))
#define NVIC_ISER(n) CM_REG(0xE000E100u + 4u * (n))
#define NVIC_ISPR(n) CM_REG(0xE000E200u + 4u * (n))
#define SCB_ICSR CM_REG(0xE000ED04u)
#define SCB_AIRCR CM_REG(0xE000ED0Cu)
#define ICSR_PENDSTSET (1u << 26)
#define AIRCR_VECTKEY (0x05FAu << 16)
#define AIRCR_SYSRESETREQ (1u << 2)
#define SYSTICK_RELOAD 0xFFFFFFu

static volatile uint32_t systick_wraps;

void Reset_Handler(void) {
    board_early_init();
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    main();
    cm_reset();
}

// A fault is never recovered from: request a system reset, which ends QEMU (-no-reboot),
// so the host sees the crash.
void fault_handler(void) {
    cm_reset();
}

void SysTick_Handler(void) {
    systick_wraps++;
}

void cm_nvic_enable(uint32_t irq) {
    NVIC_ISER(irq >> 5) = 1u << (irq & 31u);
}

void cm_nvic_set_pending(uint32_t irq) {
    NVIC_ISPR(irq >> 5) = 1u << (irq & 31u);
}

void cm_clock_start(void) {
    SYST_RVR = SYSTICK_RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7u;   // processor clock, interrupt on wrap, enable
}

uint32_t cm_systick_value(void) { return SYST_CVR; }

uint64_t cm_micros(uint32_t cpu_hz) {
    static uint64_t last;
    cm_irq_disable();
    uint32_t wraps = systick_wraps;
    uint32_t val = SYST_CVR;
    if (SCB_ICSR & ICSR_PENDSTSET) {   // wrapped, interrupt not taken yet
        wraps++;
        val = SYST_CVR;
    }
    uint64_t ticks = ((uint64_t)wraps << 24) + (SYSTICK_RELOAD - val);
    uint64_t us = ticks * 1000000u / cpu_hz;
    if (us < last) us = last;
    last = us;
    cm_irq_enable();
    return us;
}

void cm_reset(void) {
    __asm__ volatile("dsb" ::: "memory");
    SCB_AIRCR = AIRCR_VECTKEY | AIRCR_SYSRESETREQ;
    for (;;) cm_wfi();
}
