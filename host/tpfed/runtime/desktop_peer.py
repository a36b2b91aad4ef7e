"""The desktop peer: the C peer core served on UDP by the C port (firmware/ports/host/udp_peer.c).

Python sets things up (device info, config, the arena, the bound socket) and then only calls
``tpfed_udp_peer_serve`` in a loop: receiving, reassembly, the protocol, the compute and the
replies all happen in C with the GIL released, one receive and one send per ACTIVATION. Between
calls Python handles signals and logs what changed: a new session, layers held, ready.
"""

from __future__ import annotations

import io
import signal
import socket
import sys
from dataclasses import dataclass
from typing import TextIO

from tpfed.compute._native import ffi, lib
from tpfed.errors import TpfedError
from tpfed.runtime.peer_core import (
    MAX_FRAME,
    DeviceInfo,
    PeerConfig,
    PeerCore,
    arena_min_bytes,
    available_memory_bytes,
)

REASSEMBLY_SLOTS = 8          # frames in reassembly at once (several coordinators may push)
REASSEMBLY_TIMEOUT_MS = 2000  # an incomplete frame older than this is dropped
SERVE_SLICE_MS = 200          # how long one serve call may run before Python gets control


def mtu_range(max_frame: int = MAX_FRAME) -> tuple[int, int]:
    """Smallest and largest UDP payload size a peer taking frames of max_frame bytes can use."""
    return int(lib.tpfed_udp_peer_min_mtu(max_frame)), int(lib.TPFED_UDP_MAX_DATAGRAM)


def arena_overhead(max_frame: int = MAX_FRAME) -> int:
    """Bytes the core keeps for itself beyond what it offers (HELLO arena_kb): its state, the
    transmit frame and the compute reserve."""
    return arena_min_bytes(max_frame) + lib.TPFED_PEER_WORK_RESERVE


def check_options(memory_bytes: int | None, mtu: int) -> int:
    """The arena to map so that the peer offers memory_bytes (what is free, less the core's
    own part, if None); TpfedError if the options cannot make a peer."""
    lo, hi = mtu_range()
    if not lo <= mtu <= hi:
        raise TpfedError(f"--mtu {mtu} is outside {lo}..{hi} (a {MAX_FRAME}-byte frame must fit "
                         f"{lib.TPFED_DATAGRAM_MAX_FRAGMENTS} fragments)")
    least = arena_min_bytes()
    if memory_bytes is None:
        free = available_memory_bytes()
        if free < arena_overhead() + least:
            raise TpfedError(f"only {free} bytes of memory are free; a peer needs "
                             f"{arena_overhead() + least}")
        memory_bytes = free - arena_overhead()
    elif memory_bytes < least:
        raise TpfedError(f"--memory-mb {memory_bytes / 2**20:g} is below the peer's minimum of "
                         f"{least / 2**20:.3f} MiB")
    return memory_bytes + arena_overhead()


