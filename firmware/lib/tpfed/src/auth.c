// Frame authentication (see tpfed_auth.h).
#include "tpfed_auth.h"

#include <string.h>

// ------------------------------------------------------------------------------- HMAC

static void state_after_block(uint32_t *state, const uint8_t *block64) {
    tpfed_sha256_ctx c;
    tpfed_sha256_init(&c);
    tpfed_sha256_update(&c, block64, 64);   // exactly one compression, nothing pending
    memcpy(state, c.state, sizeof c.state);
    tpfed_wipe(&c, sizeof c);
}

void tpfed_hmac_key_init(tpfed_hmac_key *k, const uint8_t *key, size_t key_len) {
    uint8_t block[64], pad[64];
    memset(block, 0, sizeof block);
    if (key_len > 64) {
        tpfed_sha256(block, key, key_len);
    } else if (key_len) {
        memcpy(block, key, key_len);
    }
    for (int i = 0; i < 64; i++) pad[i] = (uint8_t)(block[i] ^ 0x36u);
    state_after_block(k->inner, pad);
    for (int i = 0; i < 64; i++) pad[i] = (uint8_t)(block[i] ^ 0x5Cu);
    state_after_block(k->outer, pad);
    tpfed_wipe(block, sizeof block);
    tpfed_wipe(pad, sizeof pad);
}

static void resume(tpfed_sha256_ctx *c, const uint32_t *state) {
    memcpy(c->state, state, sizeof c->state);
    c->nbytes = 64;
    c->nblock = 0;
}

void tpfed_hmac_init(tpfed_hmac_ctx *c, const tpfed_hmac_key *k) {
    c->key = k;
    resume(&c->sha, k->inner);
}

void tpfed_hmac_update(tpfed_hmac_ctx *c, const uint8_t *data, size_t n) {
    tpfed_sha256_update(&c->sha, data, n);
}

void tpfed_hmac_final(tpfed_hmac_ctx *c, uint8_t *mac) {
    uint8_t inner[TPFED_SHA256_DIGEST];
    tpfed_sha256_final(&c->sha, inner);
    resume(&c->sha, c->key->outer);
    tpfed_sha256_update(&c->sha, inner, sizeof inner);
    tpfed_sha256_final(&c->sha, mac);
    tpfed_wipe(inner, sizeof inner);
}

void tpfed_hmac_sha256(uint8_t *mac, const uint8_t *key, size_t key_len, const uint8_t *data,
                       size_t n) {
    tpfed_hmac_key k;
    tpfed_hmac_ctx c;
    tpfed_hmac_key_init(&k, key, key_len);
    tpfed_hmac_init(&c, &k);
    tpfed_hmac_update(&c, data, n);
    tpfed_hmac_final(&c, mac);
    tpfed_wipe(&k, sizeof k);
}

int tpfed_ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < n; i++) diff |= (uint8_t)(a[i] ^ b[i]);
    return diff == 0;
}

void tpfed_wipe(void *p, size_t n) {
    volatile uint8_t *v = (volatile uint8_t *)p;
    while (n--) *v++ = 0;
}

// ------------------------------------------------------------------------------- handshake

int tpfed_auth_derive(uint8_t *out, const tpfed_hmac_key *k, int what, const uint8_t *nonce_c,
                      const uint8_t *nonce_p, uint8_t device_id, uint16_t session) {
    static const char *const labels[] = {"tpfed-peer", "tpfed-coord", "tpfed-session"};
    if (!out || !k || !nonce_c || !nonce_p || what < TPFED_AUTH_PEER_PROOF ||
        what > TPFED_AUTH_SESSION_KEY)
        return TPFED_E_BAD_ARG;
    const char *label = labels[what - 1];
    uint8_t tail[3] = {device_id, (uint8_t)session, (uint8_t)(session >> 8)};
    tpfed_hmac_ctx c;
    tpfed_hmac_init(&c, k);
    tpfed_hmac_update(&c, (const uint8_t *)label, strlen(label));
    tpfed_hmac_update(&c, nonce_c, TPFED_NONCE_SIZE);
    tpfed_hmac_update(&c, nonce_p, TPFED_NONCE_SIZE);
    tpfed_hmac_update(&c, tail, sizeof tail);
    tpfed_hmac_final(&c, out);
    return TPFED_OK;
}

// ------------------------------------------------------------------------------- frames

void tpfed_auth_tag(uint8_t *tag, const tpfed_hmac_key *ks, const uint8_t *signed_part, size_t n) {
    uint8_t mac[TPFED_SHA256_DIGEST];
    tpfed_hmac_ctx c;
    tpfed_hmac_init(&c, ks);
    tpfed_hmac_update(&c, signed_part, n);
    tpfed_hmac_final(&c, mac);
    memcpy(tag, mac, TPFED_TAG_SIZE);
}

// Payload length of a frame of len bytes whose header says AUTH and whose size agrees.
static int sealed_payload_len(const uint8_t *frame, size_t len, size_t *plen) {
    if (!frame || len < (size_t)TPFED_AUTH_FRAME_OVERHEAD) return 0;
    if (!(frame[3] & TPFED_FLAG_AUTH)) return 0;
    size_t n = tpfed_rd_u16(frame + TPFED_HEADER_SIZE - 2);
    if (len != n + (size_t)TPFED_AUTH_FRAME_OVERHEAD) return 0;
    *plen = n;
    return 1;
}

int tpfed_auth_stamp(uint8_t *frame, size_t len, const tpfed_hmac_key *ks, uint32_t counter) {
    size_t plen;
    if (!ks || counter == 0 || !sealed_payload_len(frame, len, &plen)) return TPFED_E_BAD_ARG;
    size_t at = (size_t)TPFED_HEADER_SIZE + plen;
    tpfed_wr_u32(frame + at, counter);
    tpfed_auth_tag(frame + at + 4, ks, frame, at + 4);
    tpfed_frame_put_crc(frame, len);
    return TPFED_OK;
}

