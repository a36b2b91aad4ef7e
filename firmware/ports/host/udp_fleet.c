// The coordinator's stage exchange over UDP (see tpfed_udp_fleet.h). POSIX (Linux: sendmmsg
// and recvmmsg; elsewhere one sendto/recvfrom per datagram).
#define _GNU_SOURCE 1
#include "tpfed_udp_fleet.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "tpfed_mem_peer.h"
#include "tpfed_proto.h"

#define BATCH 16              // datagrams per receive call
#define DGRAM_MAX 65536       // the largest UDP payload, rounded up

struct fleet_local {
    tpfed_mem_peer *mem;      // its HAL (the outbox its replies go to), or NULL: a UDP peer
    tpfed_peer *core;
    int pending;              // handed a frame by the last send_all, replies not taken yet
};

struct tpfed_udp_fleet {
    int fd;
    int max_peers;
    int n_peers;
    uint32_t stale;           // valid PARTIALs of another stage or seq, dropped
    uint32_t auth_dropped;    // datagrams from peers that did not open in their session
    uint32_t spin_us;         // look for partials this long (yielding) before sleeping in poll
    struct sockaddr_storage *addrs;
    socklen_t *addr_lens;
    tpfed_auth_session **auth;  // per peer, or NULL
    uint32_t *unreachable;    // per peer: ICMP errors for datagrams sent to it
    struct fleet_local *local;  // per peer: an in-process peer core (or none)
    uint8_t *rx;              // BATCH x DGRAM_MAX
    uint8_t *tx;              // BATCH x DGRAM_MAX: per-peer sealed copies
};

static size_t align8(size_t n) { return (n + 7u) & ~(size_t)7u; }

size_t tpfed_udp_fleet_bytes(int max_peers) {
    if (max_peers < 1) max_peers = 1;
    return align8(sizeof(tpfed_udp_fleet)) +
           align8(sizeof(struct sockaddr_storage) * (size_t)max_peers) +
           align8(sizeof(socklen_t) * (size_t)max_peers) +
           align8(sizeof(tpfed_auth_session *) * (size_t)max_peers) +
           align8(sizeof(uint32_t) * (size_t)max_peers) +
           align8(sizeof(struct fleet_local) * (size_t)max_peers) + 2u * (size_t)BATCH * DGRAM_MAX;
}

tpfed_udp_fleet *tpfed_udp_fleet_init(void *mem, size_t mem_bytes, int fd, int max_peers) {
    if (max_peers < 1 || mem == NULL || mem_bytes < tpfed_udp_fleet_bytes(max_peers)) return NULL;
    uint8_t *p = (uint8_t *)mem;
    tpfed_udp_fleet *f = (tpfed_udp_fleet *)p;
    memset(f, 0, sizeof *f);
    p += align8(sizeof *f);
    f->addrs = (struct sockaddr_storage *)p;
    p += align8(sizeof(struct sockaddr_storage) * (size_t)max_peers);
    f->addr_lens = (socklen_t *)p;
    p += align8(sizeof(socklen_t) * (size_t)max_peers);
    f->auth = (tpfed_auth_session **)p;
    for (int i = 0; i < max_peers; i++) f->auth[i] = NULL;
    p += align8(sizeof(tpfed_auth_session *) * (size_t)max_peers);
    f->unreachable = (uint32_t *)p;
    for (int i = 0; i < max_peers; i++) f->unreachable[i] = 0;
    p += align8(sizeof(uint32_t) * (size_t)max_peers);
    f->local = (struct fleet_local *)p;
    memset(f->local, 0, sizeof(struct fleet_local) * (size_t)max_peers);
    p += align8(sizeof(struct fleet_local) * (size_t)max_peers);
    f->rx = p;
    p += (size_t)BATCH * DGRAM_MAX;
    f->tx = p;
    f->fd = fd;
    f->max_peers = max_peers;
    f->spin_us = TPFED_UDP_FLEET_SPIN_US;
#ifdef __linux__
    if (fd < 0) return f;   // in-process peers only
    // ICMP errors go to the socket's error queue with the address they concern, so a peer
    // whose process is gone is known at once rather than at its deadline.
    int on = 1;
    setsockopt(fd, IPPROTO_IP, IP_RECVERR, &on, sizeof on);
    setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &on, sizeof on);
#endif
    return f;
}

