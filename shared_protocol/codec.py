"""Frame encoding and decoding through the construct schema (the general, slower path).

The coordinator's token loop uses ``fastpath.py`` for ACTIVATION and PARTIAL; everything else
goes through here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from construct import ConstructError, Container, ListContainer

from .errors import (
    BadCrc,
    BadLength,
    BadMagic,
    BadPayload,
    OversizeFrame,
    ProtocolError,
    TruncatedFrame,
    UnknownType,
    VersionMismatch,
)
from .layout import fixed_prefix, joined
from .schema import (
    AUTH_TRAILER_SIZE,
    BROADCAST,
    COORDINATOR,
    CRC_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    PAYLOADS,
    PROTOCOL_VERSION,
    TAG_SIZE,
    VERSION_MAJOR,
    AuthTrailer,
    Flag,
    Header,
    MsgType,
)

_HEADER_FORMAT, _HEADER_NAMES = fixed_prefix(Header)
HEADER_STRUCT = joined(_HEADER_FORMAT)
CRC_STRUCT = joined("I")
_TRAILER_FORMAT, _TRAILER_NAMES = fixed_prefix(AuthTrailer)
COUNTER_STRUCT = joined(_TRAILER_FORMAT)  # the trailer's counter (the tag follows it)
assert _TRAILER_NAMES == ("counter",) and COUNTER_STRUCT.size + TAG_SIZE == AUTH_TRAILER_SIZE
AUTH = int(Flag.AUTH)
_RESERVED_FLAGS = 0xFF & ~int(Flag.ACK_REQUESTED | Flag.LAST | Flag.AUTH)
_TYPES = frozenset(int(t) for t in MsgType)
assert HEADER_STRUCT.size == HEADER_SIZE == 12
assert _HEADER_NAMES == ("magic", "version", "type", "flags", "src", "dst", "seq", "session", "length")


class HeaderView(NamedTuple):
    """The decoded 12-byte header (``peek_header``)."""

    magic: int
    version: int
    type: int
    flags: int
    src: int
    dst: int
    seq: int
    session: int
    length: int


def trailer_size(flags: int) -> int:
    """Bytes between payload and CRC: the AUTH trailer when flags has AUTH, else 0."""
    return AUTH_TRAILER_SIZE if flags & AUTH else 0


@dataclass
class Frame:
    """One protocol frame. ``payload`` holds the message's fields by name (see schema.py);
    count fields (``n``, ``n_entries``, ...) are computed on encoding and may be omitted.

    With ``Flag.AUTH`` in flags, ``counter`` and ``tag`` are the trailer's (decoded frames carry
    them; ``encode_frame`` writes them as given). To authenticate a frame, encode it without
    AUTH and seal it with ``shared_protocol.auth`` (which sets the flag, counter and tag)."""

    type: MsgType
    payload: Mapping[str, Any] = field(default_factory=dict)
    src: int = COORDINATOR
    dst: int = BROADCAST
    seq: int = 0
    session: int = 0
    flags: int = 0
    version: int = PROTOCOL_VERSION
    counter: int = 0
    tag: bytes | None = None


def plain(obj: Any) -> Any:
    """construct containers -> plain dicts and lists (private ``_io``-style keys dropped)."""
    if isinstance(obj, Container):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, ListContainer | list):
        return [plain(v) for v in obj]
    return obj


def _check_u(name: str, value: int, bits: int) -> int:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ProtocolError(f"header field {name}={value!r} out of range 0..{(1 << bits) - 1}")
    return value


def encode_payload(msg_type: MsgType | int, payload: Mapping[str, Any]) -> bytes:
    try:
        t = MsgType(msg_type)
    except ValueError:
        raise UnknownType(f"unknown message type {msg_type!r}") from None
    try:
        data = PAYLOADS[t].build(dict(payload))
    except (ConstructError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        raise BadPayload(f"{t.name} payload cannot be encoded: {e}") from None
    if len(data) > MAX_PAYLOAD:
        raise OversizeFrame(f"{t.name} payload is {len(data)} bytes, the limit is {MAX_PAYLOAD}")
    return data


def assemble(header: tuple[int, ...], payload: bytes | bytearray | memoryview,
             trailer: bytes = b"") -> bytes:
    """Header fields (type, flags, src, dst, seq, session, version) + payload (+ the AUTH
    trailer when flags has AUTH) -> frame bytes."""
    t, flags, src, dst, seq, session, version = header
    if len(trailer) != trailer_size(flags):
        raise ProtocolError(f"flags 0x{flags:02x} need a trailer of {trailer_size(flags)} bytes, "
                            f"got {len(trailer)}")
    buf = bytearray(HEADER_SIZE + len(payload) + len(trailer) + CRC_SIZE)
    HEADER_STRUCT.pack_into(buf, 0, MAGIC, version, t, flags, src, dst, seq, session, len(payload))
    end = HEADER_SIZE + len(payload)
    buf[HEADER_SIZE:end] = payload
    buf[end:end + len(trailer)] = trailer
    end += len(trailer)
    CRC_STRUCT.pack_into(buf, end, zlib.crc32(memoryview(buf)[:end]))
    return bytes(buf)


def encode_frame(frame: Frame) -> bytes:
    """Frame -> bytes. Raises BadPayload / OversizeFrame / ProtocolError for values that
    do not fit, UnknownType for a type this version does not define."""
    _check_u("src", frame.src, 8)
    _check_u("dst", frame.dst, 8)
    _check_u("seq", frame.seq, 16)
    _check_u("session", frame.session, 16)
    _check_u("flags", frame.flags, 8)
    _check_u("version", frame.version, 8)
    if frame.flags & _RESERVED_FLAGS:
        raise ProtocolError(f"flags 0x{frame.flags:02x} set reserved bits")
    if frame.version >> 4 != VERSION_MAJOR:
        raise VersionMismatch(frame.version, PROTOCOL_VERSION)
    trailer = b""
    if frame.flags & AUTH:
        _check_u("counter", frame.counter, 32)
        if not isinstance(frame.tag, bytes | bytearray) or len(frame.tag) != TAG_SIZE:
            raise ProtocolError(f"an AUTH frame needs a {TAG_SIZE}-byte tag (seal frames with "
                                "shared_protocol.auth)")
        trailer = COUNTER_STRUCT.pack(frame.counter) + bytes(frame.tag)
    payload = encode_payload(frame.type, frame.payload)
    return assemble(
        (int(frame.type), frame.flags, frame.src, frame.dst, frame.seq, frame.session,
         frame.version),
        payload, trailer,
    )


def peek_header(data: bytes | bytearray | memoryview) -> HeaderView:
    """Decode and check only the header (magic, major version); no CRC or payload check."""
    if len(data) < 1:
        raise TruncatedFrame("empty frame")
    if data[0] != MAGIC:
        raise BadMagic(f"bad magic 0x{data[0]:02x}, expected 0x{MAGIC:02x}")
    if len(data) < HEADER_SIZE:
        raise TruncatedFrame(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    h = HeaderView(*HEADER_STRUCT.unpack_from(data))
    if h.version >> 4 != VERSION_MAJOR:
        raise VersionMismatch(h.version, PROTOCOL_VERSION)
    return h


def check_frame(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> HeaderView:
    """Header, size and CRC checks shared by every decoder; returns the header."""
    h = peek_header(data)
    if h.length > max_payload:
        raise OversizeFrame(f"payload of {h.length} bytes exceeds the limit of {max_payload}")
    total = HEADER_SIZE + h.length + trailer_size(h.flags) + CRC_SIZE
    if len(data) < total:
        raise TruncatedFrame(f"frame of {len(data)} bytes, header says {total}")
    if len(data) > total:
        raise BadLength(f"frame of {len(data)} bytes, header says {total}")
    end = total - CRC_SIZE
    (crc,) = CRC_STRUCT.unpack_from(data, end)
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if zlib.crc32(mv[:end]) != crc:
        raise BadCrc(f"bad CRC in {MsgType(h.type).name if h.type in _TYPES else h.type} frame seq {h.seq}")
    if h.type not in _TYPES:
        raise UnknownType(f"unknown message type 0x{h.type:02x}")
    return h


def decode_payload(msg_type: MsgType | int, payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        t = MsgType(msg_type)
    except ValueError:
        raise UnknownType(f"unknown message type {msg_type!r}") from None
    try:
        return plain(PAYLOADS[t].parse(bytes(payload)))
    except (ConstructError, UnicodeDecodeError) as e:
        raise BadPayload(f"malformed {t.name} payload: {e}") from None


def decode_frame(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> Frame:
    """bytes -> Frame; raises the ProtocolError subclass that names what is wrong."""
    h = check_frame(data, max_payload)
    end = HEADER_SIZE + h.length
    payload = decode_payload(h.type, memoryview(data)[HEADER_SIZE:end])
    counter, tag = 0, None
    if h.flags & AUTH:
        (counter,) = COUNTER_STRUCT.unpack_from(data, end)
        tag = bytes(data[end + COUNTER_STRUCT.size:end + AUTH_TRAILER_SIZE])
    return Frame(MsgType(h.type), payload, h.src, h.dst, h.seq, h.session, h.flags, h.version,
                 counter, tag)
