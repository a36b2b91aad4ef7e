// The peer core on a UDP socket (see tpfed_udp_peer.h). POSIX; Linux batches with recvmmsg
// and sendmmsg, elsewhere one recvfrom/sendto per datagram.
#define _GNU_SOURCE 1
#include "tpfed_udp_peer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "tpfed_auth.h"
#include "tpfed_proto.h"

#define RX_BATCH 16           // datagrams per receive call
#define RX_DGRAM 65536        // receive buffer per datagram (the largest UDP payload fits)
#define TX_BATCH 32           // datagrams per send call

#if defined(__linux__)
#define HAVE_MMSG 1
#endif

struct tpfed_udp_peer {
    int fd;
    uint32_t mtu;
    uint32_t spin_us;         // after a frame, look for the next one this long before sleeping
    tpfed_hal hal;
    tpfed_peer *peer;
    tpfed_datagram_tx tx;
    tpfed_datagram_rx rx;
    tpfed_udp_peer_stats stats;
    // Where replies go: the sender of the frame being handled.
    const struct sockaddr_storage *reply_to;
    socklen_t reply_len;
    // What the core looked like after the last frame (state, session, layers).
    int sig_state;
    uint16_t sig_session;
    uint32_t sig_assigned, sig_held;
    int event;
    struct sockaddr_storage event_addr;
    socklen_t event_len;
    // Receive batch.
    uint8_t *rx_bufs;                         // RX_BATCH x RX_DGRAM
    struct sockaddr_storage rx_addr[RX_BATCH];
    struct iovec rx_iov[RX_BATCH];
#ifdef HAVE_MMSG
    struct mmsghdr rx_msg[RX_BATCH];
    struct mmsghdr tx_msg[TX_BATCH];
#endif
    // Transmit batch: datagrams queued by the fragmenter, sent after the core's send_frame.
    uint8_t *tx_bufs;                         // TX_BATCH x mtu
    uint8_t *frag_buf;                        // mtu bytes, the fragmenter's scratch
    struct iovec tx_iov[TX_BATCH];
    uint32_t tx_n;
};

static size_t align8(size_t n) { return (n + 7u) & ~(size_t)7u; }

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint32_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

static uint32_t hal_millis(void *ctx) {
    (void)ctx;
    return now_ms();
}

uint32_t tpfed_udp_peer_min_mtu(uint32_t max_frame) {
    uint32_t chunk = max_frame / TPFED_DATAGRAM_MAX_FRAGMENTS +
                     (max_frame % TPFED_DATAGRAM_MAX_FRAGMENTS != 0);
    uint32_t mtu = chunk + TPFED_FRAGMENT_HEADER_SIZE;
    return mtu < TPFED_FRAME_OVERHEAD ? TPFED_FRAME_OVERHEAD : mtu;
}

static int args_ok(uint32_t mtu, uint32_t max_frame, uint32_t slots) {
    return max_frame >= TPFED_FRAME_OVERHEAD && max_frame <= TPFED_PEER_MAX_FRAME_LIMIT &&
           mtu >= tpfed_udp_peer_min_mtu(max_frame) && mtu <= TPFED_UDP_MAX_DATAGRAM &&
           slots >= 1 && slots <= 1024;
}

size_t tpfed_udp_peer_bytes(uint32_t mtu, uint32_t max_frame, uint32_t slots) {
    if (!args_ok(mtu, max_frame, slots)) return 0;
    return 7u + align8(sizeof(tpfed_udp_peer)) + (size_t)RX_BATCH * RX_DGRAM +
           (size_t)TX_BATCH * align8(mtu) + align8(mtu) + tpfed_datagram_rx_bytes(slots, max_frame);
}

// ------------------------------------------------------------------------------ sending

