// tpfed peer core: the protocol state machine every device runs (boards, the desktop peer
// through CFFI, a browser through WebAssembly). C99, no heap, no libm; frame-level.
//
// A port fills a tpfed_hal (send a frame, a millisecond clock), a tpfed_device_info and a
// tpfed_peer_config, hands tpfed_peer_init one arena, and calls tpfed_peer_handle_frame for
// every frame it receives (header + payload + CRC; the bytes must not lie in the arena).
// Replies go out through hal->send_frame before handle_frame returns.
//
// Authentication (shared_protocol/auth.py, tpfed_auth.h): a peer holds the federation key K
// (cfg->key; or, with cfg->provision, the key of the one PROVISION frame it takes while it has
// none, answered with an unauthenticated ACK; a repeat of the same key is ACKed again, any other
// PROVISION dropped). Without a key it drops every frame. With one, it answers an AUTH CHALLENGE
// (any dst) with a RESPONSE (a fresh nonce from hal->random and its proof; a repeated CHALLENGE
// gets the same RESPONSE), and a CONFIRM whose proof verifies establishes the session: Ks, the
// session number and the device id of the CHALLENGE, answered with an ACK (acked_type AUTH)
// sealed with Ks. A CONFIRM of the current session is ACKed again. While a session is live
// (an authenticated frame within TPFED_SESSION_IDLE_MS) a new handshake gets its RESPONSE, but
// its valid CONFIRM is answered with ERROR BUSY "peer busy with another session" (sealed with
// the new Ks) and the current session goes on; an idle session is replaced (its assignment
// dropped). BYE ends the session. Every other frame must be sealed with Ks, of the session,
// with a fresh counter (replay window of 64): anything else is dropped without a reply and
// counted (auth_dropped, replayed). Every frame the peer sends in a session is sealed; the
// handshake frames (RESPONSE) and the PROVISION ACK are not. Payloads are limited to
// max_frame - TPFED_AUTH_FRAME_OVERHEAD bytes both ways.
//
// States: an authenticated peer answers HELLO with its capabilities (including the int8 MAC/s it
// measured at start-up, or the figure the config gives); ASSIGN gives it a session, its device
// id and its share of each layer (KV groups and MLP column ranges). An ASSIGN is validated
// whole (groups strictly ascending and below n_kv_heads, ranges 32-aligned, ascending,
// disjoint, inside hidden_dim, layers below n_layers and not repeated: BAD_PAYLOAD; more groups
// or ranges per entry than the config takes, ACTIVATION/PARTIAL frames beyond max_frame:
// UNSUPPORTED) and sized whole, in 64-bit, before anything is laid out: if the arena cannot
// hold all of it (shares, unit views, f32 KV caches, compute scratch, tables) the answer is
// OUT_OF_MEMORY and the previous assignment stays as it was.
//
// WEIGHTS chunks fill one share per layer (the layer-share format of the host's shard
// module) in any order: chunk offsets are multiples of TPFED_WEIGHTS_GRANULE, and so are
// chunk lengths unless the chunk ends the share (BAD_PAYLOAD otherwise). Repeats are ignored;
// a chunk announcing another sha256 than the share being assembled starts that share over.
// When every granule is in, the share is hashed, checked (SHARD_HASH_MISMATCH, BAD_PAYLOAD;
// either way its assembly starts over) and the WEIGHTS frame that completed it is ACKed;
// READY follows once every assigned layer is complete. The last chunk of a share already held
// (same sha256) is ACKed again (and READY repeated), so a sender whose ACK was lost can go on.
// ACTIVATION is then answered with PARTIAL (float32), computed by the compute units
// (tpfed_units.h). ASSIGN's flags (TPFED_SHARE_*: biases, plain MLP and its activation,
// window, RoPE table or none, encoder attention) size every share and must equal each share's
// own; unknown flags are UNSUPPORTED. Stage KV appends the row's k/v at pos only (an empty
// PARTIAL); an encoder's ATTENTION attends over rows 0..n-1, n = one past the highest KV
// position since the last KV at position 0. HEARTBEAT and PROBE are served in any state of a session; malformed frames
// are dropped and counted. The device id is the handshake's (HELLO and ASSIGN do not change
// it); frames addressed to another device id (not broadcast) are dropped.
//
// Shares kept: every ASSIGN entry names the sha256 of the share it wants. A share the peer
// holds complete (hashed and checked against the sha256 its WEIGHTS announced, when its last
// granule came in) for that very entry (same layer, groups, ranges, geometry and flags), of the
// assignment in place or of one ended since (BYE, a new session: shares outlive them), is kept:
// the ACK of the ASSIGN sets the entry's bit in `held`, the share is moved into the new layout
// (memmove within the arena) and counts as complete; READY follows that ACK when every share
// is held already. Every other share is dropped, and KV caches always start empty. Keeping
// never needs memory beyond the new assignment's (the OUT_OF_MEMORY check is unchanged), and
// an ASSIGN refused keeps what was there.
//
// Memory: all in the arena, nothing else: the peer's own state first (opaque), the transmit
// frame buffer, then per ASSIGN the layer table, each layer's group/range tables,
// granule bitmap, unit views and KV caches, the compute buffers, then the shares (those to
// come, then those kept).
#ifndef TPFED_PEER_H
#define TPFED_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_hal.h"

