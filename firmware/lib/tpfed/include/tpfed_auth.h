// Frame authentication (the C side of shared_protocol/auth.py, byte for byte): HMAC-SHA256 on
// sha256.c with the key's inner and outer states computed once per key, the handshake proofs
// and session key, sealing and checking frames with the AUTH trailer, and the replay window.
//
//   b   = nonce_c[16] || nonce_p[16] || device_id u8 || session u16 LE
//   proof_p = HMAC(K, "tpfed-peer" || b)     proof_c = HMAC(K, "tpfed-coord" || b)
//   Ks      = HMAC(K, "tpfed-session" || b)
//   sealed frame = header (flags has AUTH) || payload || counter u32 LE || tag[16] || crc32
//   tag = HMAC-SHA256(Ks, header || payload || counter)[:16]
//
// Every compare of secret-derived bytes is constant-time. Sizes are size_t (64-bit safe); a
// frame's size is checked against its header before any byte past the header is read.
// No heap; the structs are plain values the caller owns.
#ifndef TPFED_AUTH_H
#define TPFED_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_proto.h"
#include "tpfed_sha256.h"

// cffi:begin
// Counters below the highest seen that a replay window still takes (once each).
#define TPFED_AUTH_REPLAY_WINDOW 64
// tpfed_auth_derive: what to derive (the label that starts the HMAC message).
#define TPFED_AUTH_PEER_PROOF 1      // "tpfed-peer"
#define TPFED_AUTH_COORD_PROOF 2     // "tpfed-coord"
#define TPFED_AUTH_SESSION_KEY 3     // "tpfed-session"

// HMAC-SHA256 key: the SHA-256 states after the (key XOR ipad) and (key XOR opad) blocks.
typedef struct {
    uint32_t inner[8];
    uint32_t outer[8];
} tpfed_hmac_key;

typedef struct {
    tpfed_sha256_ctx sha;
    const tpfed_hmac_key *key;   // kept by pointer until tpfed_hmac_final
} tpfed_hmac_ctx;

// Prepare key[0..key_len) (any length; a 32-byte federation or session key here).
void tpfed_hmac_key_init(tpfed_hmac_key *k, const uint8_t *key, size_t key_len);
void tpfed_hmac_init(tpfed_hmac_ctx *c, const tpfed_hmac_key *k);
void tpfed_hmac_update(tpfed_hmac_ctx *c, const uint8_t *data, size_t n);
void tpfed_hmac_final(tpfed_hmac_ctx *c, uint8_t *mac);   // mac: 32 bytes
// One-shot HMAC-SHA256 (mac: 32 bytes).
void tpfed_hmac_sha256(uint8_t *mac, const uint8_t *key, size_t key_len, const uint8_t *data,
                       size_t n);
// 1 if a[0..n) == b[0..n), in time that depends on n only.
int tpfed_ct_equal(const uint8_t *a, const uint8_t *b, size_t n);
// Wipe n bytes so that the compiler cannot drop it.
void tpfed_wipe(void *p, size_t n);

// out (32 bytes) = HMAC(K, label(what) || b); returns TPFED_E_BAD_ARG for an unknown what.
int tpfed_auth_derive(uint8_t *out, const tpfed_hmac_key *k, int what, const uint8_t *nonce_c,
                      const uint8_t *nonce_p, uint8_t device_id, uint16_t session);

// tag (16 bytes) of the signed part of a sealed frame: header || payload || counter (n bytes).
void tpfed_auth_tag(uint8_t *tag, const tpfed_hmac_key *ks, const uint8_t *signed_part, size_t n);
// tpfed_frame_finish for a sealed frame: the payload is at buf + TPFED_HEADER_SIZE; sets AUTH in
// h->flags, writes the header, counter, tag and CRC. *frame_len = the whole frame's size.
int tpfed_auth_finish(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,
                      const tpfed_hmac_key *ks, uint32_t counter, size_t *frame_len);
// Re-seal a laid-out sealed frame in place (header with AUTH, payload, room for the trailer
// and CRC; len = its whole size): new counter, tag and CRC. For one frame sent to many peers,
// each under its own key (patch dst first if it differs). TPFED_E_BAD_ARG if len does not
// match the header or AUTH is not set.
int tpfed_auth_stamp(uint8_t *frame, size_t len, const tpfed_hmac_key *ks, uint32_t counter);
// Check the tag of a sealed frame (its size against its header, AUTH set; not the CRC: decode
// it with tpfed_frame_decode first). TPFED_OK and *counter, TPFED_E_BAD_TAG, TPFED_E_BAD_ARG.
int tpfed_auth_verify(const uint8_t *frame, size_t len, const tpfed_hmac_key *ks, uint32_t *counter);

// Replay window: the highest counter taken and a bitmap of the 64 counters up to it.
typedef struct {
    uint32_t highest;     // 0: none yet (counters start at 1)
    uint32_t reserved;
    uint64_t bitmap;      // bit i: counter highest - i was taken
} tpfed_replay_window;

void tpfed_replay_init(tpfed_replay_window *w);
// 1 if counter is new and not older than the window (0 is never fresh).
int tpfed_replay_fresh(const tpfed_replay_window *w, uint32_t counter);
// Mark counter taken (after tpfed_replay_fresh and a good tag).
void tpfed_replay_accept(tpfed_replay_window *w, uint32_t counter);

// One end of an established session: Ks, the session number, what it sent and has taken.
typedef struct {
    tpfed_hmac_key key;          // Ks
    tpfed_replay_window rx;
    uint32_t tx_counter;         // last counter sealed (0: none yet)
    uint16_t session;
    uint8_t established;
    uint8_t reserved;
} tpfed_auth_session;

// Start a session with Ks (32 bytes); counters from 1, empty replay window.
void tpfed_auth_session_init(tpfed_auth_session *s, const uint8_t *ks, uint16_t session);
// A received frame that tpfed_frame_decode accepted: TPFED_OK if it is sealed, of this session,
// its tag verifies and its counter is fresh (then taken); TPFED_E_BAD_TAG (no AUTH, another
// session, bad tag, no session) or TPFED_E_REPLAYED otherwise.
int tpfed_auth_session_open(tpfed_auth_session *s, const uint8_t *frame, size_t len);
// tpfed_auth_finish with the session's next counter; h->session is set to the session's.
// TPFED_E_BAD_ARG once the counter is exhausted (2^32 - 1 frames: run a new handshake).
int tpfed_auth_session_finish(tpfed_auth_session *s, uint8_t *buf, size_t cap, tpfed_header_t *h,
                              size_t payload_len, size_t *frame_len);
// tpfed_auth_stamp with the session's next counter.
int tpfed_auth_session_stamp(tpfed_auth_session *s, uint8_t *frame, size_t len);

// key (TPFED_KEY_SIZE bytes) from exactly 64 hex digits (a build's TPFED_KEY_HEX, a key file's
// text); returns 1, or 0 (key untouched) if hex is anything else.
int tpfed_key_from_hex(uint8_t *key, const char *hex);

// A tpfed_hal random function for hosts (Linux, macOS: /dev/urandom); aborts if that fails.
// Only built into host builds (not TPFED_FIRMWARE).
void tpfed_os_random(void *ctx, uint8_t *buf, uint32_t n);
// cffi:end

#endif