static void flush(tpfed_udp_peer *u) {
    uint32_t done = 0;
    int tries = 0;
    while (done < u->tx_n) {
#ifdef HAVE_MMSG
        int k = sendmmsg(u->fd, u->tx_msg + done, u->tx_n - done, 0);
#else
        int k = sendto(u->fd, u->tx_iov[done].iov_base, u->tx_iov[done].iov_len, 0,
                       (const struct sockaddr *)u->reply_to, u->reply_len) < 0 ? -1 : 1;
#endif
        if (k > 0) {
            done += (uint32_t)k;
            u->stats.datagrams_out += (uint32_t)k;
            continue;
        }
        if (k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) &&
            ++tries < 50) {
            struct pollfd pfd = {u->fd, POLLOUT, 0};
            poll(&pfd, 1, 10);
            continue;
        }
        // Unreachable sender, or the socket stays full: the rest of this frame is lost (the
        // coordinator retries).
        u->stats.send_errors++;
        break;
    }
    u->tx_n = 0;
}

static void emit(void *ctx, const uint8_t *d, uint32_t len) {
    tpfed_udp_peer *u = (tpfed_udp_peer *)ctx;
    if (u->tx_n == TX_BATCH) flush(u);
    uint32_t i = u->tx_n++;
    uint8_t *slot = u->tx_bufs + (size_t)i * align8(u->mtu);
    memcpy(slot, d, len);
    u->tx_iov[i].iov_base = slot;
    u->tx_iov[i].iov_len = len;
#ifdef HAVE_MMSG
    struct msghdr *m = &u->tx_msg[i].msg_hdr;
    memset(m, 0, sizeof *m);
    m->msg_name = (void *)u->reply_to;
    m->msg_namelen = u->reply_len;
    m->msg_iov = &u->tx_iov[i];
    m->msg_iovlen = 1;
#endif
}

static void hal_send_frame(void *ctx, const uint8_t *frame, uint32_t n) {
    tpfed_udp_peer *u = (tpfed_udp_peer *)ctx;
    if (!u->reply_to) return;   // nobody to answer
    uint32_t refused = u->tx.refused;
    tpfed_datagram_send_frame(&u->tx, frame, n);
    if (u->tx.refused != refused) u->stats.refused++;
    else u->stats.frames_out++;
    flush(u);
}

// ------------------------------------------------------------------------------ set-up

tpfed_udp_peer *tpfed_udp_peer_init(void *mem, size_t mem_bytes, int fd, uint32_t mtu,
                                    uint32_t max_frame, uint32_t slots,
                                    uint32_t reassembly_timeout_ms) {
    size_t need = tpfed_udp_peer_bytes(mtu, max_frame, slots);
    if (!mem || need == 0 || mem_bytes < need || fd < 0) return NULL;
    uint8_t *p = (uint8_t *)mem + ((8u - ((uintptr_t)mem & 7u)) & 7u);
    tpfed_udp_peer *u = (tpfed_udp_peer *)(void *)p;
    memset(u, 0, sizeof *u);
    p += align8(sizeof *u);
    u->rx_bufs = p;
    p += (size_t)RX_BATCH * RX_DGRAM;
    u->tx_bufs = p;
    p += (size_t)TX_BATCH * align8(mtu);
    u->frag_buf = p;
    p += align8(mtu);
    size_t rx_bytes = tpfed_datagram_rx_bytes(slots, max_frame);
    if (tpfed_datagram_rx_init(&u->rx, p, rx_bytes, slots, max_frame, reassembly_timeout_ms) != 0)
        return NULL;
    u->fd = fd;
    u->mtu = mtu;
    u->spin_us = TPFED_UDP_PEER_SPIN_US;
    u->hal.ctx = u;
    u->hal.send_frame = hal_send_frame;
    u->hal.millis = hal_millis;
    u->hal.random = tpfed_os_random;
    tpfed_datagram_tx_init(&u->tx, u->frag_buf, mtu, (uint16_t)(now_ms() * 2654435761u >> 16), emit, u);
    for (int i = 0; i < RX_BATCH; i++) {
        u->rx_iov[i].iov_base = u->rx_bufs + (size_t)i * RX_DGRAM;
        u->rx_iov[i].iov_len = RX_DGRAM;
    }
    return u;
}

