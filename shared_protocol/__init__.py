"""tpfed wire protocol (``tpfed.protocol``): one construct schema, codecs, framings.

    from tpfed.protocol import Frame, MsgType, encode_frame, decode_frame
    data = encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 5, "load_pct": 10}, src=3, dst=0))
    frame = decode_frame(data)                      # ProtocolError subclass on bad input

Hot path (coordinator token loop, peers): ``encode_activation`` / ``decode_partial`` and the
peer-side ``decode_activation`` / ``encode_partial`` take and return numpy arrays.
Links: ``StreamFramer`` (COBS, serial) and ``DatagramFramer`` (fragmentation, UDP/BLE).
The layout lives in ``schema.py``; the C codec and golden frames are generated from it.
"""

from .codec import (
    Frame,
    HeaderView,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_payload,
    peek_header,
)
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
from .fastpath import (
    ActivationView,
    PartialView,
    UnexpectedType,
    decode_activation,
    decode_partial,
    encode_activation,
    encode_partial,
)
from .framing import MAX_FRAME, DatagramFramer, StreamFramer, frame_intact
from .schema import (
    BROADCAST,
    COORDINATOR,
    HEADER_SIZE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    ByeReason,
    DeviceClass,
    ErrorCode,
    Feature,
    Flag,
    MsgType,
    PartialEncoding,
    Stage,
    TransportKind,
)

__all__ = [
    "BROADCAST", "COORDINATOR", "HEADER_SIZE", "MAX_FRAME", "MAX_PAYLOAD", "PROTOCOL_VERSION",
    "ActivationView", "BadCrc", "BadLength", "BadMagic", "BadPayload", "ByeReason",
    "DatagramFramer", "DeviceClass", "ErrorCode", "Feature", "Flag", "Frame", "HeaderView",
    "MsgType", "OversizeFrame", "PartialEncoding", "PartialView", "ProtocolError", "Stage",
    "StreamFramer", "TransportKind", "TruncatedFrame", "UnexpectedType", "UnknownType",
    "VersionMismatch", "decode_activation", "decode_frame", "decode_partial", "decode_payload",
    "encode_activation", "encode_frame", "encode_partial", "encode_payload", "frame_intact",
    "peek_header",
]