int tpfed_udp_fleet_add_local(tpfed_udp_fleet *f, tpfed_mem_peer *mem, tpfed_peer *core) {
    if (f->n_peers >= f->max_peers || mem == NULL || core == NULL) return -1;
    memset(&f->addrs[f->n_peers], 0, sizeof f->addrs[0]);   // matches no sender
    f->addr_lens[f->n_peers] = 0;
    f->local[f->n_peers].mem = mem;
    f->local[f->n_peers].core = core;
    return f->n_peers++;
}

int tpfed_udp_fleet_add(tpfed_udp_fleet *f, const char *host, int port) {
    if (f->n_peers >= f->max_peers || port <= 0 || port > 65535) return -1;
    struct sockaddr_storage *ss = &f->addrs[f->n_peers];
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        f->addr_lens[f->n_peers] = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        f->addr_lens[f->n_peers] = sizeof *v6;
    } else {
        return -1;
    }
    return f->n_peers++;
}

void tpfed_udp_fleet_set_auth(tpfed_udp_fleet *f, int i, tpfed_auth_session *s) {
    if (i >= 0 && i < f->n_peers) f->auth[i] = s;
}

uint32_t tpfed_udp_fleet_auth_dropped(const tpfed_udp_fleet *f) { return f->auth_dropped; }

void tpfed_udp_fleet_set_spin(tpfed_udp_fleet *f, uint32_t spin_us) { f->spin_us = spin_us; }

uint32_t tpfed_udp_fleet_unreachable(const tpfed_udp_fleet *f, int i) {
    return i >= 0 && i < f->n_peers ? f->unreachable[i] : 0;
}

static int peer_of(const tpfed_udp_fleet *f, const struct sockaddr_storage *from);

// Read the socket's error queue: each ICMP error names the address a datagram was sent to.
// Returns how many of them concern fleet peers.
static int drain_errors(tpfed_udp_fleet *f) {
    int found = 0;
#ifdef __linux__
    for (;;) {
        struct sockaddr_storage to;
        uint8_t data[64], control[512];
        struct iovec iov = {data, sizeof data};
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_name = &to;
        m.msg_namelen = sizeof to;
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = control;
        m.msg_controllen = sizeof control;
        if (recvmsg(f->fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) break;
        int p = peer_of(f, &to);
        if (p >= 0) {
            f->unreachable[p]++;
            found++;
        }
    }
#else
    (void)f;
#endif
    return found;
}

// Index of the fleet peer at this address, or -1. An IPv4 peer reached over an IPv6 socket
// answers from its v4-mapped address; both spellings match.
static int peer_of(const tpfed_udp_fleet *f, const struct sockaddr_storage *from) {
    for (int i = 0; i < f->n_peers; i++) {
        const struct sockaddr_storage *a = &f->addrs[i];
        if (a->ss_family == AF_INET && from->ss_family == AF_INET) {
            const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)from;
            if (x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr) return i;
        } else if (a->ss_family == AF_INET6 && from->ss_family == AF_INET6) {
            const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)from;
            if (x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16)) return i;
        } else if (a->ss_family == AF_INET && from->ss_family == AF_INET6) {
            const struct sockaddr_in *x = (const struct sockaddr_in *)a;
            const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)from;
            static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
            if (x->sin_port == y->sin6_port && !memcmp(y->sin6_addr.s6_addr, mapped, 12) &&
                !memcmp(y->sin6_addr.s6_addr + 12, &x->sin_addr, 4))
                return i;
        }
    }
    return -1;
}

int tpfed_udp_fleet_check_errors(tpfed_udp_fleet *f) { return drain_errors(f); }