const tpfed_hal *tpfed_udp_peer_hal(tpfed_udp_peer *u) { return &u->hal; }

static void snapshot(tpfed_udp_peer *u, int *state, uint16_t *session, uint32_t *assigned,
                     uint32_t *held) {
    *state = tpfed_peer_state(u->peer);
    *session = tpfed_peer_session(u->peer);
    *assigned = tpfed_peer_layers_assigned(u->peer);
    *held = tpfed_peer_layers_held(u->peer);
}

void tpfed_udp_peer_attach(tpfed_udp_peer *u, tpfed_peer *p) {
    u->peer = p;
    if (p) snapshot(u, &u->sig_state, &u->sig_session, &u->sig_assigned, &u->sig_held);
}

const tpfed_udp_peer_stats *tpfed_udp_peer_get_stats(const tpfed_udp_peer *u) { return &u->stats; }
const tpfed_datagram_stats *tpfed_udp_peer_rx_stats(const tpfed_udp_peer *u) { return &u->rx.stats; }

int tpfed_udp_peer_event_from(const tpfed_udp_peer *u, char *host, uint32_t cap) {
    if (!u->event || !host || cap == 0) return -1;
    host[0] = 0;
    const struct sockaddr_storage *a = &u->event_addr;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
        if (!inet_ntop(AF_INET, &v4->sin_addr, host, cap)) host[0] = 0;
        return ntohs(v4->sin_port);
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
        if (!inet_ntop(AF_INET6, &v6->sin6_addr, host, cap)) host[0] = 0;
        return ntohs(v6->sin6_port);
    }
    return -1;
}

// ------------------------------------------------------------------------------ serving

// A key telling senders apart for reassembly (FNV-1a over address and port).
static uint32_t source_key(const struct sockaddr_storage *a, socklen_t len) {
    const uint8_t *b = NULL;
    size_t n = 0;
    uint16_t port = 0;
    if (a->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
        b = (const uint8_t *)&v4->sin_addr;
        n = sizeof v4->sin_addr;
        port = v4->sin_port;
    } else if (a->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
        b = (const uint8_t *)&v6->sin6_addr;
        n = sizeof v6->sin6_addr;
        port = v6->sin6_port;
    }
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 16777619u;
    h = (h ^ (port & 0xFFu)) * 16777619u;
    h = (h ^ (port >> 8)) * 16777619u;
    return h;
}

// One received datagram: reassemble, hand a complete frame to the core, reply.
static void take_datagram(tpfed_udp_peer *u, const uint8_t *d, size_t n,
                          const struct sockaddr_storage *from, socklen_t from_len, int truncated) {
    u->stats.datagrams_in++;
    if (truncated || (from->ss_family != AF_INET && from->ss_family != AF_INET6)) {
        u->stats.dropped++;
        return;
    }
    uint32_t dropped = u->rx.stats.dropped;
    const uint8_t *frame = NULL;
    int32_t len = tpfed_datagram_rx_feed(&u->rx, d, n, source_key(from, from_len), now_ms(), &frame);
    if (u->rx.stats.dropped != dropped) u->stats.dropped++;
    if (len <= 0 || !frame) return;
    u->stats.frames_in++;
    u->reply_to = from;
    u->reply_len = from_len;
    tpfed_peer_handle_frame(u->peer, frame, (size_t)len);
    u->reply_to = NULL;
    int state;
    uint16_t session;
    uint32_t assigned, held;
    snapshot(u, &state, &session, &assigned, &held);
    if (state != u->sig_state || session != u->sig_session || assigned != u->sig_assigned ||
        held != u->sig_held) {
        u->sig_state = state;
        u->sig_session = session;
        u->sig_assigned = assigned;
        u->sig_held = held;
        if (!u->event) {
            u->event = 1;
            memcpy(&u->event_addr, from, from_len <= (socklen_t)sizeof u->event_addr ? from_len : sizeof u->event_addr);
            u->event_len = from_len;
        }
    }
}

