"""COBS stream framing (resync, bounds) and datagram fragmentation (loss, dupes, reorder)."""

from __future__ import annotations

import random

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol import DatagramFramer, Frame, MsgType, OversizeFrame, StreamFramer, encode_frame
from tpfed.protocol.golden_data import entries, read

STREAMS = entries("cobs_stream")
FRAGS = entries("fragments")


def _frame(n: int, seq: int = 0) -> bytes:
    return encode_frame(Frame(MsgType.PROBE, {"nonce": seq, "t_send_us": 0, "pad": bytes(range(256)) * (n // 256) + bytes(n % 256)}, seq=seq & 0xFFFF))


@pytest.mark.parametrize("entry", STREAMS, ids=lambda e: e["file"])
def test_golden_stream_whole_and_bytewise(entry: dict) -> None:
    data = read(entry["file"])
    want = [read(f) for f in entry["frames"]]
    whole = StreamFramer()
    assert whole.feed(data) == want
    assert whole.stats.dropped == entry["dropped"]
    bytewise = StreamFramer()
    got = [f for i in range(len(data)) for f in bytewise.feed(data[i:i + 1])]
    assert got == want and bytewise.stats.dropped == entry["dropped"]


def test_stream_encode_matches_cobs_and_has_no_zero_inside() -> None:
    f = read("activation_dim64.bin")
    enc = StreamFramer.encode(f)
    assert enc == cobs.encode(f) + b"\x00" and b"\x00" not in enc[:-1]


def test_stream_bounds_its_buffer_and_resyncs() -> None:
    s = StreamFramer(max_frame=300)
    junk = bytes(range(1, 256)) * 10  # 2550 bytes without a delimiter
    assert s.feed(junk) == []
    assert len(s._buf) <= s._max_encoded and s.stats.overflows == 1
    good = _frame(100)
    assert s.feed(b"\x00" + StreamFramer.encode(good)) == [good]
    big = _frame(400)  # longer than max_frame: dropped, next one still arrives
    assert s.feed(StreamFramer.encode(big) + StreamFramer.encode(good)) == [good]
    assert s.stats.dropped == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(1, 64), st.randoms())
def test_stream_survives_garbage_between_frames(garbage, chunk, rnd) -> None:
    frames = [_frame(rnd.randrange(0, 300), i) for i in range(len(garbage))]
    stream = b"".join(g + b"\x00" + StreamFramer.encode(f) for g, f in zip(garbage, frames, strict=True))
    s = StreamFramer()
    got = [f for i in range(0, len(stream), chunk) for f in s.feed(stream[i:i + chunk])]
    assert got == frames


@pytest.mark.parametrize("entry", FRAGS, ids=lambda e: e["file"])
def test_golden_fragments_split_and_reassemble(entry: dict) -> None:
    frame = read(entry["frame"])
    blob = read(entry["file"])
    parts, off = [], 0
    for n in entry["sizes"]:
        parts.append(blob[off:off + n])
        off += n
    assert DatagramFramer(mtu=entry["mtu"], first_id=entry["first_id"]).split(frame) == parts
    assert all(len(p) <= entry["mtu"] for p in parts)
    rx = DatagramFramer(mtu=entry["mtu"])
    shuffled = parts + parts[::3]  # duplicates
    random.Random(7).shuffle(shuffled)
    out = [f for p in shuffled if (f := rx.feed(p, "peer")) is not None]
    assert out == [frame] and rx.in_flight == 0 and rx.buffered_bytes == 0
    assert rx.stats.duplicates == len(shuffled) - len(parts)


def test_small_frame_goes_unchanged() -> None:
    f = read("ack.bin")
    d = DatagramFramer(mtu=100)
    assert d.split(f) == [f]
    assert d.feed(f) == f


@settings(max_examples=60, deadline=None)
@given(st.integers(20, 3000), st.integers(40, 600), st.randoms(), st.floats(0, 0.3))
def test_fragments_with_loss_duplication_reorder(size, mtu, rnd, loss) -> None:
    tx = DatagramFramer(mtu=mtu)
    frames = [_frame(size + i, i) for i in range(3)]
    try:
        sent = [(i, p) for i, f in enumerate(frames) for p in tx.split(f)]
    except OversizeFrame:
        return
    kept = [x for x in sent if rnd.random() >= loss]
    kept += rnd.sample(kept, len(kept) // 4)
    rnd.shuffle(kept)
    clock = [0.0]
    rx = DatagramFramer(mtu=mtu, clock=lambda: clock[0], timeout=1.0)
    got = [f for _, p in kept if (f := rx.feed(p, ("h", 1))) is not None]
    complete = {i for i in range(3) if {p for j, p in sent if j == i} <= {p for j, p in kept if j == i}}
    assert sorted(got) == sorted(frames[i] for i in complete)
    clock[0] = 5.0  # everything incomplete expires on the next datagram
    rx.feed(b"\x01junk", ("h", 1))
    assert rx.in_flight == 0 and rx.buffered_bytes == 0


def test_reassembly_caps_frames_in_flight_and_bytes() -> None:
    tx = DatagramFramer(mtu=100)
    rx = DatagramFramer(mtu=100, max_in_flight=4, max_bytes=2000)
    firsts = [tx.split(_frame(500, i))[0] for i in range(10)]
    for p in firsts:
        assert rx.feed(p, "a") is None
    assert rx.in_flight <= 4 and rx.buffered_bytes <= 2000 and rx.stats.evicted == 6
    # Sources are kept apart: the same frame_id from two senders does not mix.
    a, b = DatagramFramer(mtu=100, first_id=5), DatagramFramer(mtu=100, first_id=5)
    fa, fb = _frame(300, 1), _frame(300, 2)
    pa, pb = a.split(fa), b.split(fb)
    rx2 = DatagramFramer(mtu=100)
    out = [f for x, y in zip(pa, pb, strict=True) for f in (rx2.feed(x, "A"), rx2.feed(y, "B")) if f]
    assert out == [fa, fb]


def test_bad_datagrams_are_dropped_and_counted() -> None:
    rx = DatagramFramer(mtu=100)
    bad = bytearray(read("ack.bin"))
    bad[-1] ^= 1
    for d in (b"", b"\x00\x01", bytes(bad), b"\xa8\x00\x00\x05\x03x", b"\xa8\x00\x00\x00\x00x", b"\xa8\x00"):
        assert rx.feed(bytes(d)) is None
    assert rx.stats.dropped == 6


def test_oversize_for_mtu() -> None:
    with pytest.raises(OversizeFrame):
        DatagramFramer(mtu=20).split(bytes(20 * 300))
    with pytest.raises(ValueError):
        DatagramFramer(mtu=10)