int tpfed_udp_send_all(tpfed_udp_fleet *f, const uint8_t *frame, uint32_t len, const int *peers,
                       int n) {
    if (len > DGRAM_MAX) return -EMSGSIZE;
    int sealed = len > 3 && (frame[3] & TPFED_FLAG_AUTH);
    int sent = 0, at = 0;
#ifdef __linux__
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
#endif
    while (at < n) {
        int k = 0;
        for (; k < BATCH && at < n; at++) {
            int i = peers[at];
            if (i < 0 || i >= f->n_peers) return -EINVAL;
            if (f->local[i].mem != NULL) continue;   // in-process: after the others are sent to
            const uint8_t *data = frame;
            if (sealed && f->auth[i] != NULL) {   // this peer's copy, under its session
                uint8_t *copy = f->tx + (size_t)k * DGRAM_MAX;
                memcpy(copy, frame, len);
                if (tpfed_auth_session_stamp(f->auth[i], copy, len) != TPFED_OK) return -EINVAL;
                data = copy;
            }
#ifdef __linux__
            iov[k].iov_base = (void *)data;
            iov[k].iov_len = len;
            memset(&msgs[k], 0, sizeof msgs[k]);
            msgs[k].msg_hdr.msg_name = &f->addrs[i];
            msgs[k].msg_hdr.msg_namelen = f->addr_lens[i];
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
#else
            if (sendto(f->fd, data, len, 0, (const struct sockaddr *)&f->addrs[i], f->addr_lens[i]) < 0)
                return -errno;
#endif
            k++;
        }
#ifdef __linux__
        int done = 0;
        while (done < k) {
            int r = sendmmsg(f->fd, msgs + done, (unsigned)(k - done), 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {   // a full send buffer: wait for room
                    struct pollfd pfd = {f->fd, POLLOUT, 0};
                    poll(&pfd, 1, 10);
                    continue;
                }
                return -errno;
            }
            done += r;
        }
#endif
        sent += k;
    }
    // The in-process peers compute while the others do: their replies wait in their outboxes
    // for the gather.
    for (int j = 0; j < n; j++) {
        int i = peers[j];
        struct fleet_local *l = &f->local[i];
        if (l->mem == NULL) continue;
        uint8_t *copy = f->tx;
        memcpy(copy, frame, len);
        if (sealed && f->auth[i] != NULL && tpfed_auth_session_stamp(f->auth[i], copy, len) != TPFED_OK)
            return -EINVAL;
        if (!l->pending) tpfed_mem_peer_clear(l->mem);
        tpfed_peer_handle_frame(l->core, copy, len);
        l->pending = 1;
        sent++;
    }
    return sent;
}

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

// Keep a datagram for the Python path; 0 if the side buffer has no room for it.
static int side_put(tpfed_udp_side *side, const uint8_t *data, uint32_t len, int peer) {
    uint64_t need = 8u + (uint64_t)len;
    if (side == NULL || side->used + need > side->cap) return 0;
    uint8_t *p = side->buf + side->used;
    tpfed_wr_u32(p, len);
    tpfed_wr_u32(p + 4, (uint32_t)peer);
    memcpy(p + 8, data, len);
    side->used += (uint32_t)need;
    side->count++;
    return 1;
}

// 1 if the frame (decoded: h, NULL if it is not a valid frame) is the awaited PARTIAL (its
// values into row), 2 if it is a valid PARTIAL of another stage or sequence, or a duplicate
// when row is NULL (stale), 0 otherwise.
static int take_partial(const tpfed_header_t *h, const uint8_t *pl, uint16_t session,
                        uint16_t seq, uint16_t layer, uint8_t stage, uint16_t pos, int dim,
                        float *row) {
    if (h == NULL || h->type != TPFED_MSG_PARTIAL) return 0;
    tpfed_partial_t m;
    if (tpfed_partial_decode(pl, h->length, &m) != TPFED_OK) return 0;
    if (h->session != session || h->seq != seq || m.layer != layer || m.stage != stage || m.pos != pos)
        return 2;
    if (m.encoding != TPFED_ENC_F32 || m.n != dim) return 0;
    if (row == NULL) return 2;   // a duplicate of one already taken
    for (int j = 0; j < dim; j++) row[j] = tpfed_rd_f32(m.data + 4 * j);
    return 1;
}

#define MAX_GROUPS 1024

// What one gather is waiting for, and what it has so far.
typedef struct {
    const int *peers;
    int n;
    const int *group_of;
    uint16_t session, seq, layer, pos;
    uint8_t stage;
    int dim;
    float *partials;
    uint32_t *got;
    uint8_t *served;
    int have;
    int stop;
    tpfed_udp_side *side;
} gather_state;