def bind_udp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise TpfedError(f"cannot listen on udp://{host}:{port}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        for size in (8 << 20, 1 << 20):  # room for a window of WEIGHTS chunks
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                break
            except OSError:
                continue
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise TpfedError(f"cannot listen on udp://{host}:{port}: {exc.strerror}") from None
    return sock


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class _Seen:
    state: int = lib.TPFED_PEER_IDLE
    session: int = 0
    assigned: int = 0
    held: int = 0


class UdpPeer:
    """A peer core on a bound UDP socket. ``serve(stop)`` runs until ``stop()`` is true."""

    def __init__(self, sock: socket.socket, info: DeviceInfo, arena_bytes: int, mtu: int,
                 config: PeerConfig | None = None, log: TextIO = sys.stderr,
                 spin_us: int = lib.TPFED_UDP_PEER_SPIN_US) -> None:
        self.sock = sock
        self.log = log
        config = config or PeerConfig()
        size = lib.tpfed_udp_peer_bytes(mtu, config.max_frame, REASSEMBLY_SLOTS)
        if size == 0:
            raise TpfedError(f"MTU {mtu} does not suit frames of {config.max_frame} bytes")
        self._port_mem = ffi.new("uint8_t[]", size)
        self._port = lib.tpfed_udp_peer_init(self._port_mem, size, sock.fileno(), mtu,
                                             config.max_frame, REASSEMBLY_SLOTS,
                                             REASSEMBLY_TIMEOUT_MS)
        if self._port == ffi.NULL:
            raise TpfedError("cannot set up the UDP port of the peer")
        self.core = PeerCore(lib.tpfed_udp_peer_hal(self._port), info, arena_bytes, config)
        lib.tpfed_udp_peer_attach(self._port, self.core.ptr)
        lib.tpfed_udp_peer_set_spin(self._port, max(0, int(spin_us)))
        self._seen = _Seen()
        self._host = ffi.new("char[]", 64)

    @property
    def name(self) -> str:
        return self.core.info.board

    def stats(self) -> dict[str, int]:
        s = lib.tpfed_udp_peer_get_stats(self._port)
        out = {k: int(getattr(s, k)) for k in ("datagrams_in", "datagrams_out", "dropped",
                                                 "refused", "send_errors", "recv_errors")}
        return {**self.core.stats(), **out}

    def serve_once(self, timeout_ms: int = SERVE_SLICE_MS) -> int:
        """Serve for up to timeout_ms (less if the core's state changed); returns frames handled."""
        n = lib.tpfed_udp_peer_serve(self._port, timeout_ms)
        if n < 0:
            raise TpfedError(f"peer {self.name}: UDP socket error {-n}")
        self._report()
        return n

    def serve(self, stop) -> None:
        while not stop():
            self.serve_once()

    def _say(self, text: str) -> None:
        print(f"tpfed peer {self.name}: {text}", file=self.log, flush=True)

    def _report(self) -> None:
        c, seen = self.core, self._seen
        now = _Seen(c.state, c.session, c.layers_assigned, c.layers_held)
        if now == seen:
            return
        if now.state != lib.TPFED_PEER_IDLE and (now.session != seen.session or
                                                 seen.state == lib.TPFED_PEER_IDLE):
            port = lib.tpfed_udp_peer_event_from(self._port, self._host, 64)
            who = f" from {ffi.string(self._host).decode()}:{port}" if port >= 0 else ""
            self._say(f"session {now.session}{who}: {now.assigned} layers assigned, "
                      f"{_mib(c.arena_used)} of the arena laid out")
        elif now.state == lib.TPFED_PEER_IDLE and seen.state != lib.TPFED_PEER_IDLE:
            self._say(f"session {seen.session} ended")
        if now.state == lib.TPFED_PEER_READY and seen.state != lib.TPFED_PEER_READY:
            self._say(f"holding {now.held} layers, {_mib(c.arena_used)} of the arena used; ready")
        elif now.state == lib.TPFED_PEER_ASSIGNED and now.held < seen.held:
            self._say(f"holding {now.held} of {now.assigned} layers: a share is being replaced")
        self._seen = now


def run_peer(listen_host: str, listen_port: int, name: str, memory_bytes: int | None, mtu: int,
             verbose: bool = False, on_listening=None, *, key: bytes, quiet: bool = False,
             spin_us: int = lib.TPFED_UDP_PEER_SPIN_US) -> None:
    """``tpfed peer``: bind, announce ``listening on udp://HOST:PORT`` on stdout (the line
    :mod:`tpfed.runtime.localpeers` reads), serve until SIGTERM/SIGINT."""
    arena = check_options(memory_bytes, mtu)
    sock = bind_udp(listen_host, listen_port)
    stopping = []

    def on_signal(signum, frame) -> None:
        stopping.append(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        peer = UdpPeer(sock, DeviceInfo(board=name, port="host-udp"), arena, mtu,
                       PeerConfig(key=key), log=io.StringIO() if quiet else sys.stderr,
                       spin_us=spin_us)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"tpfed peer {name} listening on udp://{shown}:{port} "
              f"({peer.core.int8_macs / 1e9:.2f} GMAC/s int8, "
              f"{(arena - arena_overhead()) / 2**20:.0f} MiB offered)",
              flush=True)
        # hook (tpfed peer --bus): called with (host, port, info) once listening; may return a
        # callable run when the peer stops
        on_stop = on_listening(host, port, {"name": name, "int8_macs": peer.core.int8_macs,
                                            "memory_bytes": arena - arena_overhead(),
                                            "device_class": "desktop", "mtu": mtu}) \
            if on_listening else None
        try:
            peer.serve(lambda: bool(stopping))
        finally:
            if on_stop is not None:
                on_stop()
        if verbose:
            s = peer.stats()
            print(f"tpfed peer {name}: {s['frames_in']} frames in, {s['activations']} activations, "
                  f"{s['dropped']} frames dropped, {s['errors_sent']} errors sent, "
                  f"{s['refused']} replies too large", file=sys.stderr)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        sock.close()


__all__ = ["MAX_FRAME", "UdpPeer", "arena_overhead", "bind_udp", "check_options", "mtu_range", "run_peer"]
