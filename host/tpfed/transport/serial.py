"""Serial transport: pyserial + COBS stream framing, read through the event loop.

Accepted URLs: a device path (``/dev/ttyUSB0``, ``COM3``), ``serial:///dev/ttyUSB0?baud=921600``,
and any pyserial URL handler (``socket://127.0.0.1:PORT`` for an emulated board's UART,
``rfc2217://``, ``loop://``). Reading uses the port's file descriptor with
``loop.add_reader`` (no thread, no polling), so a reply is seen as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit

import serial

from tpfed.errors import PeerError
from tpfed.protocol.framing import MAX_FRAME, StreamFramer

from .base import FrameQueue, Link, LinkClosed, LinkStats

DEFAULT_BAUD = 921600


def parse_serial_url(url: str, baudrate: int | None = None) -> tuple[str, int]:
    """URL -> (what pyserial opens, baud rate)."""
    baud = baudrate or DEFAULT_BAUD
    if url.startswith("serial://"):
        u = urlsplit(url)
        path = (u.netloc + u.path) if u.netloc else u.path
        if not path:
            raise PeerError(f"serial URL {url!r} names no device")
        q = parse_qs(u.query)
        if "baud" in q:
            try:
                baud = int(q["baud"][-1])
            except ValueError:
                raise PeerError(f"serial URL {url!r}: baud must be an integer") from None
        unknown = set(q) - {"baud"}
        if unknown:
            raise PeerError(f"serial URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        return path, baud
    if not url:
        raise PeerError("empty serial port name")
    return url, baud


class SerialLink(Link):
    """Frames over a serial port (or anything pyserial opens), COBS-framed."""

    def __init__(self, port: serial.SerialBase, url: str, name: str, max_frame: int,
                 queue_size: int) -> None:
        self.port = port
        self.uri = url
        self.name = name
        self.framer = StreamFramer(max_frame=max_frame)
        self._queue: FrameQueue[bytes] = FrameQueue(queue_size)
        self._stats = LinkStats()
        self._loop = asyncio.get_running_loop()
        self._fd = port.fileno()
        self._closed = False
        self._loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def open(cls, url: str, *, name: str | None = None, baudrate: int | None = None,
                   max_frame: int = MAX_FRAME, queue_size: int = 1024) -> SerialLink:
        target, baud = parse_serial_url(url, baudrate)
        try:
            port = await asyncio.to_thread(serial.serial_for_url, target, baudrate=baud, timeout=0,
                                           write_timeout=5)
        except (serial.SerialException, OSError, ValueError) as e:
            raise PeerError(f"cannot open serial port {url}: {e}") from None
        try:
            return cls(port, url, name or url, max_frame, queue_size)
        except (AttributeError, NotImplementedError, OSError, ValueError):
            port.close()
            raise PeerError(f"serial port {url} has no file descriptor to wait on") from None

    def _on_readable(self) -> None:
        try:
            data = self.port.read(65536)
        except (serial.SerialException, OSError) as e:
            self._shutdown(LinkClosed(f"serial link {self.name}: {e}"))
            return
        if not data:
            return
        self._stats.bytes_received += len(data)
        dropped = self.framer.stats.dropped
        for frame in self.framer.feed(data):
            self._stats.frames_received += 1
            hook = self.on_frame
            if hook is None or not hook(frame):
                self._queue.put(frame)
        self._stats.dropped += self.framer.stats.dropped - dropped

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise LinkClosed(f"serial link {self.name} is closed")
        # A leading delimiter closes any partial segment the far end holds (line noise, bytes
        # from before it booted), so this frame is never glued to garbage.
        data = b"\x00" + StreamFramer.encode(frame)
        try:
            self.port.write(data)
        except (serial.SerialException, OSError) as e:
            self._shutdown(LinkClosed(f"serial link {self.name}: {e}"))
            raise LinkClosed(f"serial link {self.name}: write failed: {e}") from None
        self._stats.bytes_sent += len(data)
        self._stats.frames_sent += 1

    async def recv(self, timeout: float | None = None) -> bytes:
        return await self._queue.get(timeout)

    def _shutdown(self, exc: LinkClosed) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._queue.close(exc)
        with contextlib.suppress(serial.SerialException, OSError):
            self.port.close()

    async def close(self) -> None:
        self._shutdown(LinkClosed(f"serial link {self.name} closed"))

    @property
    def stats(self) -> LinkStats:
        s = self._stats
        return LinkStats(s.bytes_sent, s.bytes_received, s.frames_sent, s.frames_received,
                         s.dropped + self._queue.overflows)


async def open_serial_link(url: str, *, name: str | None = None, baudrate: int | None = None,
                           max_frame: int = MAX_FRAME) -> SerialLink:
    """Open ``url`` (see module docstring) as a frame Link."""
    return await SerialLink.open(url, name=name, baudrate=baudrate, max_frame=max_frame)
