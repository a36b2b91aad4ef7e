"""Hot-path ACTIVATION/PARTIAL codecs equal the construct path byte for byte."""

from __future__ import annotations

import timeit
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tpfed.protocol import (
    BadPayload,
    Frame,
    MsgType,
    OversizeFrame,
    PartialEncoding,
    ProtocolError,
    UnexpectedType,
    decode_activation,
    decode_frame,
    decode_partial,
    encode_activation,
    encode_frame,
    encode_partial,
)
from tpfed.protocol.golden_data import entries, read

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
headers = st.fixed_dictionaries({"src": u8, "dst": u8, "seq": u16, "session": u16,
                                 "flags": st.sampled_from([0, 1, 2, 3])})


def q8_arrays(n: int) -> st.SearchStrategy:
    nb = (n + 31) // 32
    return st.tuples(hnp.arrays(np.int8, n), hnp.arrays(np.uint16, nb))


q8_pairs = st.integers(0, 130).flatmap(q8_arrays)


@settings(max_examples=80, deadline=None)
@given(q8_pairs, u16, st.sampled_from([0, 1]), u16, headers)
def test_activation_fast_equals_construct(pair, layer, stage, pos, h) -> None:
    qs, scales = pair
    fast = encode_activation(layer, stage, pos, qs, scales, **h)
    slow = encode_frame(Frame(MsgType.ACTIVATION, {"layer": layer, "stage": stage, "pos": pos,
                                                   "scales": scales.tolist(), "qs": qs.tolist()}, **h))
    assert fast == slow
    v = decode_activation(slow)
    assert (v.layer, v.stage, v.pos, v.n) == (layer, stage, pos, len(qs))
    assert (v.src, v.dst, v.seq, v.session, v.flags) == (h['src'], h['dst'], h['seq'], h['session'], h['flags'])
    assert np.array_equal(v.qs, qs) and np.array_equal(v.scales, scales)


@settings(max_examples=80, deadline=None)
@given(st.one_of(
    hnp.arrays(np.float32, st.integers(0, 100), elements=st.floats(width=32, allow_nan=False)),
    hnp.arrays(np.float16, st.integers(0, 100), elements=st.floats(width=16, allow_nan=False)),
    q8_pairs,
), u16, st.sampled_from([0, 1]), u16, headers)
def test_partial_fast_equals_construct(values, layer, stage, pos, h) -> None:
    fast = encode_partial(layer, stage, pos, values, **h)
    if isinstance(values, tuple):
        enc = PartialEncoding.Q8_0
        data: object = {"scales": values[1].tolist(), "qs": values[0].tolist()}
    elif values.dtype == np.float32:
        enc, data = PartialEncoding.F32, values.tolist()
    else:
        enc, data = PartialEncoding.F16, values.view(np.uint16).tolist()
    slow = encode_frame(Frame(MsgType.PARTIAL, {"layer": layer, "stage": stage, "pos": pos,
                                                "encoding": enc, "data": data}, **h))
    assert fast == slow
    v = decode_partial(slow)
    assert (v.layer, v.stage, v.pos, v.encoding) == (layer, stage, pos, enc)
    if enc == PartialEncoding.Q8_0:
        assert np.array_equal(v.qs, values[0]) and np.array_equal(v.scales, values[1])
    else:
        assert v.values.dtype == values.dtype and np.array_equal(v.values, values)


@pytest.mark.parametrize("entry", entries("frame"), ids=lambda e: e["file"])
def test_fast_decoders_on_golden_frames(entry: dict) -> None:
    data = read(entry["file"])
    want = decode_frame(data)
    if want.type is MsgType.ACTIVATION:
        v = decode_activation(data)
        assert v.qs.tolist() == want.payload["qs"] and v.scales.tolist() == want.payload["scales"]
    elif want.type is MsgType.PARTIAL:
        v = decode_partial(data)
        d = want.payload["data"]
        if v.encoding == PartialEncoding.Q8_0:
            assert v.qs.tolist() == d["qs"] and v.scales.tolist() == d["scales"]
        elif v.encoding == PartialEncoding.F16:
            assert v.values.view(np.uint16).tolist() == d
        else:
            assert v.values.tolist() == d
    else:
        with pytest.raises(UnexpectedType):
            decode_activation(data)
        with pytest.raises(UnexpectedType):
            decode_partial(data)