// One received frame (datagram, or a reply of an in-process peer) from fleet peer p (-1:
// unknown sender).
static void take_datagram(tpfed_udp_fleet *f, gather_state *g, const uint8_t *d, size_t len, int p) {
    tpfed_header_t hh;
    const uint8_t *pl = NULL;
    const tpfed_header_t *h =
        tpfed_frame_decode(d, len, TPFED_MAX_PAYLOAD, &hh, &pl) == TPFED_OK ? &hh : NULL;
    if (p >= 0 && f->auth[p] != NULL) {   // only frames sealed in its session count
        if (h == NULL || tpfed_auth_session_open(f->auth[p], d, len) != TPFED_OK) {
            if (len < 1 || d[0] != TPFED_FRAG_MAGIC) {   // fragments: the Python path
                f->auth_dropped++;
                return;
            }
        }
    }
    int slot = -1;
    for (int i = 0; p >= 0 && i < g->n; i++)
        if (g->peers[i] == p) slot = i;
    int group = slot < 0 ? -1 : g->group_of ? g->group_of[slot] : slot;
    if (slot >= 0 && g->got[slot] == 0 && !g->served[group]) {
        int t = take_partial(h, pl, g->session, g->seq, g->layer, g->stage, g->pos, g->dim,
                             g->partials + (size_t)slot * (size_t)g->dim);
        if (t == 1) {
            g->got[slot] = (uint32_t)len;
            g->served[group] = 1;
            g->have++;
            return;
        }
        if (t == 2) {
            f->stale++;
            return;
        }
    } else if (slot >= 0) {
        // a duplicate of a partial already here, a replica's partial for a group already
        // served, or a late one of an earlier stage
        if (take_partial(h, pl, g->session, g->seq, g->layer, g->stage, g->pos, g->dim, NULL) != 0) {
            f->stale++;
            return;
        }
    }
    if (!side_put(g->side, d, (uint32_t)len, p)) g->stop = 1;
    if (slot >= 0 && !g->served[group]) g->stop = 1;   // the Python path for it (an ERROR, a fragment)
}

// Replies the in-process peers gave to the last send_all, taken like received datagrams.
static void take_local(tpfed_udp_fleet *f, gather_state *g) {
    for (int i = 0; i < g->n; i++) {
        int p = g->peers[i];
        tpfed_mem_peer *m = f->local[p].mem;
        if (m == NULL || !f->local[p].pending) continue;
        f->local[p].pending = 0;
        uint32_t at = 0;
        while (at + 4 <= m->used) {
            uint32_t len = tpfed_rd_u32(m->buf + at);
            if (at + 4 + len > m->used) break;
            take_datagram(f, g, m->buf + at + 4, len, p);
            at += 4 + len;
        }
        tpfed_mem_peer_clear(m);
    }
}

int tpfed_udp_gather(tpfed_udp_fleet *f, const int *peers, int n, const int *group_of,
                     int n_groups, uint16_t session, uint16_t seq, uint16_t layer, uint8_t stage,
                     uint16_t pos, int dim, float *partials, uint32_t *got, int timeout_ms,
                     tpfed_udp_side *side) {
    if (group_of == NULL) n_groups = n;
    if (n_groups < 0 || n_groups > MAX_GROUPS) return -EINVAL;
    uint8_t served[MAX_GROUPS];
    memset(served, 0, (size_t)n_groups);
    gather_state g = {peers, n, group_of, session, seq, layer, pos, stage, dim, partials, got,
                      served, 0, 0, side};
    for (int i = 0; i < n; i++) {
        int gi = group_of ? group_of[i] : i;
        if (gi < 0 || gi >= n_groups || peers[i] < 0 || peers[i] >= f->n_peers) return -EINVAL;
        if (got[i] && !served[gi]) {
            served[gi] = 1;
            g.have++;
        }
    }
    take_local(f, &g);
    int64_t deadline = now_us() + (int64_t)timeout_ms * 1000;
    int64_t spin_until = now_us() + f->spin_us;
    struct sockaddr_storage from[BATCH];
#ifdef __linux__
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
#endif
    while (g.have < n_groups && !g.stop && f->fd >= 0) {
#ifdef __linux__
        for (int k = 0; k < BATCH; k++) {
            iov[k].iov_base = f->rx + (size_t)k * DGRAM_MAX;
            iov[k].iov_len = DGRAM_MAX;
            memset(&msgs[k], 0, sizeof msgs[k]);
            msgs[k].msg_hdr.msg_name = &from[k];
            msgs[k].msg_hdr.msg_namelen = sizeof from[k];
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        int r = recvmmsg(f->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
#else
        socklen_t fl = sizeof from[0];
        ssize_t one = recvfrom(f->fd, f->rx, DGRAM_MAX, MSG_DONTWAIT, (struct sockaddr *)&from[0], &fl);
        int r = one < 0 ? -1 : 1;
#endif
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                if (errno == ECONNREFUSED || errno == EHOSTUNREACH || errno == ENETUNREACH) {
                    // an ICMP error for a datagram sent earlier: whose?
                    if (drain_errors(f)) {
                        for (int i = 0; i < n; i++)
                            if (f->unreachable[peers[i]] && !got[i]) g.stop = 1;
                    }
                    continue;
                }
                return -errno;
            }
            int64_t now = now_us();
            int64_t left = deadline - now;
            if (left <= 0) break;
            if (now < spin_until) {   // the partials come within microseconds: look again
                sched_yield();
                continue;
            }
            struct pollfd pfd = {f->fd, POLLIN, 0};
            int ms = (int)((left + 999) / 1000);
            if (poll(&pfd, 1, ms) < 0 && errno != EINTR) return -errno;
            if ((pfd.revents & POLLERR) && drain_errors(f)) {
                for (int i = 0; i < n; i++)
                    if (f->unreachable[peers[i]] && !got[i]) g.stop = 1;
            }
            continue;
        }
        for (int k = 0; k < r; k++) {
#ifdef __linux__
            const uint8_t *d = f->rx + (size_t)k * DGRAM_MAX;
            size_t len = msgs[k].msg_len;
#else
            const uint8_t *d = f->rx;
            size_t len = (size_t)one;
#endif
            take_datagram(f, &g, d, len, peer_of(f, &from[k]));
        }
        spin_until = now_us() + f->spin_us;
    }
    return g.have;
}

