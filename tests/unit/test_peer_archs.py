"""The peer core (peer.c) with share flags: every architecture's shares (q/k/v and MLP biases,
a plain GELU MLP, a sliding window, a RoPE table, learned positions, an encoder's KV stage) give
partials bit-identical to the host's units; ASSIGN's flags size the shares, and flags the core
does not know, or a share whose flags are not ASSIGN's, are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from peer_session import KEY, SESSION, AuthedMemPeer
from tpfed.compute._native import ffi, lib
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.fastpath import decode_partial, encode_activation
from tpfed.protocol.schema import ErrorCode, MsgType, ShareFlag, Stage

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import Q8Tensor, quantize_q8_0
from tpfed.compute.share import DeviceShards, serialize_layer_share, share_flags, share_nbytes
from tpfed.model.formats import load_float_model
from tpfed.runtime.peer_core import DeviceInfo, PeerConfig

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
ARCHS = ["llama", "mistral", "qwen2", "gpt2", "bert"]
SEQ_LEN = 12
GRANULE = lib.TPFED_WEIGHTS_GRANULE


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return Q8Model.from_weights(load_float_model(HF / request.param).weights)


def new_peer() -> AuthedMemPeer:
    peer = AuthedMemPeer(DeviceInfo("arch-peer", ram_bytes=1 << 30, cores=1), 8 << 20,
                         PeerConfig(int8_macs=1_000_000, key=KEY), manual_clock=True)
    peer.handshake()
    return peer


def frame(t: MsgType, payload: dict, seq: int = 0) -> bytes:
    return encode_frame(Frame(t, payload, dst=1, session=SESSION, seq=seq))


def assign(c, share, flags) -> bytes:
    return frame(MsgType.ASSIGN, {
        "dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads, "seq_len": SEQ_LEN, "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "flags": flags,
        "entries": [{"layer": layer, "kv_groups": list(g),
                     "mlp_ranges": [{"start": a, "end": b} for a, b in r]}
                    for layer, (g, r) in sorted(share.items())]})


def push(peer, layer, blob) -> list[Frame]:
    out = []
    step = 8 * GRANULE
    for off in range(0, len(blob), step):
        out += peer.handle(frame(MsgType.WEIGHTS, {
            "shard_id": layer, "offset": off, "total": len(blob),
            "sha256": hashlib.sha256(blob).digest(), "data": blob[off:off + step]}))
    return [decode_frame(r) for r in out]


def split(c):
    """Layer 0: the odd KV groups and the second 32-column block (or the last, narrower one)."""
    a = 32 if c.hidden_dim > 32 else 0
    return {0: (tuple(range(1, c.n_groups, 2)), ((a, min(a + 32, c.hidden_dim)),))}


def ready(model) -> tuple[AuthedMemPeer, dict]:
    c = model.config
    share = split(c)
    peer = new_peer()
    flags = share_flags(model.params)
    assert decode_frame(peer.handle(assign(c, share, flags))[0]).type == MsgType.ACK
    (g, r), = share.values()
    blob = serialize_layer_share(model, 0, g, r)
    assert len(blob) == share_nbytes(c, g, r, model.params)
    got = push(peer, 0, blob)
    assert [f.type for f in got] == [MsgType.ACK, MsgType.READY], got
    return peer, share


def act(c, peer, stage, pos, x) -> np.ndarray:
    raw = peer.handle(encode_activation(0, int(stage), pos, x.qs, x.d, dst=1, seq=pos,
                                        session=SESSION))
    assert len(raw) == 1, [decode_frame(r) for r in raw]
    p = decode_partial(raw[0])
    assert (p.layer, p.stage, p.pos) == (0, stage, pos)
    return np.array(p.values, np.float32)


def test_shares_with_flags_give_the_host_units_partials(model):
    c = model.config
    peer, share = ready(model)
    local = DeviceShards(model, share)
    att, mlp = local.layers[0]
    rng = np.random.default_rng(7)
    xs = [quantize_q8_0(rng.standard_normal(c.dim).astype(np.float32)) for _ in range(6)]
    if c.causal:
        for pos, x in enumerate(xs):
            if att is not None:
                assert np.array_equal(act(c, peer, Stage.ATTENTION, pos, x), att.forward(x, pos))
            assert np.array_equal(act(c, peer, Stage.MLP, pos, x), mlp.forward(x))
        return
    # an encoder: every row's k/v (an empty PARTIAL each), then each query over all of them
    rows = Q8Tensor(np.stack([x.qs for x in xs]), np.stack([x.d for x in xs]))
    want = att.forward_rows(rows)
    for pos, x in enumerate(xs):
        assert act(c, peer, Stage.KV, pos, x).size == 0
    for pos, x in enumerate(xs):
        assert np.array_equal(act(c, peer, Stage.ATTENTION, pos, x), want[pos])
    assert np.array_equal(act(c, peer, Stage.MLP, 0, xs[0]), mlp.forward(xs[0]))


def test_the_core_sizes_shares_as_the_host_does(model):
    c = model.config
    flags = share_flags(model.params)
    for g, r in [((0,), ((0, 32),)), (tuple(range(c.n_groups)), ()), ((), ((0, c.hidden_dim),))]:
        flat = ffi.new("uint32_t[]", [v for ab in r for v in ab] or [0])
        assert lib.tpfed_share_bytes_flags(c.dim, c.head_size, c.group_size, len(g), flat, len(r),
                                           flags) == share_nbytes(c, g, r, model.params)


def _error(replies) -> Frame:
    (f,) = [decode_frame(r) for r in replies]
    assert f.type == MsgType.ERROR
    return f


@pytest.mark.parametrize("flags", [0x80, 0x3 << 8, ShareFlag.NO_ROPE | ShareFlag.ROPE_TABLE, 0x8000])
def test_unknown_flags_are_refused_at_assign(flags):
    c = load_float_model(HF / "llama").config
    peer = new_peer()
    err = _error(peer.handle(assign(c, {0: ((0,), ())}, int(flags))))
    assert err.payload["code"] == ErrorCode.UNSUPPORTED and "flags" in err.payload["text"]
    assert peer.state == lib.TPFED_PEER_IDLE


def test_a_share_whose_flags_are_not_assigns_is_refused():
    q = Q8Model.from_weights(load_float_model(HF / "qwen2").weights)
    c = q.config
    g, r = (0,), ()
    blob = bytearray(serialize_layer_share(q, 0, g, r))
    peer = new_peer()
    # ASSIGN says the share has no q/k/v biases: the blob is too long for that, and refused
    flags = share_flags(q.params) & ~ShareFlag.QKV_BIAS
    assert decode_frame(peer.handle(assign(c, {0: (g, r)}, flags))[0]).type == MsgType.ACK
    got = push(peer, 0, bytes(blob))
    assert got[-1].type == MsgType.ERROR and got[-1].payload["code"] == ErrorCode.BAD_PAYLOAD
    # the same size but another flag word in the header: refused once whole
    peer = new_peer()
    flags = share_flags(q.params)
    assert decode_frame(peer.handle(assign(c, {0: (g, r)}, flags))[0]).type == MsgType.ACK
    blob[30:32] = int(flags ^ ShareFlag.NONCAUSAL).to_bytes(2, "little")
    got = push(peer, 0, bytes(blob))
    assert got[-1].type == MsgType.ERROR and "flags" in got[-1].payload["text"]
    assert peer.state != lib.TPFED_PEER_READY
