"""The peer core (firmware/lib/tpfed/src/peer.c), driven frame by frame through the in-memory
HAL (firmware/ports/host/mem_peer.c): the desktop peer, the boards and the coordinator's own
share all run this code. Whatever one frame holds, the core answers with ERROR or drops it
(and counts it), and never crashes."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.compute._native import lib
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.fastpath import decode_partial, encode_activation
from tpfed.protocol.schema import (
    BATTERY_UNKNOWN,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    MsgType,
    Stage,
)

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import quantize_q8_0
from tpfed.compute.share import DeviceShards, serialize_layer_share
from tpfed.runtime.peer_core import DeviceInfo, MemPeer, PeerConfig

HELLO = {"device_class": 0, "name": "test", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
         "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": BATTERY_UNKNOWN,
         "temperature_dc": TEMPERATURE_UNKNOWN, "transports": 0, "max_frame": 65535, "arena_kb": 0}
SEQ_LEN = 16
SHARE = {0: ((1, 3), ((0, 64), (128, 172))), 2: ((0,), ())}
GRANULE = lib.TPFED_WEIGHTS_GRANULE


@pytest.fixture(scope="module")
def q8(stories260k_dir):
    return Q8Model.load(stories260k_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def blobs(q8):
    return {layer: serialize_layer_share(q8, layer, g, r) for layer, (g, r) in SHARE.items()}


def new_peer(arena_bytes: int = 8 << 20, hello: bool = True, **cfg) -> MemPeer:
    """A core with the in-memory HAL; greeted as device 1 unless hello is false (a peer takes
    frames addressed to it, or broadcast, once a HELLO or ASSIGN has named it)."""
    peer = MemPeer(DeviceInfo("unit-peer", ram_bytes=1 << 30, cores=4),
                   arena_bytes, PeerConfig(int8_macs=123_456_789, **cfg), manual_clock=True)
    if hello:
        assert one(peer.handle(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1)))).type == MsgType.HELLO
    return peer


def one(replies: list[bytes]) -> Frame:
    assert len(replies) == 1, replies
    return decode_frame(replies[0])


def types(replies: list[bytes]) -> list[MsgType]:
    return [decode_frame(r).type for r in replies]


def assign_frame(config, entries, seq_len=SEQ_LEN, session=5, **geometry) -> bytes:
    c = config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
               "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": seq_len,
               "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
               "entries": [{"layer": layer, "kv_groups": list(g),
                            "mlp_ranges": [{"start": a, "end": b} for a, b in r]}
                           for layer, (g, r) in sorted(entries.items())]}
    payload.update(geometry)
    return encode_frame(Frame(MsgType.ASSIGN, payload, dst=1, session=session))


def weights_frame(layer, blob, off, n, session=5, digest=None) -> bytes:
    return encode_frame(Frame(MsgType.WEIGHTS, {
        "shard_id": layer, "offset": off, "total": len(blob),
        "sha256": digest or hashlib.sha256(blob).digest(), "data": blob[off:off + n]},
        dst=1, session=session))


def chunks(blob, size=10 * GRANULE):
    return [(off, size) for off in range(0, len(blob), size)]


def ready_peer(q8, blobs, session=5) -> MemPeer:
    peer = new_peer()
    assert one(peer.handle(assign_frame(q8.config, SHARE, session=session))).type == MsgType.ACK
    out = []
    for layer, blob in blobs.items():
        for off, n in chunks(blob):
            out += peer.handle(weights_frame(layer, blob, off, n, session=session))
    assert types(out) == [MsgType.ACK, MsgType.ACK, MsgType.READY]
    assert peer.ready and peer.layers_held == 2
    return peer


def activation(q8, stage=0, layer=0, session=5, pos=0, seed=0) -> tuple[bytes, object]:
    xf = np.random.default_rng(seed).standard_normal(q8.config.dim).astype(np.float32)
    x = quantize_q8_0(xf)
    return encode_activation(layer, stage, pos, x.qs, x.d, dst=1, session=session), x


def host_units(q8):
    class View:
        config = replace(q8.config, seq_len=SEQ_LEN)
        attention_unit = staticmethod(q8.attention_unit)
        mlp_unit = staticmethod(q8.mlp_unit)

    return DeviceShards(View(), SHARE)


# ----------------------------------------------------------------------------- session


def test_hello_announces_the_device():
    peer = new_peer(arena_bytes=4 << 20, hello=False)
    h = one(peer.handle(encode_frame(Frame(MsgType.HELLO, HELLO, dst=7))))
    assert (h.type, h.src, h.dst) == (MsgType.HELLO, 7, 0)
    p = h.payload
    assert p["name"] == "unit-peer" and p["device_class"] == DeviceClass.DESKTOP
    assert p["int8_macs"] == 123_456_789 and p["max_frame"] == 65535
    assert p["ram_kb"] == 1 << 20 and p["cores"] == 4
    assert 0 < p["arena_kb"] * 1024 < 4 << 20
    assert peer.device_id == 7


def test_partials_are_bit_identical_to_the_single_device_units(q8, blobs):
    peer = ready_peer(q8, blobs)
    host = host_units(q8)
    for pos in range(4):
        for layer in SHARE:
            stages = [s for s, held in ((Stage.ATTENTION, SHARE[layer][0]), (Stage.MLP, SHARE[layer][1])) if held]
            for stage in stages:
                frame, x = activation(q8, stage=stage, layer=layer, pos=pos, seed=10 * pos + layer)
                p = decode_partial(peer.handle(frame)[0])
                assert (p.layer, p.stage, p.pos, p.n, p.src, p.dst) == (layer, stage, pos, q8.config.dim, 1, 0)
                want = host.attention(layer, x, pos) if stage == Stage.ATTENTION else host.mlp(layer, x)
                assert p.values.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    assert peer.stats()["activations"] == 4 * 3


def test_weights_out_of_order_and_duplicated_are_assembled(q8, blobs):
    peer = new_peer()
    assert one(peer.handle(assign_frame(q8.config, SHARE))).type == MsgType.ACK
    rng = np.random.default_rng(3)
    out = []
    for layer, blob in blobs.items():
        parts = chunks(blob, 3 * GRANULE)
        order = list(rng.permutation(len(parts))) + list(rng.choice(len(parts), 5))  # repeats
        for i in order[:-1]:
            out += peer.handle(weights_frame(layer, blob, *parts[i]))
        # a chunk overlapping two others, on granules, also counts once
        out += peer.handle(weights_frame(layer, blob, GRANULE, 4 * GRANULE))
        out += peer.handle(weights_frame(layer, blob, *parts[order[-1]]))
    assert types(out) == [MsgType.ACK, MsgType.ACK, MsgType.READY]
    ready = decode_frame(out[-1]).payload
    assert ready["shard_bytes"] == sum(len(b) for b in blobs.values())
    assert ready["arena_used"] == peer.arena_used and ready["arena_free"] == peer.arena_size - peer.arena_used


def test_repeated_last_chunk_of_a_held_share_is_acked_again(q8, blobs):
    peer = ready_peer(q8, blobs)
    blob = blobs[2]
    assert peer.handle(weights_frame(2, blob, 0, GRANULE)) == []
    (off, n) = chunks(blob)[-1]
    assert types(peer.handle(weights_frame(2, blob, off, n))) == [MsgType.ACK, MsgType.READY]
    assert peer.ready


def test_chunk_off_the_granules_is_refused(q8, blobs):
    peer = new_peer()
    peer.handle(assign_frame(q8.config, SHARE))
    err = one(peer.handle(weights_frame(0, blobs[0], 10, GRANULE)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_PAYLOAD


def test_corrupted_share_is_refused_then_the_good_one_taken(q8, blobs):
    peer = new_peer()
    peer.handle(assign_frame(q8.config, {2: SHARE[2]}))
    blob = blobs[2]
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    out = []
    for off, n in chunks(blob):
        out += peer.handle(weights_frame(2, bytes(bad), off, n, digest=hashlib.sha256(blob).digest()))
    err = one(out)
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.SHARD_HASH_MISMATCH
    assert "layer 2" in err.payload["text"]
    out = []
    for off, n in chunks(blob):
        out += peer.handle(weights_frame(2, blob, off, n))
    assert types(out) == [MsgType.ACK, MsgType.READY]


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"stage": 7}, ErrorCode.NOT_ASSIGNED),
    ({"layer": 3}, ErrorCode.NOT_ASSIGNED),
    ({"layer": 2, "stage": 1}, ErrorCode.NOT_ASSIGNED),  # layer 2 holds attention only
    ({"session": 6}, ErrorCode.BAD_SESSION),
    ({"pos": SEQ_LEN}, ErrorCode.BAD_PAYLOAD),  # beyond the assigned seq_len
])
def test_bad_activations_get_an_error(q8, blobs, kwargs, code):
    peer = ready_peer(q8, blobs)
    err = one(peer.handle(activation(q8, **kwargs)[0]))
    assert err.type == MsgType.ERROR and err.payload["code"] == code
    assert peer.ready


def test_bye_of_another_session_is_ignored(q8, blobs):
    peer = ready_peer(q8, blobs)
    dropped = peer.stats()["dropped"]
    assert peer.handle(encode_frame(Frame(MsgType.BYE, {"reason": 0}, dst=1, session=9))) == []
    assert peer.ready and peer.stats()["dropped"] == dropped + 1
    assert peer.handle(encode_frame(Frame(MsgType.BYE, {"reason": 0}, dst=1, session=5))) == []
    assert not peer.ready and peer.layers_assigned == 0
    err = one(peer.handle(activation(q8)[0]))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_STATE


def test_heartbeat_and_probe(q8):
    peer = new_peer()
    peer.now_ms = 4242
    hb = one(peer.handle(encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=1))))
    assert hb.type == MsgType.HEARTBEAT and hb.payload["uptime_ms"] == 4242
    probe = {"nonce": 77, "t_send_us": 123456789, "pad": bytes(range(256)) * 40}
    reply = one(peer.handle(encode_frame(Frame(MsgType.PROBE, probe, dst=1, seq=999))))
    assert reply.type == MsgType.PROBE_REPLY and reply.seq == 999 and reply.payload == probe


# ----------------------------------------------------------------------------- ASSIGN checks


@pytest.mark.parametrize("entries", [
    {0: ((9, 3, 3), ())},           # groups out of range and repeated
    {0: ((3, 1), ())},              # not ascending
    {0: ((), ((5, 999),))},         # unaligned and beyond hidden_dim
    {0: ((), ((0, 64), (32, 96)))},  # overlapping
    {7: ((0,), ())},                # no such layer
])
def test_malformed_assignments_are_bad_payload(q8, blobs, entries):
    peer = ready_peer(q8, blobs)
    err = one(peer.handle(assign_frame(q8.config, entries, session=6)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_PAYLOAD, err.payload
    assert peer.ready and peer.session == 5  # the assignment held stays


def test_layer_named_twice_is_bad_payload(q8):
    peer = new_peer()
    c = q8.config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
               "n_kv_heads": c.n_kv_heads, "seq_len": 8, "norm_eps": c.norm_eps,
               "rope_theta": c.rope_theta,
               "entries": [{"layer": 1, "kv_groups": [0], "mlp_ranges": []}] * 2}
    err = one(peer.handle(encode_frame(Frame(MsgType.ASSIGN, payload, dst=1, session=1))))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_PAYLOAD
    assert "twice" in err.payload["text"]


def test_assignment_larger_than_the_arena_is_out_of_memory(q8, blobs):
    peer = ready_peer(q8, blobs)
    c = q8.config
    everything = {layer: (tuple(range(c.n_kv_heads)), ((0, c.hidden_dim),)) for layer in range(c.n_layers)}
    err = one(peer.handle(assign_frame(c, everything, seq_len=1 << 16 - 1, session=6)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.OUT_OF_MEMORY
    assert "arena" in err.payload["text"]
    assert peer.ready and peer.session == 5
    small = new_peer(arena_bytes=200_000)
    err = one(small.handle(assign_frame(c, everything, seq_len=64)))
    assert err.payload["code"] == ErrorCode.OUT_OF_MEMORY
    assert one(small.handle(assign_frame(c, {0: ((0,), ())}, seq_len=64))).type == MsgType.ACK


@pytest.mark.parametrize("geometry", [
    # sizes whose products wrap around 32 bits: must be refused, not laid out
    {"dim": 65504, "hidden_dim": 0x7FFFFFE0, "n_heads": 1, "n_kv_heads": 1, "seq_len": 65535},
    {"dim": 4096, "hidden_dim": 0x7FFFFFE0, "n_heads": 1, "n_kv_heads": 1, "seq_len": 65535},
    {"dim": 2048, "hidden_dim": 1 << 20, "n_heads": 1, "n_kv_heads": 1, "seq_len": 65535},
])
def test_huge_geometries_are_refused(geometry):
    peer = new_peer()
    base = {"n_layers": 1, "norm_eps": 1e-5, "rope_theta": 1e4}
    ranges = [{"start": 0, "end": geometry["hidden_dim"]}]
    payload = {**base, **geometry, "entries": [{"layer": 0, "kv_groups": [0], "mlp_ranges": ranges}]}
    err = one(peer.handle(encode_frame(Frame(MsgType.ASSIGN, payload, dst=1, session=1))))
    assert err.type == MsgType.ERROR
    assert err.payload["code"] in (ErrorCode.UNSUPPORTED, ErrorCode.OUT_OF_MEMORY), err.payload
    assert peer.layers_assigned == 0


def test_too_many_groups_for_the_config_is_unsupported(q8):
    peer = new_peer(max_groups=1)
    err = one(peer.handle(assign_frame(q8.config, {0: ((0, 1), ())})))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.UNSUPPORTED


def test_assign_whose_frames_do_not_fit_is_refused():
    peer = new_peer()
    assign = {"dim": 16384, "hidden_dim": 64, "n_layers": 1, "n_heads": 128, "n_kv_heads": 128,
              "seq_len": 16, "norm_eps": 1e-5, "rope_theta": 1e4, "entries": []}
    err = one(peer.handle(encode_frame(Frame(MsgType.ASSIGN, assign, dst=1, session=1))))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.UNSUPPORTED
    assert "needs frames of" in err.payload["text"]


def test_arena_below_the_minimum_is_refused():
    from tpfed.errors import TpfedError
    from tpfed.runtime.peer_core import arena_min_bytes

    with pytest.raises(TpfedError, match="at least"):
        new_peer(arena_bytes=arena_min_bytes() - 1, hello=False)


# ----------------------------------------------------------------------------- never crashes


@pytest.fixture(scope="module")
def shared_ready_peer(q8, blobs):
    return ready_peer(q8, blobs)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_crashes_and_replies_are_well_formed(shared_ready_peer, data):
    peer = shared_ready_peer
    for reply in peer.handle(data):
        decode_frame(reply)  # whatever the peer sends back is a valid frame
    assert peer.ready  # and it still serves


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_frames_never_crash(shared_ready_peer, q8, blobs, data):
    peer = shared_ready_peer
    base = data.draw(st.sampled_from([
        activation(q8)[0], activation(q8, stage=1)[0],
        weights_frame(0, blobs[0], 0, 4 * GRANULE),
        encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=1)),
    ]))
    frame = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    for reply in peer.handle(bytes(frame[:cut])):
        decode_frame(reply)


@settings(max_examples=200, deadline=None)
@given(layer=st.integers(0, 65535), stage=st.integers(0, 255), pos=st.integers(0, 65535),
       n=st.integers(0, 200))
def test_any_valid_activation_frame_gets_one_answer(shared_ready_peer, layer, stage, pos, n):
    x = quantize_q8_0(np.ones(n, np.float32)) if n else None
    qs = x.qs if x is not None else np.zeros(0, np.int8)
    d = x.d if x is not None else np.zeros(0, np.uint16)
    replies = shared_ready_peer.handle(encode_activation(layer, stage, pos, qs, d, dst=1, session=5))
    assert len(replies) == 1
    assert decode_frame(replies[0]).type in (MsgType.PARTIAL, MsgType.ERROR)


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(0, 70000), hidden=st.integers(0, 2**32 - 1), heads=st.integers(0, 300),
       kv=st.integers(0, 300), seq_len=st.integers(0, 70000), layers=st.integers(0, 300),
       groups=st.lists(st.integers(0, 300), max_size=6),
       ranges=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4))
def test_any_assign_is_answered_once_and_never_crashes(dim, hidden, heads, kv, seq_len, layers,
                                                       groups, ranges):
    peer = new_peer(arena_bytes=1 << 20)
    payload = {"dim": dim, "hidden_dim": hidden, "n_layers": layers, "n_heads": heads,
               "n_kv_heads": kv, "seq_len": seq_len, "norm_eps": 1e-5, "rope_theta": 1e4,
               "entries": [{"layer": 0, "kv_groups": groups,
                            "mlp_ranges": [{"start": a, "end": b} for a, b in ranges]}]}
    try:
        frame = encode_frame(Frame(MsgType.ASSIGN, payload, dst=1, session=1))
    except Exception:  # outside what the schema can encode (u16 fields)
        return
    reply = one(peer.handle(frame))
    assert reply.type in (MsgType.ACK, MsgType.ERROR)
