// tpfed host port: the peer core served on a UDP socket, in C (the desktop peer, `tpfed peer`).
//
// The caller binds the socket (any family), sets up the core with the HAL this port gives
// (tpfed_udp_peer_hal) and calls tpfed_udp_peer_serve in a loop. Serving is poll ->
// recvmmsg (Linux; recvfrom elsewhere) -> reassembly of fragments (tpfed_datagram.h) ->
// tpfed_peer_handle_frame, whose replies go back to the sender of the frame being handled,
// fragmented above the MTU, in one sendmmsg per frame (sendto elsewhere). An ACTIVATION costs
// one receive, the compute and one send; no Python runs on that path (CFFI releases the GIL).
// Anything received is either handled or dropped and counted; nothing here allocates.
#ifndef TPFED_UDP_PEER_H
#define TPFED_UDP_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "tpfed_datagram.h"
#include "tpfed_hal.h"
#include "tpfed_peer.h"

// cffi:begin
// Largest UDP payload (IPv4); the largest MTU a peer takes.
#define TPFED_UDP_MAX_DATAGRAM 65507

typedef struct {
    uint64_t datagrams_in;
    uint64_t datagrams_out;
    uint64_t frames_in;       // frames handed to the core (whole or reassembled)
    uint64_t frames_out;      // frames the core sent
    uint32_t dropped;         // datagrams not taken (truncated, bad or stale fragments, ...)
    uint32_t refused;         // replies too large for 255 fragments at this MTU (not sent)
    uint32_t send_errors;
    uint32_t recv_errors;
} tpfed_udp_peer_stats;

typedef struct tpfed_udp_peer tpfed_udp_peer;   // opaque; in caller memory

// Smallest MTU with which a frame of max_frame bytes fits 255 fragments.
uint32_t tpfed_udp_peer_min_mtu(uint32_t max_frame);
// Bytes of caller memory tpfed_udp_peer_init needs (receive batch, transmit batch, reassembly
// of `slots` frames in flight of up to max_frame bytes); 0 if the arguments are out of range.
size_t tpfed_udp_peer_bytes(uint32_t mtu, uint32_t max_frame, uint32_t slots);
// Lay the port over mem for the bound UDP socket fd. Returns NULL if mem is too small or mtu
// is outside tpfed_udp_peer_min_mtu(max_frame)..TPFED_UDP_MAX_DATAGRAM.
tpfed_udp_peer *tpfed_udp_peer_init(void *mem, size_t mem_bytes, int fd, uint32_t mtu,
                                    uint32_t max_frame, uint32_t slots,
                                    uint32_t reassembly_timeout_ms);
// The HAL to configure the core with (send_frame replies to the current sender; millis is the
// monotonic clock). Lives in the port's memory.
const tpfed_hal *tpfed_udp_peer_hal(tpfed_udp_peer *u);
// The core this port serves (set up with the HAL above).
void tpfed_udp_peer_attach(tpfed_udp_peer *u, tpfed_peer *p);
// Serve for up to timeout_ms: returns the number of frames handled once timeout_ms have
// passed (at once if nothing came), or earlier, after the receive batch in which the core's
// state, session, layers assigned or layers held changed (see tpfed_udp_peer_event_from), or
// when a signal interrupted the wait. -errno on a socket error other than EINTR/EAGAIN, or
// -EINVAL when no core is attached.
int tpfed_udp_peer_serve(tpfed_udp_peer *u, int timeout_ms);
// After handling a frame, keep looking for the next one for spin_us microseconds (yielding
// the CPU) before sleeping in poll: during a run the next activation comes within that, and a
// sleeping process's wake-up would be on every stage's critical path. 0: sleep at once.
#define TPFED_UDP_PEER_SPIN_US 300
void tpfed_udp_peer_set_spin(tpfed_udp_peer *u, uint32_t spin_us);
const tpfed_udp_peer_stats *tpfed_udp_peer_get_stats(const tpfed_udp_peer *u);
const tpfed_datagram_stats *tpfed_udp_peer_rx_stats(const tpfed_udp_peer *u);
// Sender of the first frame that changed the core's state in the last serve call: writes its
// numeric host (at most cap bytes, NUL-terminated) and returns its port; -1 if there was none.
int tpfed_udp_peer_event_from(const tpfed_udp_peer *u, char *host, uint32_t cap);
// cffi:end

#endif