@pytest.mark.parametrize("entry", entries("invalid"), ids=lambda e: e["file"])
def test_fast_decoders_raise_the_same_errors(entry: dict) -> None:
    data = read(entry["file"])
    mp = entry.get("max_payload", 0xFFFF)
    with pytest.raises(ProtocolError) as slow:
        decode_frame(data, mp)
    for fast in (decode_activation, decode_partial):
        try:
            fast(data, mp)
        except ProtocolError as e:
            assert type(e) is type(slow.value) or isinstance(e, UnexpectedType)
        else:
            pytest.fail(f"{fast.__name__} accepted {entry['file']}")


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0x10, 0x11]), st.binary(max_size=90), st.booleans())
def test_fast_decode_agrees_with_construct_on_random_payloads(t, payload, crc_ok) -> None:
    body = bytes([0xA7, 0x10, t, 0, 1, 2, 3, 0, 4, 0]) + len(payload).to_bytes(2, "little") + payload
    data = _with_crc(body) if crc_ok else body + b"\0\0\0\0"
    fast = decode_activation if t == 0x10 else decode_partial
    try:
        want = decode_frame(data)
    except ProtocolError as e:
        with pytest.raises(type(e)):
            fast(data)
        return
    got = fast(data)
    assert got.n == want.payload["n"]


def test_fast_encoders_reject_bad_arrays() -> None:
    qs = np.zeros(64, np.int8)
    with pytest.raises(BadPayload):
        encode_activation(0, 0, 0, qs.astype(np.int16), np.zeros(2, np.uint16))
    with pytest.raises(BadPayload):
        encode_activation(0, 0, 0, qs, np.zeros(3, np.uint16))
    with pytest.raises(BadPayload):
        encode_activation(70000, 0, 0, qs, np.zeros(2, np.uint16))
    with pytest.raises(OversizeFrame):
        encode_activation(0, 0, 0, np.zeros(62000, np.int8), np.zeros(1938, np.uint16))
    with pytest.raises(BadPayload):
        encode_partial(0, 0, 0, np.zeros(4, np.float64))
    with pytest.raises(OversizeFrame):
        encode_partial(0, 0, 0, np.zeros(20000, np.float32))
    with pytest.raises(ProtocolError):
        encode_partial(0, 0, 0, np.zeros(4, np.float32), seq=-1)


def test_decoded_views_share_the_frame_buffer() -> None:
    data = encode_partial(1, 1, 2, np.arange(64, dtype=np.float32), src=3)
    v = decode_partial(data)
    assert not v.values.flags.owndata and not v.values.flags.writeable
    assert np.array_equal(v.to_f32(), np.arange(64, dtype=np.float32))
    q = decode_partial(encode_partial(1, 1, 2, (np.full(40, 2, np.int8),
                                                np.array([0x3C00, 0x3800], np.uint16))))
    assert q.to_f32().tolist() == [2.0] * 32 + [1.0] * 8


def test_fast_path_speed() -> None:
    """Generous bound (shared CI machine); the measured figure is printed with -s."""
    qs = np.arange(-32, 32, dtype=np.int8)
    scales = np.array([0x2C00, 0x2E00], np.uint16)
    part = encode_partial(0, 0, 3, np.ones(64, np.float32), src=2, seq=7)
    act = encode_activation(0, 0, 3, qs, scales, seq=7)
    vals = np.ones(64, np.float32)
    n = 20000
    results = {
        "encode_activation": timeit.timeit(lambda: encode_activation(0, 0, 3, qs, scales, seq=7), number=n),
        "decode_partial": timeit.timeit(lambda: decode_partial(part), number=n),
        "decode_activation": timeit.timeit(lambda: decode_activation(act), number=n),
        "encode_partial": timeit.timeit(lambda: encode_partial(0, 0, 3, vals, src=2), number=n),
    }
    for name, t in results.items():
        us = t / n * 1e6
        print(f"{name}: {us:.2f} us/call")
        assert us < 50, f"{name} takes {us:.1f} us"
