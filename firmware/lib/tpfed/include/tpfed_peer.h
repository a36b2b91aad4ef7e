// tpfed portable peer: the protocol state machine of a board, C99, no heap.
//
// States: a fresh peer answers HELLO with its capabilities (including the int8 MAC/s it
// measured at start-up); ASSIGN gives it a session, its device id and its share of each layer
// (KV groups and MLP column ranges) and lays the share out in the arena; WEIGHTS chunks fill
// one shard per layer (the layer-share format of host/tpfed/shard.py), hashed on the fly and
// refused with an ERROR unless the SHA-256 matches and the shard parses; once every assigned
// layer is in, it sends READY and answers ACTIVATION with PARTIAL (float32), computed by
// attention_units_forward / mlp_units_forward (tpfed_units.h) over unit views of the shard.
// An ASSIGN whose PARTIAL or ACTIVATION frames would exceed TPFED_PEER_MAX_FRAME is refused
// (UNSUPPORTED). HEARTBEAT and PROBE are served in any state, BYE only from the current
// session; malformed frames are dropped and counted.
//
// Memory: everything lives in the arena the port hands to tpfed_peer_init: the receive and
// transmit frame buffers first, then, per ASSIGN, the layer table, the shards, the unit views
// of each shard, the f32 KV caches and the compute buffers. WEIGHTS chunks of one shard must arrive in order (repeats of
// already received chunks are ignored), which a stream link gives.
#ifndef TPFED_PEER_H
#define TPFED_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_cobs.h"
#include "tpfed_hal.h"
#include "tpfed_sha256.h"

#ifndef TPFED_PEER_MAX_FRAME
#define TPFED_PEER_MAX_FRAME 1024   // largest frame taken, header + payload + CRC
#endif
// Announced arena excludes this much, kept for compute buffers (exact figures in READY).
#define TPFED_PEER_WORK_RESERVE 4096u

typedef struct tpfed_peer_layer tpfed_peer_layer;

typedef struct {
    uint32_t frames_in;
    uint32_t frames_out;
    uint32_t dropped;       // malformed or not for us
    uint32_t errors_sent;
    uint32_t activations;
} tpfed_peer_stats;

typedef struct tpfed_peer {
    const tpfed_hal *hal;
    const tpfed_device_info *info;
    uint8_t device_class;       // tpfed_device_class_t
    uint8_t *arena;
    uint32_t arena_size;
    uint32_t arena_fixed;       // bytes taken by the frame buffers
    uint32_t arena_used;        // fixed + current assignment
    uint8_t *rx;                // decoded frame (COBS stream buffer)
    uint8_t *tx;                // frame being built
    tpfed_cobs_stream_t stream;
    uint64_t int8_macs;
    uint8_t device_id;
    uint16_t session;
    uint16_t seq;
    uint8_t assigned;
    uint8_t ready;
    // model geometry from ASSIGN
    uint16_t dim, n_heads, n_kv_heads, head_size, group_size, seq_len;
    uint32_t hidden_dim;
    uint16_t n_layers;
    float norm_eps, rope_theta;
    uint16_t n_entries;
    tpfed_peer_layer *layers;
    // compute buffers (arena)
    float *out;                 // (dim) partial of the current ACTIVATION
    int8_t *xq_qs;              // (dim) activation values
    uint16_t *xq_d;             // (ceil(dim/32)) activation fp16 scales
    void *work;                 // scratch of attention_units_forward / mlp_units_forward
    uint32_t work_bytes;
    tpfed_peer_stats stats;
} tpfed_peer;

// Prepare the peer on this port; measures int8 MAC/s with the matmul kernel (about 0.1 s).
// Returns 0, or -1 if the arena cannot hold the frame buffers.
int tpfed_peer_init(tpfed_peer *p, const tpfed_hal *hal, const tpfed_device_info *info,
                    uint8_t device_class, uint8_t *arena, uint32_t arena_size);
// Measure int8 multiply-accumulates per second of matmul_q8_0_f32 on this board, using the
// arena past arena_fixed as scratch and the HAL's millisecond clock.
uint64_t tpfed_peer_measure_macs(tpfed_peer *p);
// Read what the link has, handle every complete frame. Returns the number of frames handled.
int tpfed_peer_poll(tpfed_peer *p);
// Handle one decoded frame (header + payload + CRC); replies go out through the HAL.
void tpfed_peer_handle_frame(tpfed_peer *p, const uint8_t *frame, size_t len);
// poll + wait, forever.
void tpfed_peer_run(tpfed_peer *p);

#endif
