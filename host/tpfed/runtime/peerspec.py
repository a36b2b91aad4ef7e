"""Parsing of ``--peers`` specifications.

A spec is a comma list of items:

- ``local:N``: start N desktop peer processes on loopback UDP (stopped afterwards);
- ``emu:N`` or ``emu:N@ENV``: start N emulated boards (QEMU running the firmware of PlatformIO
  env ENV, ``musca-b1`` by default, or ``lm3s6965evb``) reached over their UART;
- ``udp://HOST:PORT``: a running peer (``tpfed peer``);
- ``serial:///dev/ttyUSB0?baud=921600`` or ``/dev/ttyUSB0``: a board on a serial port;
- ``socket://HOST:PORT``: a board whose UART is exposed on a TCP socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from tpfed.errors import TpfedError

DEFAULT_BAUD = 921600
MAX_LOCAL = 64


class PeerSpecError(TpfedError):
    """A ``--peers`` item that cannot be understood."""


@dataclass(frozen=True)
class PeerSpec:
    """One peer to reach. ``kind`` is ``self`` (the coordinator's own CPU), ``local``, ``emu``,
    ``udp``, ``serial`` or ``socket``."""

    kind: str
    host: str = ""
    port: int = 0
    device: str = ""  # serial device, or the PlatformIO env of an emulated board
    baud: int = DEFAULT_BAUD

    @property
    def uri(self) -> str:
        if self.kind == "udp":
            return f"udp://{self.host}:{self.port}"
        if self.kind == "socket":
            return f"socket://{self.host}:{self.port}"
        if self.kind == "serial":
            return f"serial://{self.device}?baud={self.baud}"
        return self.kind

    @property
    def is_stream(self) -> bool:
        """Reached over a byte stream (serial framing) rather than datagrams."""
        return self.kind in ("serial", "socket", "emu")


_COUNT = re.compile(r"^(local|emu):(\d+)(?:@([A-Za-z0-9_.-]+))?$")


def _host_port(item: str, netloc: str) -> tuple[str, int]:
    host, sep, port = netloc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerSpecError(f"peer {item!r}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def parse_item(item: str) -> list[PeerSpec]:
    item = item.strip()
    if not item:
        raise PeerSpecError("empty item in --peers (two commas in a row?)")
    if item == "self":  # the coordinator's own CPU, as one more device
        return [PeerSpec(kind="self")]
    m = _COUNT.match(item)
    if m:
        kind, n, env = m.group(1), int(m.group(2)), m.group(3) or ""
        if not 1 <= n <= MAX_LOCAL:
            raise PeerSpecError(f"peer {item!r}: count must be 1..{MAX_LOCAL}")
        if env and kind != "emu":
            raise PeerSpecError(f"peer {item!r}: only emu:N takes @ENV")
        return [PeerSpec(kind=kind, device=env) for _ in range(n)]
    if item.startswith("/dev/") or re.match(r"^COM\d+$", item):
        return [PeerSpec(kind="serial", device=item)]
    parts = urlsplit(item)
    if parts.scheme == "udp":
        host, port = _host_port(item, parts.netloc)
        return [PeerSpec(kind="udp", host=host, port=port)]
    if parts.scheme == "socket":
        host, port = _host_port(item, parts.netloc)
        return [PeerSpec(kind="socket", host=host, port=port)]
    if parts.scheme == "serial":
        device = parts.path or parts.netloc
        if not device:
            raise PeerSpecError(f"peer {item!r}: serial:// needs a device path")
        query = parse_qs(parts.query)
        baud = DEFAULT_BAUD
        if "baud" in query:
            value = query["baud"][-1]
            if not value.isdigit() or int(value) <= 0:
                raise PeerSpecError(f"peer {item!r}: baud must be a positive integer")
            baud = int(value)
        return [PeerSpec(kind="serial", device=device, baud=baud)]
    raise PeerSpecError(
        f"peer {item!r} not understood: use self, local:N, emu:N, udp://HOST:PORT, "
        "serial:///dev/ttyX?baud=N or socket://HOST:PORT"
    )


def parse_peers(spec: str) -> list[PeerSpec]:
    """Parse a ``--peers`` value into one :class:`PeerSpec` per peer, in order."""
    peers = [p for item in spec.split(",") for p in parse_item(item)]
    if not peers:
        raise PeerSpecError("--peers names no peer")
    return peers
