"""UDP transport: asyncio datagram endpoints carrying frames, fragmented above the MTU.

``UdpEndpoint`` is one bound socket (a peer's server side, or a coordinator talking to many
peers from one port): ``recv() -> (frame, addr)``, ``send(frame, addr)``, and ``link(addr)``
for a per-remote ``Link`` view. ``open_udp_link("udp://host:port")`` gives a Link to one peer
over its own socket. A frame that fits the MTU is one datagram, unchanged (zero overhead).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tpfed.errors import PeerError
from tpfed.protocol.framing import DatagramFramer

from .base import FrameQueue, Link, LinkClosed, LinkStats

Addr = tuple[str, int]


def parse_udp_uri(uri: str) -> Addr:
    """'udp://host:port' or 'host:port' -> (host, port); IPv6 hosts in brackets."""
    text = uri if "://" in uri else f"udp://{uri}"
    u = urlsplit(text)
    if u.scheme != "udp" or not u.hostname or u.port is None:
        raise PeerError(f"UDP address {uri!r} not understood: use udp://HOST:PORT")
    return u.hostname, u.port


def _key(addr: Any) -> Addr:
    return (addr[0], addr[1])


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: UdpEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.endpoint._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...) on a UDP socket: the datagram is simply lost.
        self.endpoint.stats.dropped += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint._on_lost(exc)


class UdpEndpoint:
    """A bound UDP socket that sends and receives whole frames."""

    def __init__(self, mtu: int, queue_size: int, reassembly_timeout: float) -> None:
        self.framer = DatagramFramer(mtu=mtu, timeout=reassembly_timeout)
        self.stats = LinkStats()
        self._queue: FrameQueue[tuple[bytes, Addr]] = FrameQueue(queue_size)
        self._links: dict[Addr, UdpLink] = {}
        self._queue_size = queue_size
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = False
        self.address: Addr = ("", 0)
        # When set, frames from remotes without a link go to this callback as they arrive
        # (a request/response server answers inside it) instead of the ``recv`` queue.
        self.handler: Callable[[bytes, Addr], None] | None = None

    @classmethod
    async def bind(cls, host: str = "0.0.0.0", port: int = 0, *, mtu: int = 1400,
                   queue_size: int = 1024, reassembly_timeout: float = 2.0) -> UdpEndpoint:
        """Bind host:port (port 0 picks a free one; see ``address``)."""
        ep = cls(mtu, queue_size, reassembly_timeout)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(ep), local_addr=(host, port))
        except OSError as e:
            raise PeerError(f"cannot bind UDP {host}:{port}: {e.strerror or e}") from None
        ep._transport = transport
        sock = transport.get_extra_info("socket")
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # room for bursts of fragments
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 21)
        ep.address = _key(transport.get_extra_info("sockname"))
        return ep

    # --- receiving -------------------------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: Any) -> None:
        key = _key(addr)
        self.stats.bytes_received += len(data)
        before = self.framer.stats.dropped + self.framer.stats.expired + self.framer.stats.evicted
        frame = self.framer.feed(data, key)
        after = self.framer.stats.dropped + self.framer.stats.expired + self.framer.stats.evicted
        if after != before:
            self.stats.dropped += after - before
        if frame is None:
            return
        self.stats.frames_received += 1
        link = self._links.get(key)
        if link is not None:
            link._deliver(frame)
        elif self.handler is not None:
            self.handler(frame, key)
        else:
            self._queue.put((frame, key))

    def _on_lost(self, exc: Exception | None) -> None:
        err = LinkClosed(f"UDP socket {self.address[0]}:{self.address[1]} closed"
                         + (f": {exc}" if exc else ""))
        self._closed = True
        self._queue.close(err)
        for link in self._links.values():
            link._queue.close(err)

    async def recv(self, timeout: float | None = None) -> tuple[bytes, Addr]:
        """Next frame from a remote without its own ``link``: (frame, (host, port))."""
        item = await self._queue.get(timeout)
        return item

    # --- sending ---------------------------------------------------------------------------
    def send_nowait(self, frame: bytes, addr: Addr) -> None:
        if self._closed or self._transport is None:
            raise LinkClosed(f"UDP socket {self.address[0]}:{self.address[1]} is closed")
        datagrams = self.framer.split(frame)
        t = self._transport
        for d in datagrams:
            t.sendto(d, addr)
            self.stats.bytes_sent += len(d)
        self.stats.frames_sent += 1

    async def send(self, frame: bytes, addr: Addr) -> None:
        self.send_nowait(frame, addr)

    def fileno(self) -> int:
        """The socket's descriptor (the coordinator's C stage exchange uses it directly)."""
        if self._transport is None:
            raise LinkClosed("UDP endpoint is not bound")
        return self._transport.get_extra_info("socket").fileno()

    # --- per-remote links --------------------------------------------------------------------
    async def open_link(self, uri: str, *, name: str | None = None) -> UdpLink:
        """A Link over this endpoint to the peer at ``udp://host:port`` (resolved here)."""
        host, port = parse_udp_uri(uri)
        family = self._transport.get_extra_info("socket").family if self._transport else socket.AF_INET
        addr = await resolve_udp(host, port, family)
        link = self.link(addr, name=name or f"{host}:{port}")
        link.uri = f"udp://{host}:{port}"
        return link

    def link(self, addr: Addr, *, name: str | None = None) -> UdpLink:
        """A Link to ``addr`` over this socket; frames from addr go to it from now on."""
        key = _key(addr)
        if key in self._links:
            raise PeerError(f"a link to {key[0]}:{key[1]} already exists on this endpoint")
        link = UdpLink(self, key, name=name or f"{key[0]}:{key[1]}", owns_endpoint=False)
        self._links[key] = link
        return link

    def _unlink(self, key: Addr) -> None:
        self._links.pop(key, None)

    async def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()
            await asyncio.sleep(0)  # let connection_lost run
        self._closed = True
        self._on_lost(None)

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class UdpLink(Link):
    """Frames to and from one remote address (over an endpoint it may own)."""

    def __init__(self, endpoint: UdpEndpoint, addr: Addr, *, name: str, owns_endpoint: bool) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.name = name
        self.uri = f"udp://{addr[0]}:{addr[1]}"
        self._owns = owns_endpoint
        self._queue: FrameQueue[bytes] = FrameQueue(endpoint._queue_size)
        self._stats = LinkStats()

    def _deliver(self, frame: bytes) -> None:
        self._stats.frames_received += 1
        self._stats.bytes_received += len(frame)
        hook = self.on_frame
        if hook is None or not hook(frame):
            self._queue.put(frame)

    async def send(self, frame: bytes) -> None:
        self.endpoint.send_nowait(frame, self.addr)
        self._stats.frames_sent += 1
        self._stats.bytes_sent += len(frame)

    async def recv(self, timeout: float | None = None) -> bytes:
        return await self._queue.get(timeout)

    async def close(self) -> None:
        self.endpoint._unlink(self.addr)
        self._queue.close(LinkClosed(f"link {self.name} closed"))
        if self._owns:
            await self.endpoint.close()

    @property
    def stats(self) -> LinkStats:
        """Frame counts of this link; byte counts are frame bytes (``endpoint.stats`` has the
        wire bytes, fragment headers included); ``dropped`` is the endpoint's."""
        s = self._stats
        return LinkStats(s.bytes_sent, s.bytes_received, s.frames_sent, s.frames_received,
                         self.endpoint.stats.dropped + self._queue.overflows)


async def resolve_udp(host: str, port: int, family: int | None = None) -> Addr:
    """(numeric host, port) of ``host``, of the given address family if there is one."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise PeerError(f"cannot resolve {host}: {e}") from None
    if family is not None:
        infos = [i for i in infos if i[0] == family] or infos
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # prefer IPv4
    return _key(infos[0][4])


async def open_udp_link(uri: str, *, name: str | None = None, mtu: int = 1400,
                        local_host: str = "0.0.0.0", queue_size: int = 1024) -> UdpLink:
    """A Link to the peer at ``udp://host:port`` over a fresh socket (closed with the link)."""
    host, port = parse_udp_uri(uri)
    addr = await resolve_udp(host, port)
    if ":" in addr[0] and local_host == "0.0.0.0":
        local_host = "::"
    ep = await UdpEndpoint.bind(local_host, 0, mtu=mtu, queue_size=queue_size)
    link = UdpLink(ep, addr, name=name or f"{host}:{port}", owns_endpoint=True)
    ep._links[link.addr] = link
    link.uri = f"udp://{host}:{port}"
    return link
