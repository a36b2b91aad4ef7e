// ESP32-family port (Arduino framework): the tpfed peer core on UART0 (the USB-serial bridge),
// COBS-framed by the stream helper (tpfed_stream.h).
// Federation key: built in with -DTPFED_KEY_HEX=\"<64 hex digits>\" (tpfed flash --key-file;
// it is then in flash, readable by whoever can read the flash), or else taken from the one
// PROVISION frame the board accepts on its serial line after each boot (kept in RAM only).
// Nonces come from esp_fill_random (the hardware RNG; true random with the radio on, and
// seeded by the bootloader's entropy otherwise).
// The arena is a static internal-RAM array; on boards built with PSRAM (BOARD_HAS_PSRAM and
// TPFED_PSRAM_ARENA_SIZE) it is one PSRAM block taken once at boot instead.
#include <Arduino.h>
#include <esp_system.h>
#if __has_include(<esp_random.h>)
#include <esp_random.h>   // esp_fill_random (ESP-IDF 5)
#endif

extern "C" {
#include "tpfed_auth.h"
#include "tpfed_peer.h"
#include "tpfed_proto.h"
#include "tpfed_stream.h"
}

#ifndef TPFED_ARENA_SIZE
#error "set TPFED_ARENA_SIZE (bytes) in platformio.ini build_flags"
#endif
#ifndef TPFED_BOARD_MAX_FRAME
#define TPFED_BOARD_MAX_FRAME 1024u   // largest frame taken and sent, header + payload + CRC
#endif
#ifndef TPFED_UART_BAUD
#define TPFED_UART_BAUD 921600
#endif

#if defined(CONFIG_IDF_TARGET_ESP32S3)
#define TPFED_BOARD_NAME "esp32-s3"
#define TPFED_DEVICE_CLASS TPFED_DEV_ESP32S3
#define TPFED_HAS_SIMD 1
#elif defined(CONFIG_IDF_TARGET_ESP32C3)
#define TPFED_BOARD_NAME "esp32-c3"
#define TPFED_DEVICE_CLASS TPFED_DEV_ESP32C3
#define TPFED_HAS_SIMD 0
#else
#define TPFED_BOARD_NAME "esp32"
#define TPFED_DEVICE_CLASS TPFED_DEV_ESP32
#define TPFED_HAS_SIMD 0
#endif

static uint8_t internal_arena[TPFED_ARENA_SIZE] __attribute__((aligned(8)));
static uint8_t rx_buf[TPFED_STREAM_BUFFER_SIZE(TPFED_BOARD_MAX_FRAME)];
static tpfed_stream stream;
static tpfed_peer *peer;
static tpfed_device_info info;

static void link_write(void *ctx, const uint8_t *buf, uint32_t n) {
    (void)ctx;
    Serial.write(buf, n);
}

static uint32_t link_read(void *ctx, uint8_t *buf, uint32_t cap) {
    (void)ctx;
    int avail = Serial.available();
    if (avail <= 0) return 0;
    if ((uint32_t)avail < cap) cap = (uint32_t)avail;
    return (uint32_t)Serial.readBytes(buf, cap);
}

static uint32_t hal_millis(void *ctx) {
    (void)ctx;
    return millis();
}

// Yield to FreeRTOS until input arrives (1 ms steps) so the idle task can run.
static void wait_input(uint32_t max_ms) {
    uint32_t start = millis();
    while (!Serial.available() && millis() - start < max_ms) vTaskDelay(1);
}

static void hal_random(void *ctx, uint8_t *buf, uint32_t n) {
    (void)ctx;
    esp_fill_random(buf, n);
}

static const tpfed_hal hal = {&stream, tpfed_stream_send_frame, hal_millis, hal_random};

#ifdef TPFED_KEY_HEX
static_assert(sizeof(TPFED_KEY_HEX) == 65, "TPFED_KEY_HEX must be 64 hex digits");
static uint8_t build_key[TPFED_KEY_SIZE];
#endif

void setup() {
    Serial.setRxBufferSize(4096);
    Serial.begin(TPFED_UART_BAUD);
    uint8_t *arena = internal_arena;
    size_t arena_size = sizeof internal_arena;
#if defined(BOARD_HAS_PSRAM) && defined(TPFED_PSRAM_ARENA_SIZE)
    if (psramFound()) {
        uint8_t *ext = (uint8_t *)ps_malloc(TPFED_PSRAM_ARENA_SIZE);   // once, at boot
        if (ext) {
            arena = ext;
            arena_size = TPFED_PSRAM_ARENA_SIZE;
        }
    }
#endif
    info.board = TPFED_BOARD_NAME;
    info.port = "esp32-arduino";
    info.cpu_hz = getCpuFrequencyMhz() * 1000000u;
    info.ram_bytes = ESP.getHeapSize();
    info.psram_bytes = ESP.getPsramSize();
    info.flash_bytes = ESP.getFlashChipSize();
    info.link_baud = TPFED_UART_BAUD;
#if defined(CONFIG_IDF_TARGET_ESP32C3)
    info.cores = 1;
#else
    info.cores = 2;
#endif
    info.has_fpu = 1;
#if defined(CONFIG_IDF_TARGET_ESP32C3)
    info.has_fpu = 0;
#endif
    info.has_simd = TPFED_HAS_SIMD;
    tpfed_stream_init(&stream, rx_buf, sizeof rx_buf, link_write, link_read, nullptr);
    tpfed_peer_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.hal = &hal;
    cfg.info = &info;
    cfg.device_class = TPFED_DEVICE_CLASS;
    cfg.transports = TPFED_TRANSPORT_SERIAL;
    cfg.max_frame = TPFED_BOARD_MAX_FRAME;
    cfg.max_groups = 64;
    cfg.max_ranges = 16;
    cfg.int8_macs = 0;   // measured now
#ifdef TPFED_KEY_HEX
    if (!tpfed_key_from_hex(build_key, TPFED_KEY_HEX)) esp_restart();
    cfg.key = build_key;
#else
    cfg.provision = 1;
#endif
    peer = tpfed_peer_init(arena, arena_size, &cfg);
    if (!peer) esp_restart();
}

void loop() {
    if (!tpfed_stream_poll(&stream, peer)) wait_input(10);
}