// A session with no authenticated frame for this long may be replaced by a new handshake.
#ifndef TPFED_SESSION_IDLE_MS
#define TPFED_SESSION_IDLE_MS 30000u
#endif

// cffi:begin
// WEIGHTS chunks start on multiples of this many bytes of the share (lengths too, but for
// the chunk that ends the share).
#define TPFED_WEIGHTS_GRANULE 64
// The announced arena (HELLO arena_kb) excludes this much, kept for compute buffers.
#define TPFED_PEER_WORK_RESERVE 4096
// Smallest and largest max_frame a peer can be configured with.
#define TPFED_PEER_MIN_FRAME 256
#define TPFED_PEER_MAX_FRAME_LIMIT 65535
// tpfed_peer_state
#define TPFED_PEER_IDLE 0
#define TPFED_PEER_ASSIGNED 1
#define TPFED_PEER_READY 2

typedef struct {
    const tpfed_hal *hal;           // kept by pointer: must outlive the peer
    const tpfed_device_info *info;  // kept by pointer: must outlive the peer
    uint8_t device_class;           // tpfed_device_class_t, announced in HELLO
    uint8_t transports;             // TPFED_TRANSPORT_* flags announced in HELLO
    uint32_t max_frame;             // largest frame taken and sent, MIN_FRAME..MAX_FRAME_LIMIT
    uint16_t max_groups;            // KV groups per layer entry taken (at most 255 count)
    uint16_t max_ranges;            // MLP ranges per layer entry taken (at most 255 count)
    uint64_t int8_macs;             // 0 = measure at init with the matmul kernel (about 0.1 s)
    const uint8_t *key;             // federation key K (TPFED_KEY_SIZE bytes), or NULL: none
                                    // (read at init only; the peer keeps its HMAC states)
    uint8_t provision;              // 1: while it has no key, take one PROVISION frame (boards)
} tpfed_peer_config;

typedef struct tpfed_peer tpfed_peer;   // opaque; lives at the start of the arena

typedef struct {
    uint32_t frames_in;
    uint32_t frames_out;
    uint32_t dropped;       // malformed or not for us
    uint32_t errors_sent;
    uint32_t activations;
    uint32_t auth_dropped;  // unauthenticated, badly tagged, other session, no key, bad CONFIRM
    uint32_t replayed;      // counter seen before or older than the replay window
    uint32_t sessions;      // handshakes completed (sessions established)
    uint32_t busy;          // handshakes refused with ERROR BUSY
} tpfed_peer_stats;

// Bytes of arena a peer with this max_frame needs before any assignment (state, transmit
// buffer, worst-case alignment). 0 if max_frame is out of range.
size_t tpfed_peer_arena_min(uint32_t max_frame);
// Set up a peer at the (8-aligned) start of arena. Returns NULL if the config is incomplete or
// out of range (hal->random missing included), or the arena is smaller than
// tpfed_peer_arena_min(cfg->max_frame).
tpfed_peer *tpfed_peer_init(uint8_t *arena, size_t arena_size, const tpfed_peer_config *cfg);
// Handle one received frame (header + payload + CRC); replies go out through hal->send_frame.
void tpfed_peer_handle_frame(tpfed_peer *p, const uint8_t *frame, size_t len);

const tpfed_peer_stats *tpfed_peer_get_stats(const tpfed_peer *p);
int tpfed_peer_state(const tpfed_peer *p);            // TPFED_PEER_IDLE / ASSIGNED / READY
uint16_t tpfed_peer_session(const tpfed_peer *p);    // the established session, 0 if none
uint8_t tpfed_peer_device_id(const tpfed_peer *p);    // 255 until a handshake names it
int tpfed_peer_keyed(const tpfed_peer *p);            // 1 once it holds a federation key
int tpfed_peer_in_session(const tpfed_peer *p);       // 1 while a session is established
uint64_t tpfed_peer_int8_macs(const tpfed_peer *p);
size_t tpfed_peer_arena_size(const tpfed_peer *p);    // usable bytes (after alignment)
size_t tpfed_peer_arena_used(const tpfed_peer *p);    // fixed part + current assignment
uint32_t tpfed_peer_layers_assigned(const tpfed_peer *p);
uint32_t tpfed_peer_layers_held(const tpfed_peer *p); // assigned layers whose share is complete
// Complete shares in the arena: those of the assignment, or kept since it ended (BYE, a new
// session), which the next ASSIGN may name again.
uint32_t tpfed_peer_shares_kept(const tpfed_peer *p);

// Bytes of one layer share (layout: the host's shard module; header, group table padded to 4,
// ranges, then per group wq (gq, dim), wk, wv (head_size, dim), wo (dim, gq) and per range
// w1, w3 (n, dim), w2 (dim, n), each Q8_0 matrix's values and fp16 scales padded to 4), with
// gq = group_size * head_size. ranges holds n_ranges (start, end) pairs, end > start.
// Returns 0 on overflow or a range with end < start.
uint64_t tpfed_share_bytes(uint32_t dim, uint32_t head_size, uint32_t group_size,
                           uint32_t n_groups, const uint32_t *ranges, uint32_t n_ranges);
// The same with share flags (TPFED_SHARE_*: biases, plain MLP, window, RoPE table; share.py).
uint64_t tpfed_share_bytes_flags(uint32_t dim, uint32_t head_size, uint32_t group_size,
                                 uint32_t n_groups, const uint32_t *ranges, uint32_t n_ranges,
                                 uint32_t flags);
// cffi:end

#endif
