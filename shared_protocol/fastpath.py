"""Hot-path codecs for ACTIVATION and PARTIAL frames (numpy in, numpy views out).

The coordinator encodes an ACTIVATION and decodes a PARTIAL tens of times per token; the
construct path costs tens of microseconds per call, these cost a few. Their struct formats,
element dtypes and block size are derived from ``schema.py`` at import time (and checked
against it), and the tests prove byte-for-byte equality with ``codec.py``.

Decoded arrays are read-only views into the frame buffer (no copy): keep the frame alive
while you use them, or copy. The decoders take frames with the AUTH trailer too (they check
its place, not its tag: verify with ``shared_protocol.auth`` first); the encoders make
unauthenticated frames, to be sealed with ``shared_protocol.auth``.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from .codec import CRC_STRUCT, HEADER_STRUCT, check_frame, trailer_size
from .errors import BadPayload, OversizeFrame, ProtocolError
from .layout import element_format, field, fixed_prefix, joined, switch_cases
from .schema import (
    BROADCAST,
    COORDINATOR,
    CRC_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Q8_BLOCK,
    Activation,
    Flag,
    MsgType,
    Partial,
    PartialEncoding,
)

# --- derived layout -------------------------------------------------------------------------
_HEADER_FMT = HEADER_STRUCT.format[1:]
_ACT_FMT, _ACT_NAMES = fixed_prefix(Activation)
_PART_FMT, _PART_NAMES = fixed_prefix(Partial)
assert _ACT_NAMES == ("layer", "stage", "pos", "n"), _ACT_NAMES
assert _PART_NAMES == ("layer", "stage", "pos", "encoding", "n"), _PART_NAMES

_ACT = joined(_HEADER_FMT, _ACT_FMT)  # header + ACTIVATION prefix
_PART = joined(_HEADER_FMT, _PART_FMT)  # header + PARTIAL prefix
_ACT_DATA = _ACT.size  # offset of the scales in an ACTIVATION frame
_PART_DATA = _PART.size
_ACT_PREFIX = _ACT_DATA - HEADER_SIZE
_PART_PREFIX = _PART_DATA - HEADER_SIZE

_SCALE_DT = np.dtype(element_format(field(Activation, "scales")))
_QS_DT = np.dtype(element_format(field(Activation, "qs")))
_cases = switch_cases(field(Partial, "data"))
_F32_DT = np.dtype(element_format(_cases[PartialEncoding.F32]))
_F16_RAW_DT = np.dtype(element_format(_cases[PartialEncoding.F16]))
_F16_DT = np.dtype("<f2")  # the same bytes, read as IEEE binary16
assert _F16_RAW_DT.itemsize == _F16_DT.itemsize
_q8_case = _cases[PartialEncoding.Q8_0]
assert np.dtype(element_format(field(_q8_case, "scales"))) == _SCALE_DT
assert np.dtype(element_format(field(_q8_case, "qs"))) == _QS_DT

# The scale count is the schema's expression; check the closed form used below against it.
_nb_expr = field(Activation, "scales").count
assert all(_nb_expr({"n": n}) == (n + Q8_BLOCK - 1) // Q8_BLOCK for n in range(0, 4 * Q8_BLOCK + 1))

_T_ACT = int(MsgType.ACTIVATION)
_T_PART = int(MsgType.PARTIAL)
_F32, _F16, _Q8 = int(PartialEncoding.F32), int(PartialEncoding.F16), int(PartialEncoding.Q8_0)
_BAD_FLAGS = 0xFF & ~int(Flag.ACK_REQUESTED | Flag.LAST)
_SB = _SCALE_DT.itemsize
_MAX_Q8_N = MAX_PAYLOAD
while _ACT_PREFIX + ((_MAX_Q8_N + Q8_BLOCK - 1) // Q8_BLOCK) * _SB + _MAX_Q8_N > MAX_PAYLOAD:
    _MAX_Q8_N -= 1  # largest n whose ACTIVATION payload fits (a few thousand steps, once)


class UnexpectedType(ProtocolError):
    """A valid frame of another type was given to a type-specific fast decoder."""


class ActivationView(NamedTuple):
    src: int
    dst: int
    seq: int
    session: int
    flags: int
    layer: int
    stage: int
    pos: int
    n: int
    scales: np.ndarray  # (ceil(n/32),) uint16 raw fp16, view into the frame
    qs: np.ndarray  # (n,) int8, view into the frame


class PartialView(NamedTuple):
    src: int
    dst: int
    seq: int
    session: int
    flags: int
    layer: int
    stage: int
    pos: int
    encoding: int
    n: int
    values: np.ndarray | None  # F32: (n,) float32; F16: (n,) float16; Q8_0: None
    scales: np.ndarray | None  # Q8_0 only: (ceil(n/32),) uint16 raw fp16
    qs: np.ndarray | None  # Q8_0 only: (n,) int8

    def to_f32(self) -> np.ndarray:
        """The partial vector as a new float32 array, whatever the encoding."""
        if self.values is not None:
            return self.values.astype(np.float32)
        d = self.scales.view(_F16_DT).astype(np.float32)
        return self.qs.astype(np.float32) * np.repeat(d, Q8_BLOCK)[: self.n]


def activation_frame_size(n: int) -> int:
    """Bytes of an ACTIVATION frame carrying n Q8_0 values (header, prefix, scales, CRC)."""
    return _ACT_DATA + ((n + Q8_BLOCK - 1) // Q8_BLOCK) * _SB + n + CRC_SIZE


def partial_frame_size(n: int) -> int:
    """Bytes of an F32 PARTIAL frame of n values."""
    return _PART_DATA + 4 * n + CRC_SIZE


def min_stage_bytes(n: int) -> int:
    """The least one device's part in one stage can cost on the wire: its Q8_0 activation (n int8
    values and ceil(n/32) fp16 scales) out and an f32 partial of n values back, no framing."""
    return n + ((n + Q8_BLOCK - 1) // Q8_BLOCK) * _SB + 4 * n


def _check_header_args(src: int, dst: int, seq: int, session: int, flags: int) -> None:
    if not (0 <= src < 256 and 0 <= dst < 256 and 0 <= seq < 65536 and 0 <= session < 65536
            and 0 <= flags < 256) or flags & _BAD_FLAGS:
        raise ProtocolError(
            f"header field out of range: src={src} dst={dst} seq={seq} session={session} "
            f"flags={flags}"
        )


def _q8_arrays(qs: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    qs = np.ascontiguousarray(qs)
    scales = np.ascontiguousarray(scales)
    if qs.dtype != _QS_DT or qs.ndim != 1:
        raise BadPayload(f"qs must be a 1-D int8 array, got {qs.dtype} {qs.shape}")
    if scales.dtype == _F16_DT:
        scales = scales.view(_SCALE_DT)
    if scales.dtype != _SCALE_DT or scales.ndim != 1:
        raise BadPayload(f"scales must be a 1-D uint16 (raw fp16) array, got {scales.dtype} {scales.shape}")
    n = qs.shape[0]
    nb = (n + Q8_BLOCK - 1) // Q8_BLOCK
    if scales.shape[0] != nb:
        raise BadPayload(f"{n} values need {nb} scales, got {scales.shape[0]}")
    if n > _MAX_Q8_N:
        raise OversizeFrame(f"{n} Q8_0 values do not fit one frame (at most {_MAX_Q8_N})")
    return qs, scales, n, nb


def encode_activation(
    layer: int,
    stage: int,
    pos: int,
    qs: np.ndarray,
    scales: np.ndarray,
    *,
    dst: int = BROADCAST,
    seq: int = 0,
    session: int = 0,
    src: int = COORDINATOR,
    flags: int = 0,
) -> bytes:
    """ACTIVATION frame from a Q8_0 vector: qs (n,) int8 and scales (ceil(n/32),) uint16
    raw fp16 (float16 accepted). Same bytes as ``encode_frame`` of the equivalent Frame."""
    qs, scales, n, nb = _q8_arrays(qs, scales)
    _check_header_args(src, dst, seq, session, flags)
    if not (0 <= layer < 65536 and 0 <= stage < 256 and 0 <= pos < 65536):
        raise BadPayload(f"layer={layer} stage={stage} pos={pos} out of range")
    plen = _ACT_PREFIX + nb * _SB + n
    end = HEADER_SIZE + plen
    buf = bytearray(end + CRC_SIZE)
    _ACT.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, _T_ACT, flags, src, dst, seq, session, plen,
                   layer, stage, pos, n)
    mv = memoryview(buf)
    q0 = _ACT_DATA + nb * _SB
    mv[_ACT_DATA:q0] = scales.view(np.uint8)
    mv[q0:end] = qs.view(np.uint8)
    CRC_STRUCT.pack_into(buf, end, zlib.crc32(mv[:end]))
    return bytes(buf)


def decode_activation(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> ActivationView:
    """ACTIVATION frame -> ActivationView with zero-copy numpy views. Raises the same errors
    as ``decode_frame`` (plus UnexpectedType for a valid frame of another type)."""
    if len(data) < _ACT_DATA + CRC_SIZE or data[0] != MAGIC or data[2] != _T_ACT:
        _slow_reject(data, max_payload, _T_ACT)
    (_, version, _, flags, src, dst, seq, session, plen, layer, stage, pos, n) = _ACT.unpack_from(data)
    end = HEADER_SIZE + plen + trailer_size(flags)
    if (version >> 4 != PROTOCOL_VERSION >> 4 or plen > max_payload or len(data) != end + CRC_SIZE
            or zlib.crc32(memoryview(data)[:end]) != CRC_STRUCT.unpack_from(data, end)[0]):
        _slow_reject(data, max_payload, _T_ACT)
    nb = (n + Q8_BLOCK - 1) // Q8_BLOCK
    if plen != _ACT_PREFIX + nb * _SB + n:
        raise BadPayload(f"ACTIVATION payload of {plen} bytes does not hold n={n} Q8_0 values")
    q0 = _ACT_DATA + nb * _SB
    scales = np.frombuffer(data, _SCALE_DT, nb, _ACT_DATA)
    qs = np.frombuffer(data, _QS_DT, n, q0)
    return ActivationView(src, dst, seq, session, flags, layer, stage, pos, n, scales, qs)


def encode_partial(
    layer: int,
    stage: int,
    pos: int,
    values: np.ndarray | tuple[np.ndarray, np.ndarray],
    *,
    dst: int = COORDINATOR,
    seq: int = 0,
    session: int = 0,
    src: int = COORDINATOR,
    flags: int = 0,
) -> bytes:
    """PARTIAL frame. ``values``: float32 array (encoding F32), float16 array (F16), or a
    (qs int8, scales uint16/float16) pair (Q8_0)."""
    _check_header_args(src, dst, seq, session, flags)
    if not (0 <= layer < 65536 and 0 <= stage < 256 and 0 <= pos < 65536):
        raise BadPayload(f"layer={layer} stage={stage} pos={pos} out of range")
    if isinstance(values, tuple):
        qs, scales, n, nb = _q8_arrays(*values)
        enc = _Q8
        parts: tuple[np.ndarray, ...] = (scales, qs)
        size = nb * _SB + n
    else:
        v = np.ascontiguousarray(values)
        if v.ndim != 1:
            raise BadPayload(f"values must be 1-D, got shape {v.shape}")
        if v.dtype == _F32_DT:
            enc = _F32
        elif v.dtype == _F16_DT:
            enc = _F16
        else:
            raise BadPayload(f"values must be float32 or float16 (or a Q8_0 pair), got {v.dtype}")
        n = v.shape[0]
        parts = (v,)
        size = v.nbytes
    plen = _PART_PREFIX + size
    if plen > MAX_PAYLOAD or n > 0xFFFF:
        raise OversizeFrame(f"PARTIAL of {n} values does not fit one frame")
    end = HEADER_SIZE + plen
    buf = bytearray(end + CRC_SIZE)
    _PART.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, _T_PART, flags, src, dst, seq, session,
                    plen, layer, stage, pos, enc, n)
    mv = memoryview(buf)
    off = _PART_DATA
    for p in parts:
        mv[off:off + p.nbytes] = p.view(np.uint8)
        off += p.nbytes
    CRC_STRUCT.pack_into(buf, end, zlib.crc32(mv[:end]))
    return bytes(buf)


def decode_partial(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> PartialView:
    """PARTIAL frame -> PartialView with zero-copy numpy views. Raises the same errors as
    ``decode_frame`` (plus UnexpectedType for a valid frame of another type)."""
    if len(data) < _PART_DATA + CRC_SIZE or data[0] != MAGIC or data[2] != _T_PART:
        _slow_reject(data, max_payload, _T_PART)
    (_, version, _, flags, src, dst, seq, session, plen, layer, stage, pos, enc, n) = _PART.unpack_from(data)
    end = HEADER_SIZE + plen + trailer_size(flags)
    if (version >> 4 != PROTOCOL_VERSION >> 4 or plen > max_payload or len(data) != end + CRC_SIZE
            or zlib.crc32(memoryview(data)[:end]) != CRC_STRUCT.unpack_from(data, end)[0]):
        _slow_reject(data, max_payload, _T_PART)
    size = plen - _PART_PREFIX
    if enc == _F32:
        if size != n * _F32_DT.itemsize:
            raise BadPayload(f"PARTIAL f32 payload does not hold n={n} values")
        return PartialView(src, dst, seq, session, flags, layer, stage, pos, enc, n,
                           np.frombuffer(data, _F32_DT, n, _PART_DATA), None, None)
    if enc == _Q8:
        nb = (n + Q8_BLOCK - 1) // Q8_BLOCK
        if size != nb * _SB + n:
            raise BadPayload(f"PARTIAL q8_0 payload does not hold n={n} values")
        return PartialView(src, dst, seq, session, flags, layer, stage, pos, enc, n, None,
                           np.frombuffer(data, _SCALE_DT, nb, _PART_DATA),
                           np.frombuffer(data, _QS_DT, n, _PART_DATA + nb * _SB))
    if enc == _F16:
        if size != n * _F16_DT.itemsize:
            raise BadPayload(f"PARTIAL f16 payload does not hold n={n} values")
        return PartialView(src, dst, seq, session, flags, layer, stage, pos, enc, n,
                           np.frombuffer(data, _F16_DT, n, _PART_DATA), None, None)
    raise BadPayload(f"PARTIAL has unknown encoding {enc}")


def _slow_reject(data: bytes | bytearray | memoryview, max_payload: int, want: int) -> None:
    """Called when the fast checks fail: find and raise the precise error (never returns
    normally unless the frame is a valid one of the wanted type with a short payload)."""
    h = check_frame(data, max_payload)
    if h.type != want:
        raise UnexpectedType(f"expected a {MsgType(want).name} frame, got {MsgType(h.type).name}")
    raise BadPayload(f"{MsgType(want).name} payload of {h.length} bytes is too short")
