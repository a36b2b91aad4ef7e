// Firmware entry of the QEMU Cortex-M boards: bring the board up and run the tpfed peer core on
// its UART through the COBS stream helper, with the whole arena the build gives
// (TPFED_ARENA_SIZE).
//
// Federation key: a build with -DTPFED_KEY_HEX=\"<64 hex digits>\" (tpfed flash --key-file)
// holds that key (in flash: anyone who can read the flash can read it). Otherwise the board
// starts without a key and takes one PROVISION frame on its UART (tpfed.runtime.emulator
// provisions emulated boards that way); until then it drops every frame.
#include "board.h"
#include "tpfed_auth.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"
#include "tpfed_stream.h"

#ifndef TPFED_ARENA_SIZE
#error "set TPFED_ARENA_SIZE (bytes) in platformio.ini build_flags"
#endif
#ifndef TPFED_BOARD_MAX_FRAME
#define TPFED_BOARD_MAX_FRAME 1024u   // largest frame taken and sent, header + payload + CRC
#endif
// KV groups and MLP ranges per layer entry this board takes.
#define TPFED_BOARD_MAX_GROUPS 32u
#define TPFED_BOARD_MAX_RANGES 8u

#ifndef PIO_UNIT_TESTING
static uint8_t arena[TPFED_ARENA_SIZE] __attribute__((aligned(8)));
static uint8_t rx_buf[TPFED_STREAM_BUFFER_SIZE(TPFED_BOARD_MAX_FRAME)];
static tpfed_stream stream;

static void link_write(void *ctx, const uint8_t *buf, uint32_t n) { (void)ctx; uart_write(buf, n); }
static uint32_t link_read(void *ctx, uint8_t *buf, uint32_t cap) { (void)ctx; return uart_read(buf, cap); }
static uint32_t hal_millis(void *ctx) { (void)ctx; return board_millis(); }
static void hal_random(void *ctx, uint8_t *buf, uint32_t n) { (void)ctx; board_random(buf, n); }

static const tpfed_hal hal = {&stream, tpfed_stream_send_frame, hal_millis, hal_random};

#ifdef TPFED_KEY_HEX
typedef char tpfed_key_hex_must_be_64_hex_digits[sizeof(TPFED_KEY_HEX) == 65 ? 1 : -1];
static uint8_t build_key[TPFED_KEY_SIZE];
#endif

int main(void) {
    board_init();
    const uint8_t *key = NULL;
#ifdef TPFED_KEY_HEX
    if (!tpfed_key_from_hex(build_key, TPFED_KEY_HEX)) board_reset();
    key = build_key;
#endif
    tpfed_stream_init(&stream, rx_buf, sizeof rx_buf, link_write, link_read, NULL);
    tpfed_peer_config cfg = {
        .hal = &hal,
        .info = board_info(),
        .device_class = TPFED_DEV_CORTEX_M_EMU,
        .transports = TPFED_TRANSPORT_SERIAL,
        .max_frame = TPFED_BOARD_MAX_FRAME,
        .max_groups = TPFED_BOARD_MAX_GROUPS,
        .max_ranges = TPFED_BOARD_MAX_RANGES,
        .int8_macs = 0,
        .key = key,
        .provision = key == NULL,
    };
    tpfed_peer *peer = tpfed_peer_init(arena, sizeof arena, &cfg);
    if (!peer) board_reset();
    for (;;) {
        if (!tpfed_stream_poll(&stream, peer)) board_sleep();
    }
    return 0;
}
#endif