// Receive what is queued (without waiting) and handle it. Returns frames handled, or -errno.
static int drain(tpfed_udp_peer *u) {
    int handled = 0;
    for (;;) {
        uint64_t before = u->stats.frames_in;
#ifdef HAVE_MMSG
        for (int i = 0; i < RX_BATCH; i++) {
            struct msghdr *m = &u->rx_msg[i].msg_hdr;
            memset(m, 0, sizeof *m);
            m->msg_name = &u->rx_addr[i];
            m->msg_namelen = sizeof u->rx_addr[i];
            m->msg_iov = &u->rx_iov[i];
            m->msg_iovlen = 1;
        }
        int k = recvmmsg(u->fd, u->rx_msg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return handled;
            if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) {
                u->stats.recv_errors++;   // an ICMP error for an earlier reply: not ours to fix
                continue;
            }
            u->stats.recv_errors++;
            return -errno;
        }
        for (int i = 0; i < k; i++) {
            const struct msghdr *m = &u->rx_msg[i].msg_hdr;
            take_datagram(u, (const uint8_t *)u->rx_iov[i].iov_base, u->rx_msg[i].msg_len,
                          &u->rx_addr[i], m->msg_namelen, (m->msg_flags & MSG_TRUNC) != 0);
        }
        handled += (int)(u->stats.frames_in - before);
        if (k < RX_BATCH) return handled;
#else
        socklen_t alen = sizeof u->rx_addr[0];
        ssize_t n = recvfrom(u->fd, u->rx_bufs, RX_DGRAM, MSG_DONTWAIT,
                             (struct sockaddr *)&u->rx_addr[0], &alen);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return handled;
            u->stats.recv_errors++;
            if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) continue;
            return -errno;
        }
        take_datagram(u, u->rx_bufs, (size_t)n, &u->rx_addr[0], alen, 0);
        handled += (int)(u->stats.frames_in - before);
#endif
        if (u->event) return handled;
    }
}

int tpfed_udp_peer_serve(tpfed_udp_peer *u, int timeout_ms) {
    if (!u || !u->peer) return -EINVAL;
    if (timeout_ms < 0) timeout_ms = 0;
    uint32_t start = now_ms();
    int handled = 0;
    u->event = 0;
    for (;;) {
        uint32_t spent = now_ms() - start;
        int wait = spent >= (uint32_t)timeout_ms ? 0 : timeout_ms - (int)spent;
        struct pollfd pfd = {u->fd, POLLIN, 0};
        int r = poll(&pfd, 1, wait);
        if (r < 0) {
            if (errno == EINTR) return handled;   // a signal for the caller
            return -errno;
        }
        if (r == 0) return handled;               // the time is up
        if (pfd.revents & (POLLERR | POLLNVAL) && !(pfd.revents & POLLIN)) {
            if (pfd.revents & POLLNVAL) return -EBADF;
            // A pending socket error (e.g. ICMP port unreachable for a reply): read it off.
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            u->stats.recv_errors++;
            continue;
        }
        int k = drain(u);
        if (k < 0) return k;
        handled += k;
        if (u->event) return handled;
        if (wait == 0) return handled;
        // The next activation of a run comes within microseconds: look for it a little while
        // (yielding the CPU to anyone runnable) before going back to sleep, so the wake-up of
        // a sleeping process is not on every stage's critical path.
        int64_t until = now_us() + u->spin_us;
        while (now_us() < until) {
            int j = drain(u);
            if (j < 0) return j;
            if (j > 0) {
                handled += j;
                if (u->event) return handled;
                until = now_us() + u->spin_us;
                continue;
            }
            sched_yield();
        }
    }
}

void tpfed_udp_peer_set_spin(tpfed_udp_peer *u, uint32_t spin_us) { u->spin_us = spin_us; }