int tpfed_auth_finish(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,
                      const tpfed_hmac_key *ks, uint32_t counter, size_t *frame_len) {
    if (!h || !ks || counter == 0) return TPFED_E_BAD_ARG;
    h->flags = (uint8_t)(h->flags | TPFED_FLAG_AUTH);
    int rc = tpfed_frame_begin(buf, cap, h, payload_len, frame_len);
    if (rc != TPFED_OK) return rc;
    return tpfed_auth_stamp(buf, *frame_len, ks, counter);
}

int tpfed_auth_verify(const uint8_t *frame, size_t len, const tpfed_hmac_key *ks, uint32_t *counter) {
    size_t plen;
    uint8_t tag[TPFED_TAG_SIZE];
    if (!ks || !counter) return TPFED_E_BAD_ARG;
    if (!sealed_payload_len(frame, len, &plen)) return TPFED_E_BAD_TAG;
    size_t at = (size_t)TPFED_HEADER_SIZE + plen;
    tpfed_auth_tag(tag, ks, frame, at + 4);
    if (!tpfed_ct_equal(tag, frame + at + 4, TPFED_TAG_SIZE)) return TPFED_E_BAD_TAG;
    *counter = tpfed_rd_u32(frame + at);
    return TPFED_OK;
}

// ------------------------------------------------------------------------------- replay

void tpfed_replay_init(tpfed_replay_window *w) { memset(w, 0, sizeof *w); }

int tpfed_replay_fresh(const tpfed_replay_window *w, uint32_t counter) {
    if (counter == 0) return 0;
    if (counter > w->highest) return 1;
    uint32_t diff = w->highest - counter;
    return diff < TPFED_AUTH_REPLAY_WINDOW && !((w->bitmap >> diff) & 1u);
}

void tpfed_replay_accept(tpfed_replay_window *w, uint32_t counter) {
    if (counter > w->highest) {
        uint32_t shift = counter - w->highest;
        w->bitmap = shift >= TPFED_AUTH_REPLAY_WINDOW ? 0 : w->bitmap << shift;
        w->bitmap |= 1u;
        w->highest = counter;
    } else if (w->highest - counter < TPFED_AUTH_REPLAY_WINDOW) {
        w->bitmap |= (uint64_t)1u << (w->highest - counter);
    }
}

// ------------------------------------------------------------------------------- sessions

void tpfed_auth_session_init(tpfed_auth_session *s, const uint8_t *ks, uint16_t session) {
    memset(s, 0, sizeof *s);
    tpfed_hmac_key_init(&s->key, ks, TPFED_KEY_SIZE);
    tpfed_replay_init(&s->rx);
    s->session = session;
    s->established = 1;
}

int tpfed_auth_session_open(tpfed_auth_session *s, const uint8_t *frame, size_t len) {
    uint32_t counter = 0;
    if (!s || !s->established || !frame || len < TPFED_HEADER_SIZE) return TPFED_E_BAD_TAG;
    if (tpfed_rd_u16(frame + 8) != s->session) return TPFED_E_BAD_TAG;
    int rc = tpfed_auth_verify(frame, len, &s->key, &counter);
    if (rc != TPFED_OK) return TPFED_E_BAD_TAG;
    if (!tpfed_replay_fresh(&s->rx, counter)) return TPFED_E_REPLAYED;
    tpfed_replay_accept(&s->rx, counter);
    return TPFED_OK;
}

int tpfed_auth_session_finish(tpfed_auth_session *s, uint8_t *buf, size_t cap, tpfed_header_t *h,
                              size_t payload_len, size_t *frame_len) {
    if (!s || !s->established || !h || s->tx_counter == UINT32_MAX) return TPFED_E_BAD_ARG;
    h->session = s->session;
    int rc = tpfed_auth_finish(buf, cap, h, payload_len, &s->key, s->tx_counter + 1u, frame_len);
    if (rc == TPFED_OK) s->tx_counter++;
    return rc;
}

int tpfed_auth_session_stamp(tpfed_auth_session *s, uint8_t *frame, size_t len) {
    if (!s || !s->established || s->tx_counter == UINT32_MAX) return TPFED_E_BAD_ARG;
    int rc = tpfed_auth_stamp(frame, len, &s->key, s->tx_counter + 1u);
    if (rc == TPFED_OK) s->tx_counter++;
    return rc;
}

// ------------------------------------------------------------------------------- keys

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int tpfed_key_from_hex(uint8_t *key, const char *hex) {
    uint8_t k[TPFED_KEY_SIZE];
    if (!key || !hex) return 0;
    for (int i = 0; i < TPFED_KEY_SIZE; i++) {
        int hi = hex_digit(hex[2 * i]);
        int lo = hi < 0 ? -1 : hex_digit(hex[2 * i + 1]);
        if (lo < 0) return 0;
        k[i] = (uint8_t)(hi << 4 | lo);
    }
    if (hex[2 * TPFED_KEY_SIZE] != 0) return 0;
    memcpy(key, k, sizeof k);
    tpfed_wipe(k, sizeof k);
    return 1;
}

// ------------------------------------------------------------------------------- host random

#if !defined(TPFED_FIRMWARE) && (defined(__linux__) || defined(__APPLE__))
#include <stdio.h>
#include <stdlib.h>

void tpfed_os_random(void *ctx, uint8_t *buf, uint32_t n) {
    (void)ctx;
    FILE *f = fopen("/dev/urandom", "rb");
    if (!f || fread(buf, 1, n, f) != n) abort();   // no nonces without randomness
    fclose(f);
}
#endif
