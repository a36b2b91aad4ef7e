// Firmware entry of the QEMU Cortex-M boards: bring the board up and run the tpfed peer on its
// UART, with the whole arena the build gives (TPFED_ARENA_SIZE).
#include "board.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"

#ifndef TPFED_ARENA_SIZE
#error "set TPFED_ARENA_SIZE (bytes) in platformio.ini build_flags"
#endif

#ifndef PIO_UNIT_TESTING
static uint8_t arena[TPFED_ARENA_SIZE] __attribute__((aligned(8)));
static tpfed_peer peer;

int main(void) {
    board_init();
    tpfed_peer_init(&peer, board_hal(), board_info(), TPFED_DEV_CORTEX_M_EMU, arena, sizeof arena);
    tpfed_peer_run(&peer);
    return 0;
}
#endif
