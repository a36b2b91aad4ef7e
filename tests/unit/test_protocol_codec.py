"""Python codec: golden frames decode and re-encode byte-exactly; bad input gets a typed error."""

from __future__ import annotations

import contextlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol import (
    BROADCAST,
    BadCrc,
    BadLength,
    BadMagic,
    BadPayload,
    Frame,
    MsgType,
    OversizeFrame,
    ProtocolError,
    TruncatedFrame,
    UnknownType,
    VersionMismatch,
    decode_frame,
    encode_frame,
    errors,
    peek_header,
)
from tpfed.protocol.golden_data import entries, from_json, read

FRAMES = entries("frame")
INVALID = entries("invalid")


def test_every_message_type_has_a_golden_frame() -> None:
    assert {e["type"] for e in FRAMES} == {t.name for t in MsgType}


@pytest.mark.parametrize("entry", FRAMES, ids=lambda e: e["file"])
def test_golden_frame_decodes_to_manifest(entry: dict) -> None:
    data = read(entry["file"])
    f = decode_frame(data)
    assert f.type.name == entry["type"]
    h = entry["header"]
    assert (f.src, f.dst, f.seq, f.session, f.flags, f.version) == (
        h["src"], h["dst"], h["seq"], h["session"], h["flags"], h["version"])
    assert f.payload == from_json(entry["payload"])
    a = entry.get("auth", {})
    assert (f.counter, f.tag) == ((a["counter"], bytes.fromhex(a["tag"])) if a else (0, None))
    if entry["reencode"]:
        assert encode_frame(f) == data
        # From the manifest alone too (count fields are recomputed on encoding).
        trailer = {"counter": a["counter"], "tag": bytes.fromhex(a["tag"])} if a else {}
        again = Frame(MsgType[entry["type"]], from_json(entry["payload"]), **h, **trailer)
        assert encode_frame(again) == data


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["file"])
def test_golden_invalid_frame_gives_its_error(entry: dict) -> None:
    cls = getattr(errors, entry["error"])
    with pytest.raises(cls) as info:
        decode_frame(read(entry["file"]), max_payload=entry.get("max_payload", 0xFFFF))
    assert type(info.value) is cls
    assert cls.status.name == entry["status"]


def test_version_mismatch_names_both_versions() -> None:
    data = read("version_major_2.bin")
    with pytest.raises(VersionMismatch, match=r"2\.0.*1\.0"):
        decode_frame(data)
    with pytest.raises(VersionMismatch):
        peek_header(data)
    assert isinstance(VersionMismatch(0x20, 0x10), ValueError)


def test_minor_version_is_accepted() -> None:
    f = decode_frame(read("version_minor_1_15.bin"))
    assert f.version == 0x1F and f.type is MsgType.BYE


@pytest.mark.parametrize("entry", FRAMES, ids=lambda e: e["file"])
def test_every_truncation_is_a_typed_error(entry: dict) -> None:
    data = read(entry["file"])
    step = max(1, len(data) // 300)  # the 64 KiB frames: a few hundred cut points
    for cut in [*range(0, len(data), step), len(data) - 1]:
        with pytest.raises(TruncatedFrame):
            decode_frame(data[:cut])


def test_every_single_bit_flip_is_detected() -> None:
    data = read("assign_stories260k.bin")
    for i in range(len(data)):
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(ProtocolError):
                decode_frame(bytes(bad))


def test_errors_in_encoding_are_typed() -> None:
    with pytest.raises(BadPayload):
        encode_frame(Frame(MsgType.READY, {"shard_bytes": 1}))  # missing fields
    with pytest.raises(BadPayload):
        encode_frame(Frame(MsgType.ACK, {"acked_seq": 70000, "acked_type": 1}))
    with pytest.raises(BadPayload):
        encode_frame(Frame(MsgType.ERROR, {"code": 1, "text": "x" * 256}))
    with pytest.raises(OversizeFrame):
        encode_frame(Frame(MsgType.WEIGHTS, {"shard_id": 0, "offset": 0, "total": 0,
                                             "sha256": bytes(32), "data": bytes(65536)}))
    with pytest.raises(ProtocolError, match="src"):
        encode_frame(Frame(MsgType.BYE, {"reason": 0}, src=256))
    with pytest.raises(ProtocolError, match="reserved"):
        encode_frame(Frame(MsgType.BYE, {"reason": 0}, flags=0x80))
    with pytest.raises(UnknownType):
        encode_frame(Frame(0x7F, {}))  # type: ignore[arg-type]
    with pytest.raises(VersionMismatch):
        encode_frame(Frame(MsgType.BYE, {"reason": 0}, version=0x20))


def test_reserved_flags_are_accepted_on_receipt() -> None:
    data = bytearray(read("bye.bin"))
    data[3] |= 0x80
    body = bytes(data[:-4])
    f = decode_frame(body + zlib.crc32(body).to_bytes(4, "little"))
    assert f.flags & 0x80 and f.dst == BROADCAST


def test_error_classes_map_to_distinct_statuses() -> None:
    classes = [BadMagic, VersionMismatch, TruncatedFrame, BadLength, BadCrc, UnknownType,
               OversizeFrame, BadPayload]
    assert len({c.status for c in classes}) == len(classes)
    assert all(issubclass(c, ProtocolError) and issubclass(c, ValueError) for c in classes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(MsgType)), st.binary(max_size=120))
def test_random_payloads_with_valid_crc_give_bad_payload_or_decode(t: MsgType, payload: bytes) -> None:
    head = bytes([0xA7, 0x10, t, 0, 1, 2, 3, 0, 4, 0]) + len(payload).to_bytes(2, "little")
    data = _with_crc(head + payload)
    try:
        f = decode_frame(data)
    except BadPayload:
        return
    # Whatever decodes re-encodes to the same bytes (except signalling-NaN floats, which
    # Python's float conversion quiets).
    if not _has_nan(f.payload):
        assert encode_frame(f) == data


def _has_nan(obj: object) -> bool:
    if isinstance(obj, float):
        return obj != obj
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_nan(v) for v in obj)
    return False
