// tpfed host port: the coordinator's side of a stage over UDP, in C.
//
// Per stage the coordinator sends one ACTIVATION frame to every device holding part of it and
// waits for their PARTIALs. Doing that from Python costs one call per peer to send and one
// wake-up per frame to receive; here it is one sendmmsg for all peers and one gather that
// blocks in poll/recvmmsg (the GIL is released: CFFI API mode) until every partial is in.
//
// A fleet is a table of peer addresses on one bound UDP socket (the coordinator's asyncio
// endpoint). The gather decodes each peer's float32 PARTIAL for (session, seq) into its row of
// a caller-owned (n, dim) matrix. Every other datagram (an ERROR, a fragment, a stale or
// damaged frame, anything from an unknown address) is kept, whole and with its sender's index,
// in a caller-owned side buffer for the Python path, which reports errors, reassembles and
// retries. The gather returns as soon as all partials are in, a datagram from one of the
// awaited peers went to the side buffer, the side buffer is full, or the timeout passed.
// Memory is the caller's; nothing here allocates.
#ifndef TPFED_UDP_FLEET_H
#define TPFED_UDP_FLEET_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_auth.h"
#include "tpfed_mem_peer.h"
#include "tpfed_peer.h"

// cffi:begin
typedef struct tpfed_udp_fleet tpfed_udp_fleet;

// Bytes of caller-owned memory a fleet of at most max_peers needs (8-byte aligned).
size_t tpfed_udp_fleet_bytes(int max_peers);
// Lay a fleet over mem for the bound UDP socket fd (-1: in-process peers only). Returns NULL
// if mem_bytes is too small.
tpfed_udp_fleet *tpfed_udp_fleet_init(void *mem, size_t mem_bytes, int fd, int max_peers);
// Add the peer at numeric host (IPv4 or IPv6 text) and port; returns its index, or -1 if the
// address is not numeric or the fleet is full.
int tpfed_udp_fleet_add(tpfed_udp_fleet *f, const char *host, int port);

// Add an in-process peer core (the coordinator's own share): send_all hands it the frame
// (after the datagrams to the others are out, so it computes while they do) and the gather
// takes its replies from the outbox of mem like datagrams. Returns its index, or -1.
int tpfed_udp_fleet_add_local(tpfed_udp_fleet *f, tpfed_mem_peer *mem, tpfed_peer *core);
// Seal what goes to peer i and open what comes from it in session s (tpfed_auth.h; kept by
// pointer, shared with the caller's other paths so the counters stay one). NULL: in clear.
void tpfed_udp_fleet_set_auth(tpfed_udp_fleet *f, int i, tpfed_auth_session *s);
// While waiting for partials, look again (yielding the CPU) for spin_us microseconds after the
// last datagram before sleeping in poll: a partial from a nearby peer comes within that, and
// waking a sleeping process would be on every stage's critical path. 0: sleep at once.
#define TPFED_UDP_FLEET_SPIN_US 300
void tpfed_udp_fleet_set_spin(tpfed_udp_fleet *f, uint32_t spin_us);
// Datagrams from fleet peers dropped because they did not open in their session.
uint32_t tpfed_udp_fleet_auth_dropped(const tpfed_udp_fleet *f);
// How often a datagram to peer i came back as unreachable (ICMP port or host unreachable,
// read from the socket's error queue: its process is gone). The gather returns early when an
// awaited peer becomes unreachable.
uint32_t tpfed_udp_fleet_unreachable(const tpfed_udp_fleet *f, int i);
// Read the socket's error queue now (also for datagrams sent by other code on this socket);
// returns how many errors concerned fleet peers.
int tpfed_udp_fleet_check_errors(tpfed_udp_fleet *f);

// Send frame to peers[0..n) (fleet indices) with as few system calls as the kernel allows.
// A frame laid out sealed (AUTH flag, room for the trailer) is stamped for each peer in its
// own session (its counter, tag, CRC) on the way. Returns how many were sent, or -errno.
int tpfed_udp_send_all(tpfed_udp_fleet *f, const uint8_t *frame, uint32_t len,
                       const int *peers, int n);

typedef struct {
    uint8_t *buf;       // side buffer for datagrams the gather did not take
    uint32_t cap;       // its size in bytes
    uint32_t used;      // bytes used: records of (u32 length, i32 peer index or -1, data)
    uint32_t count;     // records in it
} tpfed_udp_side;

// Receive until every group has one PARTIAL (sealed in its peer's session when the peer has
// one; anything that does not open is dropped and counted) (float32, n == dim) for this session and seq, or
// timeout_ms passed (see the top of this file for the other exits). peers[i] belongs to group
// group_of[i] (0 <= group < n_groups); the members of a group are replicas holding identical
// shares, so the first partial of any member serves the group. With group_of NULL every peer
// is its own group (n_groups = n). Row i of partials (n, dim) gets peer i's values and got[i]
// the bytes of its frame (rows already got are kept). Returns how many groups are now served,
// or -errno.
int tpfed_udp_gather(tpfed_udp_fleet *f, const int *peers, int n, const int *group_of,
                     int n_groups, uint16_t session, uint16_t seq, uint16_t layer, uint8_t stage,
                     uint16_t pos, int dim, float *partials, uint32_t *got, int timeout_ms,
                     tpfed_udp_side *side);

// One whole stage in one call: build the ACTIVATION of (layer, stage, pos) from the Q8_0
// vector (qs: dim int8, d: ceil(dim/32) fp16 scales) — sealed per peer when the peers have
// sessions —, send it to peers[0..n), gather the first PARTIAL of every group (as
// tpfed_udp_gather; chosen[g] = the row taken for group g, -1 if none) and, when every group
// is served, write their sum in group order to out (dim). Returns the groups served (out is
// written only when that is n_groups), or -errno. The ACTIVATION's frame is left in frame_out
// (cap bytes; *frame_len its size) for the caller's slower path to resend.
int tpfed_udp_stage(tpfed_udp_fleet *f, const int *peers, int n, const int *group_of,
                    int n_groups, uint16_t session, uint16_t seq, uint16_t layer, uint8_t stage,
                    uint16_t pos, const int8_t *qs, const uint16_t *d, int dim, float *partials,
                    uint32_t *got, int *chosen, int timeout_ms, tpfed_udp_side *side, float *out,
                    uint8_t *frame_out, uint32_t cap, uint32_t *frame_len);

// out (dim) = rows[which[0]] + rows[which[1]] + ... + rows[which[n-1]], added in that order
// (the plan's order); which NULL means rows 0..n-1.
void tpfed_sum_rows_f32(float *out, const float *rows, const int *which, int n, int dim);
// cffi:end

#endif
