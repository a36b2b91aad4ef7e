"""Framings that carry whole frames over links: COBS for byte streams, fragments for datagrams.

Stream (serial, TCP): each frame travels as ``cobs(frame) + b"\\x00"``. The decoder is
incremental, resynchronises on the next 0x00 after garbage, drops (and counts) segments that
are not valid COBS, are too long, or fail the frame's length/CRC check, and never buffers more
than one maximal encoded frame.

Datagram (UDP, BLE writes): a frame that fits the MTU is sent as one datagram, unchanged.
A larger frame is split into fragments, each ``FragmentHeader`` (magic 0xA8, frame_id u16,
index u8, count u8) + a slice of the frame. The reassembler tolerates loss (incomplete frames
expire), duplicates and reordering, and bounds the frames and bytes it holds.
"""

from __future__ import annotations

import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from cobs import cobs

from .codec import CRC_STRUCT, HEADER_STRUCT, trailer_size
from .errors import OversizeFrame
from .layout import fixed_prefix, joined
from .schema import (
    AUTH_TRAILER_SIZE,
    CRC_SIZE,
    FRAG_MAGIC,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    FragmentHeader,
)

MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + AUTH_TRAILER_SIZE + CRC_SIZE  # an AUTH frame's trailer included
FRAG_STRUCT = joined(fixed_prefix(FragmentHeader)[0])
FRAG_HEADER_SIZE = FRAG_STRUCT.size
_LEN_OFFSET = HEADER_STRUCT.size - 2  # the header's last field is the payload length
assert fixed_prefix(FragmentHeader)[1] == ("magic", "frame_id", "index", "count")


def frame_intact(data: bytes | bytearray | memoryview) -> bool:
    """Cheap link-level check: size agrees with the header's length field and the CRC holds.
    (Magic and version are left to ``decode_frame`` so that they give a precise error.)"""
    n = len(data)
    if n < HEADER_SIZE + CRC_SIZE:
        return False
    end = n - CRC_SIZE
    if (int.from_bytes(data[_LEN_OFFSET:HEADER_SIZE], "little") + trailer_size(data[3])
            != end - HEADER_SIZE):
        return False
    return zlib.crc32(memoryview(data)[:end]) == CRC_STRUCT.unpack_from(data, end)[0]


@dataclass
class StreamStats:
    frames: int = 0  # frames delivered
    bytes: int = 0  # bytes fed
    dropped: int = 0  # segments thrown away (bad COBS, bad CRC/length, too long)
    overflows: int = 0  # of those, segments longer than the buffer bound


