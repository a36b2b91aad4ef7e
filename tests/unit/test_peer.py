"""The desktop peer's state machine, driven directly: whatever one frame holds, ``handle``
answers with ERROR or drops it (and counts it), and never raises."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.fastpath import decode_partial, encode_activation
from tpfed.protocol.schema import BATTERY_UNKNOWN, TEMPERATURE_UNKNOWN, ErrorCode, MsgType

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import quantize_q8_0
from tpfed.compute.share import serialize_layer_share
from tpfed.runtime.desktop_peer import Capabilities, DesktopPeer

HELLO = {"device_class": 0, "name": "test", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
         "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": BATTERY_UNKNOWN,
         "temperature_dc": TEMPERATURE_UNKNOWN, "transports": 0, "max_frame": 65535, "arena_kb": 0}


@pytest.fixture(scope="module")
def q8(stories260k_dir):
    return Q8Model.load(stories260k_dir / "stories260K.bin")


def ready_peer(q8, session=5) -> DesktopPeer:
    c = q8.config
    peer = DesktopPeer(Capabilities("p", int8_macs=1, ram_bytes=1 << 30, arena_bytes=1 << 30))
    assert decode_frame(peer.handle(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1)))[0]).type == MsgType.HELLO
    assign = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
              "n_kv_heads": c.n_kv_heads, "seq_len": 16, "norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta,
              "entries": [{"layer": 0, "kv_groups": [1], "mlp_ranges": [{"start": 0, "end": 64}]}]}
    assert decode_frame(peer.handle(encode_frame(Frame(MsgType.ASSIGN, assign, dst=1,
                                                       session=session)))[0]).type == MsgType.ACK
    blob = serialize_layer_share(q8, 0, (1,), ((0, 64),))
    peer._blob = blob  # for the duplicate-chunk test
    replies = peer.handle(encode_frame(Frame(MsgType.WEIGHTS, {
        "shard_id": 0, "offset": 0, "total": len(blob), "sha256": hashlib.sha256(blob).digest(),
        "data": blob}, dst=1, session=session)))
    assert [decode_frame(r).type for r in replies] == [MsgType.ACK, MsgType.READY]
    assert peer.ready
    return peer


def activation(q8, stage=0, layer=0, session=5, pos=0) -> bytes:
    x = quantize_q8_0(np.linspace(-1, 1, q8.config.dim, dtype=np.float32))
    return encode_activation(layer, stage, pos, x.qs, x.d, dst=1, session=session)


def test_activation_is_answered_with_a_partial(q8):
    peer = ready_peer(q8)
    for stage in (0, 1):
        (reply,) = peer.handle(activation(q8, stage=stage))
        p = decode_partial(reply)
        assert (p.layer, p.stage, p.n, p.src) == (0, stage, q8.config.dim, 1)
        assert np.isfinite(p.values).all() and np.abs(p.values).max() > 0


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"stage": 7}, ErrorCode.BAD_PAYLOAD),
    ({"layer": 3}, ErrorCode.NOT_ASSIGNED),
    ({"session": 6}, ErrorCode.BAD_SESSION),
    ({"pos": 16}, ErrorCode.BAD_PAYLOAD),  # beyond the assigned seq_len
])
def test_bad_activations_get_an_error_not_an_exception(q8, kwargs, code):
    peer = ready_peer(q8)
    (reply,) = peer.handle(activation(q8, **kwargs))
    err = decode_frame(reply)
    assert err.type == MsgType.ERROR and err.payload["code"] == code


def test_bye_of_another_session_is_ignored(q8):
    peer = ready_peer(q8)
    assert peer.handle(encode_frame(Frame(MsgType.BYE, {"reason": 0}, dst=1, session=9))) == []
    assert peer.ready and peer.stats.dropped == 1
    peer.handle(encode_frame(Frame(MsgType.BYE, {"reason": 0}, dst=1, session=5)))
    assert not peer.ready


def test_late_duplicate_chunk_of_a_complete_shard_is_ignored(q8):
    peer = ready_peer(q8)
    blob = peer._blob
    dup = encode_frame(Frame(MsgType.WEIGHTS, {
        "shard_id": 0, "offset": 0, "total": len(blob), "sha256": hashlib.sha256(blob).digest(),
        "data": blob[:100]}, dst=1, session=5))
    assert peer.handle(dup) == []
    assert peer._assembly == {} and peer.ready


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_raises_and_replies_are_well_formed(q8, data):
    peer = ready_peer(q8)
    for reply in peer.handle(data):
        decode_frame(reply)  # whatever the peer sends back is a valid frame
    assert peer.ready  # and it still serves


@settings(max_examples=200, deadline=None)
@given(layer=st.integers(0, 65535), stage=st.integers(0, 255), pos=st.integers(0, 65535),
       n=st.integers(0, 200))
def test_any_valid_activation_frame_never_raises(q8, layer, stage, pos, n):
    peer = ready_peer(q8)
    x = quantize_q8_0(np.ones(n, np.float32)) if n else None
    qs = x.qs if x is not None else np.zeros(0, np.int8)
    d = x.d if x is not None else np.zeros(0, np.uint16)
    replies = peer.handle(encode_activation(layer, stage, pos, qs, d, dst=1, session=5))
    assert len(replies) == 1


def test_assign_whose_frames_do_not_fit_is_refused():
    peer = DesktopPeer(Capabilities("p", int8_macs=1, ram_bytes=1 << 30, arena_bytes=1 << 30))
    peer.handle(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1)))
    assign = {"dim": 16384, "hidden_dim": 64, "n_layers": 1, "n_heads": 128, "n_kv_heads": 128,
              "seq_len": 16, "norm_eps": 1e-5, "rope_theta": 1e4, "entries": []}
    (reply,) = peer.handle(encode_frame(Frame(MsgType.ASSIGN, assign, dst=1, session=1)))
    err = decode_frame(reply)
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.UNSUPPORTED
    assert "needs frames of" in err.payload["text"]
