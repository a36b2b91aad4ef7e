"""Transports carrying whole frames: UDP (datagrams, fragmentation) and serial (COBS).

    link = await open_udp_link("udp://127.0.0.1:7000")      # or open_serial_link("/dev/ttyUSB0")
    await link.send(frame_bytes)
    reply = await link.recv(timeout=0.5)                     # TimeoutError / LinkClosed
    await link.close()

A peer's server side: ``ep = await UdpEndpoint.bind("0.0.0.0", 7000)``, then
``frame, addr = await ep.recv()`` and ``await ep.send(reply, addr)``.
"""

from .base import FrameQueue, Link, LinkClosed, LinkStats
from .serial import SerialLink, open_serial_link, parse_serial_url
from .udp import UdpEndpoint, UdpLink, open_udp_link, parse_udp_uri, resolve_udp

__all__ = [
    "FrameQueue", "Link", "LinkClosed", "LinkStats", "SerialLink", "UdpEndpoint", "UdpLink",
    "open_serial_link", "open_udp_link", "parse_serial_url", "parse_udp_uri", "resolve_udp",
]