class StreamFramer:
    """COBS framing for byte streams; one instance per direction-pair is fine (encode is
    stateless).

    ``max_frame`` bounds the decoded frame size (default: the largest legal frame);
    ``check`` drops frames failing ``frame_intact`` at this layer (on by default).
    """

    def __init__(self, max_frame: int = MAX_FRAME, check: bool = True) -> None:
        if max_frame < HEADER_SIZE + CRC_SIZE:
            raise ValueError(f"max_frame {max_frame} is below the minimum frame size")
        self.max_frame = max_frame
        self.check = check
        # COBS adds one byte per 254 plus one.
        self._max_encoded = max_frame + max_frame // 254 + 2
        self._buf = bytearray()
        self._skipping = False  # inside an over-long segment: discard up to the next 0x00
        self.stats = StreamStats()

    @staticmethod
    def encode(frame: bytes | bytearray | memoryview) -> bytes:
        return cobs.encode(frame) + b"\x00"

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Bytes from the stream -> complete frames (possibly none)."""
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        self.stats.bytes += len(data)
        out: list[bytes] = []
        start = 0
        n = len(data)
        while start < n:
            z = data.find(0, start)
            if z < 0:
                if not self._skipping:
                    self._buf += data[start:]
                    if len(self._buf) > self._max_encoded:
                        self._buf.clear()
                        self._skipping = True
                        self.stats.dropped += 1
                        self.stats.overflows += 1
                break
            if self._skipping:
                self._skipping = False
            else:
                if self._buf:
                    self._buf += data[start:z]
                    seg = bytes(self._buf)
                    self._buf.clear()
                else:
                    seg = data[start:z]
                if len(seg) > self._max_encoded:
                    self.stats.dropped += 1
                    self.stats.overflows += 1
                elif seg:
                    self._deliver(seg, out)
            start = z + 1
        return out

    def _deliver(self, seg: bytes | bytearray | memoryview, out: list[bytes]) -> None:
        try:
            frame = cobs.decode(seg)
        except cobs.DecodeError:
            self.stats.dropped += 1
            return
        if len(frame) > self.max_frame or (self.check and not frame_intact(frame)):
            self.stats.dropped += 1
            return
        self.stats.frames += 1
        out.append(frame)


@dataclass
class DatagramStats:
    frames: int = 0  # frames delivered (whole or reassembled)
    fragments: int = 0  # fragments accepted
    duplicates: int = 0  # fragments seen before (ignored)
    expired: int = 0  # incomplete frames dropped by timeout
    evicted: int = 0  # incomplete frames dropped to respect the caps
    dropped: int = 0  # datagrams thrown away (unknown magic, bad fragment header, bad frame)


class _Partial:
    __slots__ = ("count", "parts", "size", "born")

    def __init__(self, count: int, born: float) -> None:
        self.count = count
        self.parts: dict[int, bytes] = {}
        self.size = 0
        self.born = born


class DatagramFramer:
    """Fragmentation (``split``) and reassembly (``feed``) of frames over datagrams.

    mtu: largest datagram payload; frames up to that size go unchanged. timeout: seconds an
    incomplete frame may wait for its fragments. max_in_flight / max_bytes: caps on
    incomplete frames held (oldest evicted first). ``check`` drops whole frames that fail
    ``frame_intact``. ``first_id``: first frame_id used by ``split`` (random by default).
    Sources are told apart by the ``source`` key given to ``feed`` (e.g. the UDP address).
    """

    def __init__(
        self,
        mtu: int = 1400,
        *,
        timeout: float = 2.0,
        max_in_flight: int = 32,
        max_bytes: int = 4 * MAX_FRAME,
        check: bool = True,
        clock: Callable[[], float] = time.monotonic,
        first_id: int | None = None,
    ) -> None:
        if mtu < HEADER_SIZE + CRC_SIZE or mtu <= FRAG_HEADER_SIZE:
            raise ValueError(f"mtu {mtu} is too small for a frame header")
        self.mtu = mtu
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        self.check = check
        self._clock = clock
        # Random start: a restarted sender must not reuse the ids of its previous life.
        self._next_id = random.randrange(0x10000) if first_id is None else first_id & 0xFFFF
        self._pending: OrderedDict[tuple[Hashable, int], _Partial] = OrderedDict()
        self._pending_bytes = 0
        self._done: OrderedDict[tuple[Hashable, int], None] = OrderedDict()  # recent completions
        self.stats = DatagramStats()

    # --- sending ---------------------------------------------------------------------------
    def split(self, frame: bytes | bytearray | memoryview) -> list[bytes]:
        """One frame -> the datagrams to send (the frame itself when it fits the MTU)."""
        n = len(frame)
        if n <= self.mtu:
            return [frame if isinstance(frame, bytes) else bytes(frame)]
        chunk = self.mtu - FRAG_HEADER_SIZE
        count = -(-n // chunk)
        if count > 255:
            raise OversizeFrame(f"frame of {n} bytes needs {count} fragments at MTU {self.mtu} (max 255)")
        fid = self._next_id
        self._next_id = (fid + 1) & 0xFFFF
        mv = memoryview(frame)
        return [
            FRAG_STRUCT.pack(FRAG_MAGIC, fid, i, count) + mv[i * chunk:(i + 1) * chunk]
            for i in range(count)
        ]

    # --- receiving -------------------------------------------------------------------------
    def feed(self, datagram: bytes, source: Hashable = None) -> bytes | None:
        """One received datagram -> a complete frame, or None (fragment stored or dropped)."""
        if self._pending:
            self._expire(self._clock())
        if not datagram:
            self.stats.dropped += 1
            return None
        magic = datagram[0]
        if magic == MAGIC:
            if self.check and not frame_intact(datagram):
                self.stats.dropped += 1
                return None
            self.stats.frames += 1
            return datagram
        if magic != FRAG_MAGIC or len(datagram) <= FRAG_HEADER_SIZE:
            self.stats.dropped += 1
            return None
        _, fid, index, count = FRAG_STRUCT.unpack_from(datagram)
        if count == 0 or index >= count:
            self.stats.dropped += 1
            return None
        key = (source, fid)
        if key in self._done:
            self.stats.duplicates += 1
            return None
        entry = self._pending.get(key)
        if entry is None:
            now = self._clock()
            entry = self._pending[key] = _Partial(count, now)
        elif entry.count != count:
            # Same id, different shape: an old frame's leftovers; start over with this one.
            self._drop(key)
            self.stats.evicted += 1
            entry = self._pending[key] = _Partial(count, self._clock())
        if index in entry.parts:
            self.stats.duplicates += 1
            return None
        body = datagram[FRAG_HEADER_SIZE:]
        if entry.size + len(body) > MAX_FRAME:
            self._drop(key)
            self.stats.dropped += 1
            return None
        entry.parts[index] = body
        entry.size += len(body)
        self._pending_bytes += len(body)
        self.stats.fragments += 1
        if len(entry.parts) == entry.count:
            self._drop(key)
            self._done[key] = None
            if len(self._done) > 4 * self.max_in_flight:
                self._done.popitem(last=False)
            frame = b"".join(entry.parts[i] for i in range(entry.count))
            if self.check and not frame_intact(frame):
                self.stats.dropped += 1
                return None
            self.stats.frames += 1
            return frame
        self._enforce_caps(key)
        return None

    def expire(self) -> int:
        """Drop incomplete frames older than the timeout now; returns how many remain."""
        self._expire(self._clock())
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def buffered_bytes(self) -> int:
        return self._pending_bytes

    def _drop(self, key: tuple[Hashable, int]) -> None:
        entry = self._pending.pop(key)
        self._pending_bytes -= entry.size

    def _expire(self, now: float) -> None:
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if now - entry.born < self.timeout:
                break
            self._drop(key)
            self.stats.expired += 1

    def _enforce_caps(self, keep: tuple[Hashable, int]) -> None:
        while self._pending and (len(self._pending) > self.max_in_flight
                                 or self._pending_bytes > self.max_bytes):
            key = next(iter(self._pending))
            if key == keep and len(self._pending) == 1:
                # A single frame larger than max_bytes can never complete.
                self._drop(key)
                self.stats.evicted += 1
                break
            if key == keep:
                self._pending.move_to_end(key)
                continue
            self._drop(key)
            self.stats.evicted += 1
