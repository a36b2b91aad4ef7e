"""Typed protocol errors. Every decoding failure raises exactly one of these.

Each class names the C codec status it corresponds to (``status``) and the wire ``ErrorCode``
a peer would answer with (``error_code``), so the Python and C decoders can be checked
against each other and a receiver can NACK with the right code.
"""

from __future__ import annotations

from .schema import ErrorCode, Status


class ProtocolError(ValueError):
    """Base class: a frame or fragment could not be encoded or decoded."""

    status: Status = Status.BAD_PAYLOAD
    error_code: ErrorCode = ErrorCode.BAD_FRAME


class BadMagic(ProtocolError):
    status = Status.BAD_MAGIC
    error_code = ErrorCode.BAD_FRAME


class VersionMismatch(ProtocolError):
    """The frame's major version differs from ours."""

    status = Status.VERSION
    error_code = ErrorCode.VERSION

    def __init__(self, theirs: int, ours: int) -> None:
        self.theirs = theirs
        self.ours = ours
        super().__init__(
            f"protocol version mismatch: frame is {theirs >> 4}.{theirs & 15}, "
            f"this side speaks {ours >> 4}.{ours & 15} (major versions must match)"
        )


class TruncatedFrame(ProtocolError):
    status = Status.TRUNCATED
    error_code = ErrorCode.BAD_FRAME


class BadLength(ProtocolError):
    status = Status.BAD_LENGTH
    error_code = ErrorCode.BAD_FRAME


class BadCrc(ProtocolError):
    status = Status.BAD_CRC
    error_code = ErrorCode.BAD_CRC


class UnknownType(ProtocolError):
    status = Status.UNKNOWN_TYPE
    error_code = ErrorCode.UNKNOWN_TYPE


class OversizeFrame(ProtocolError):
    status = Status.OVERSIZE
    error_code = ErrorCode.OVERSIZE


class BadPayload(ProtocolError):
    status = Status.BAD_PAYLOAD
    error_code = ErrorCode.BAD_PAYLOAD


class BadTag(ProtocolError):
    """An authenticated frame was needed and this one is not one (no AUTH trailer, another
    session, or a tag that does not verify)."""

    status = Status.BAD_TAG
    error_code = ErrorCode.BAD_FRAME


class Replayed(ProtocolError):
    """The frame's counter was seen before or is older than the replay window."""

    status = Status.REPLAYED
    error_code = ErrorCode.BAD_FRAME


ERROR_BY_STATUS: dict[Status, type[ProtocolError]] = {
    cls.status: cls
    for cls in (BadMagic, VersionMismatch, TruncatedFrame, BadLength, BadCrc, UnknownType,
                OversizeFrame, BadPayload, BadTag, Replayed)
}