int tpfed_udp_stage(tpfed_udp_fleet *f, const int *peers, int n, const int *group_of,
                    int n_groups, uint16_t session, uint16_t seq, uint16_t layer, uint8_t stage,
                    uint16_t pos, const int8_t *qs, const uint16_t *d, int dim, float *partials,
                    uint32_t *got, int *chosen, int timeout_ms, tpfed_udp_side *side, float *out,
                    uint8_t *frame_out, uint32_t cap, uint32_t *frame_len) {
    if (dim <= 0 || dim > 0xFFFF || n <= 0) return -EINVAL;
    int sealed = 0;
    for (int i = 0; i < n; i++) sealed |= f->auth[peers[i]] != NULL;
    uint32_t nb = ((uint32_t)dim + TPFED_Q8_BLOCK - 1u) / TPFED_Q8_BLOCK;
    uint8_t scales[2 * 2048];
    if (nb > 2048) return -EINVAL;
    for (uint32_t b = 0; b < nb; b++) tpfed_wr_u16(scales + 2 * b, d[b]);
    tpfed_activation_t a = {layer, stage, pos, (uint16_t)dim, scales, qs};
    tpfed_header_t h;
    memset(&h, 0, sizeof h);
    h.type = TPFED_MSG_ACTIVATION;
    h.flags = sealed ? TPFED_FLAG_AUTH : 0;
    h.src = 0;
    h.dst = TPFED_BROADCAST;
    h.seq = seq;
    h.session = session;
    size_t plen = 0, flen = 0;
    if (tpfed_activation_encode(frame_out + TPFED_HEADER_SIZE, cap - TPFED_HEADER_SIZE, &a, &plen) != TPFED_OK)
        return -EMSGSIZE;
    int rc = sealed ? tpfed_frame_begin(frame_out, cap, &h, plen, &flen)
                    : tpfed_frame_finish(frame_out, cap, &h, plen, &flen);
    if (rc != TPFED_OK) return -EMSGSIZE;
    *frame_len = (uint32_t)flen;
    for (int i = 0; i < n; i++) got[i] = 0;
    int sent = tpfed_udp_send_all(f, frame_out, (uint32_t)flen, peers, n);
    if (sent < 0) return sent;
    int have = tpfed_udp_gather(f, peers, n, group_of, n_groups, session, seq, layer, stage, pos,
                                dim, partials, got, timeout_ms, side);
    if (have < 0) return have;
    for (int g = 0; g < n_groups; g++) chosen[g] = -1;
    for (int i = 0; i < n; i++) {
        int g = group_of ? group_of[i] : i;
        if (got[i] && chosen[g] < 0) chosen[g] = i;
    }
    if (have == n_groups) tpfed_sum_rows_f32(out, partials, chosen, n_groups, dim);
    return have;
}

void tpfed_sum_rows_f32(float *out, const float *rows, const int *which, int n, int dim) {
    if (n <= 0) {
        for (int j = 0; j < dim; j++) out[j] = 0.0f;
        return;
    }
    const float *r0 = rows + (size_t)(which ? which[0] : 0) * (size_t)dim;
    for (int j = 0; j < dim; j++) out[j] = r0[j];
    for (int i = 1; i < n; i++) {
        const float *r = rows + (size_t)(which ? which[i] : i) * (size_t)dim;
        for (int j = 0; j < dim; j++) out[j] += r[j];
    }
}
