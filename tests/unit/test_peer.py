"""The peer core (firmware/lib/tpfed/src/peer.c), driven frame by frame through the in-memory
HAL (firmware/ports/host/mem_peer.c): the desktop peer, the boards and the coordinator's own
share all run this code. Whatever one frame holds, the core answers with ERROR or drops it
(and counts it), and never crashes.

Every test runs an authenticated session (DESIGN: Security): the core holds the federation key,
the test plays the coordinator's side of the handshake (tests/peer_session.py), seals what it
sends and opens what the peer answers. The last section checks what the authentication is for:
frames that are unsealed, replayed, of another key or of a second coordinator change nothing."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peer_session import KEY, SESSION, AuthedMemPeer, SealedLink, stranger_seal
from tpfed.compute._native import lib
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.errors import BadTag, Replayed
from tpfed.protocol.fastpath import decode_partial, encode_activation
from tpfed.protocol.schema import (
    BATTERY_UNKNOWN,
    CRC_SIZE,
    HEADER_SIZE,
    MAGIC,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    Flag,
    MsgType,
    Stage,
)

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import quantize_q8_0
from tpfed.compute.share import DeviceShards, serialize_layer_share
from tpfed.runtime.peer_core import DeviceInfo, PeerConfig

HELLO = {"device_class": 0, "name": "test", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
         "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": BATTERY_UNKNOWN,
         "temperature_dc": TEMPERATURE_UNKNOWN, "transports": 0, "max_frame": 65535, "arena_kb": 0}
SEQ_LEN = 16
SHARE = {0: ((1, 3), ((0, 64), (128, 172))), 2: ((0,), ())}
GRANULE = lib.TPFED_WEIGHTS_GRANULE
HEARTBEAT = {"uptime_ms": 0, "load_pct": 0}
SESSION_IDLE_MS = 30_000  # tpfed_peer.h TPFED_SESSION_IDLE_MS


@pytest.fixture(scope="module")
def q8(stories260k_dir):
    return Q8Model.load(stories260k_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def blobs(q8):
    return {layer: serialize_layer_share(q8, layer, g, r) for layer, (g, r) in SHARE.items()}


def new_peer(arena_bytes: int = 8 << 20, hello: bool = True, handshake: bool = True,
             device_id: int = 1, key: bytes | None = KEY, **cfg) -> AuthedMemPeer:
    """A core holding ``key`` with the in-memory HAL; unless told otherwise, a coordinator has
    run the handshake with it (device ``device_id``, session SESSION) and greeted it."""
    peer = AuthedMemPeer(DeviceInfo("unit-peer", ram_bytes=1 << 30, cores=4), arena_bytes,
                         PeerConfig(int8_macs=123_456_789, key=key, **cfg), device_id=device_id,
                         manual_clock=True)
    if handshake:
        peer.handshake()
        assert peer.session == SESSION and peer.device_id == device_id
    if handshake and hello:
        assert one(peer.handle(frame(MsgType.HELLO, HELLO, dst=device_id))).type == MsgType.HELLO
    return peer


def frame(t: MsgType, payload: dict, dst: int = 1, session: int = SESSION, seq: int = 0) -> bytes:
    return encode_frame(Frame(t, payload, dst=dst, session=session, seq=seq))


def one(replies: list[bytes]) -> Frame:
    assert len(replies) == 1, replies
    return decode_frame(replies[0])


def types(replies: list[bytes]) -> list[MsgType]:
    return [decode_frame(r).type for r in replies]


def assign_frame(config, entries, seq_len=SEQ_LEN, session=SESSION, shas=None, **geometry) -> bytes:
    """ASSIGN of entries {layer: (groups, ranges)}, naming shas[layer] (default: none, zeros)."""
    c = config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
               "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": seq_len,
               "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
               "entries": [{"layer": layer, "kv_groups": list(g),
                            "mlp_ranges": [{"start": a, "end": b} for a, b in r],
                            "sha256": (shas or {}).get(layer, bytes(32))}
                           for layer, (g, r) in sorted(entries.items())]}
    payload.update(geometry)
    return frame(MsgType.ASSIGN, payload, session=session)


def weights_frame(layer, blob, off, n, session=SESSION, digest=None) -> bytes:
    return frame(MsgType.WEIGHTS, {
        "shard_id": layer, "offset": off, "total": len(blob),
        "sha256": digest or hashlib.sha256(blob).digest(), "data": blob[off:off + n]},
        session=session)


def chunks(blob, size=10 * GRANULE):
    return [(off, size) for off in range(0, len(blob), size)]


def ready_peer(q8, blobs) -> AuthedMemPeer:
    peer = new_peer()
    assert one(peer.handle(assign_frame(q8.config, SHARE))).type == MsgType.ACK
    out = []
    for layer, blob in blobs.items():
        for off, n in chunks(blob):
            out += peer.handle(weights_frame(layer, blob, off, n))
    assert types(out) == [MsgType.ACK, MsgType.ACK, MsgType.READY]
    assert peer.ready and peer.layers_held == 2
    return peer


def activation(q8, stage=0, layer=0, session=SESSION, pos=0, seed=0) -> tuple[bytes, object]:
    xf = np.random.default_rng(seed).standard_normal(q8.config.dim).astype(np.float32)
    x = quantize_q8_0(xf)
    return encode_activation(layer, stage, pos, x.qs, x.d, dst=1, session=session), x


def host_units(q8):
    class View:
        config = replace(q8.config, seq_len=SEQ_LEN)
        attention_unit = staticmethod(q8.attention_unit)
        mlp_unit = staticmethod(q8.mlp_unit)

    return DeviceShards(View(), SHARE)


def partial_is_exact(q8, peer_answer: bytes, stage=Stage.ATTENTION, layer=0, pos=0, seed=0) -> bool:
    """peer_answer is the PARTIAL of activation(q8, stage, layer, pos=pos, seed=seed), bit for
    bit what the single-device units compute (from a fresh KV cache: pos 0)."""
    _, x = activation(q8, stage=stage, layer=layer, pos=pos, seed=seed)
    host = host_units(q8)
    want = host.attention(layer, x, pos) if stage == Stage.ATTENTION else host.mlp(layer, x)
    p = decode_partial(peer_answer)
    return p.values.view(np.uint32).tolist() == want.view(np.uint32).tolist()


# ----------------------------------------------------------------------------- session


def test_hello_announces_the_device():
    peer = new_peer(arena_bytes=4 << 20, hello=False, device_id=7)
    assert peer.stats()["sessions"] == 1 and lib.tpfed_peer_in_session(peer.ptr)
    h = one(peer.handle(frame(MsgType.HELLO, HELLO, dst=7)))
    assert (h.type, h.src, h.dst, h.session) == (MsgType.HELLO, 7, 0, SESSION)
    assert h.flags & Flag.AUTH
    p = h.payload
    assert p["name"] == "unit-peer" and p["device_class"] == DeviceClass.DESKTOP
    assert p["int8_macs"] == 123_456_789 and p["max_frame"] == 65535
    assert p["ram_kb"] == 1 << 20 and p["cores"] == 4
    assert 0 < p["arena_kb"] * 1024 < 4 << 20
    assert peer.device_id == 7
    # The device id is the handshake's: a HELLO to another id is not for this peer, and a
    # broadcast one is answered by device 7.
    assert peer.handle(frame(MsgType.HELLO, HELLO, dst=3)) == [] and peer.device_id == 7
    assert one(peer.handle(frame(MsgType.HELLO, HELLO, dst=0xFF))).src == 7


def test_partials_are_bit_identical_to_the_single_device_units(q8, blobs):
    peer = ready_peer(q8, blobs)
    host = host_units(q8)
    for pos in range(4):
        for layer in SHARE:
            stages = [s for s, held in ((Stage.ATTENTION, SHARE[layer][0]), (Stage.MLP, SHARE[layer][1])) if held]
            for stage in stages:
                f, x = activation(q8, stage=stage, layer=layer, pos=pos, seed=10 * pos + layer)
                raw = peer.handle(f)[0]
                p = decode_partial(raw)
                assert (p.layer, p.stage, p.pos, p.n, p.src, p.dst) == (layer, stage, pos, q8.config.dim, 1, 0)
                assert raw[3] & Flag.AUTH and decode_frame(raw).session == SESSION
                want = host.attention(layer, x, pos) if stage == Stage.ATTENTION else host.mlp(layer, x)
                assert p.values.view(np.uint32).tolist() == want.view(np.uint32).tolist()
    assert peer.stats()["activations"] == 4 * 3
    assert peer.stats()["auth_dropped"] == peer.stats()["replayed"] == 0


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


# ----------------------------------------------------------------------------- shares kept


def held_of(ack: Frame, n: int) -> list[bool]:
    """The ACK of an ASSIGN of n entries: which entries' shares the peer holds already."""
    assert ack.type == MsgType.ACK and ack.payload["acked_type"] == MsgType.ASSIGN, ack
    bits = ack.payload["held"]
    assert len(bits) == (n + 7) // 8
    return [bool(bits[i // 8] >> (i % 8) & 1) for i in range(n)]


def test_shares_are_kept_by_sha256_across_assigns_and_sessions(q8, blobs):
    """An ASSIGN naming the sha256 of shares the peer holds keeps them (READY at once, exact
    partials); across BYE and a new session too, moved into a larger layout; a share named by
    another sha256 is dropped."""
    digests = {layer: hashlib.sha256(b).digest() for layer, b in blobs.items()}
    peer = ready_peer(q8, blobs)
    assert peer.shares_kept == 2
    out = peer.handle(assign_frame(q8.config, SHARE, shas=digests))
    assert types(out) == [MsgType.ACK, MsgType.READY]
    assert held_of(decode_frame(out[0]), 2) == [True, True]
    assert peer.ready and peer.layers_held == 2
    assert partial_is_exact(q8, peer.handle(activation(q8, stage=Stage.ATTENTION, layer=0)[0])[0])

    # BYE: the assignment ends, the shares stay; a new session's ASSIGN (a new layer 1 before
    # layer 2, so the kept shares move) keeps layers 0 and 2, and layer 1 is pushed.
    assert peer.handle(frame(MsgType.BYE, {"reason": 0})) == [] and not peer.ready
    assert peer.layers_assigned == 0 and peer.shares_kept == 2
    peer.link = SealedLink(peer.raw, KEY, 1, session=SESSION + 1)
    peer.handshake()
    bigger = {**SHARE, 1: ((0, 2), ((32, 96),))}
    b1 = serialize_layer_share(q8, 1, *bigger[1])
    ack = one(peer.handle(assign_frame(q8.config, bigger, session=SESSION + 1,
                                       shas={**digests, 1: hashlib.sha256(b1).digest()})))
    assert held_of(ack, 3) == [True, False, True]
    assert peer.layers_held == 2 and not peer.ready
    out = []
    for off, n in chunks(b1):
        out += peer.handle(weights_frame(1, b1, off, n, session=SESSION + 1))
    assert types(out) == [MsgType.ACK, MsgType.READY]
    for layer, stage in ((0, Stage.ATTENTION), (0, Stage.MLP), (2, Stage.ATTENTION)):
        f, _ = activation(q8, stage=stage, layer=layer, session=SESSION + 1)
        assert partial_is_exact(q8, peer.handle(f)[0], stage=stage, layer=layer)

    # Another sha256 for layer 2 (the share wanted is not the one held): dropped, not held.
    ack = one(peer.handle(assign_frame(q8.config, SHARE, session=SESSION + 1,
                                       shas={0: digests[0], 2: digests[0]})))
    assert held_of(ack, 2) == [True, False]
    assert peer.shares_kept == 1 and peer.layers_held == 1


def test_a_share_claimed_but_not_held_is_pushed(q8, blobs):
    """A share only partly received (its sha256 announced by WEIGHTS, not complete and
    verified) is not held: an ASSIGN naming it gets its bit clear, and the share comes again."""
    digests = {layer: hashlib.sha256(b).digest() for layer, b in blobs.items()}
    peer = new_peer()
    assert held_of(one(peer.handle(assign_frame(q8.config, SHARE, shas=digests))), 2) == [False, False]
    blob = blobs[2]
    parts = chunks(blob)
    for off, n in parts[:-1]:
        assert peer.handle(weights_frame(2, blob, off, n)) == []
    assert peer.shares_kept == 0
    assert held_of(one(peer.handle(assign_frame(q8.config, SHARE, shas=digests))), 2) == [False, False]
    # the assembly started over: the last chunk alone does not complete it
    assert peer.handle(weights_frame(2, blob, *parts[-1])) == []
    assert peer.shares_kept == 0


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"stage": 7}, ErrorCode.NOT_ASSIGNED),
    ({"layer": 3}, ErrorCode.NOT_ASSIGNED),
    ({"layer": 2, "stage": 1}, ErrorCode.NOT_ASSIGNED),  # layer 2 holds attention only
    ({"pos": SEQ_LEN}, ErrorCode.BAD_PAYLOAD),  # beyond the assigned seq_len
])
def test_bad_activations_get_an_error(q8, blobs, kwargs, code):
    peer = ready_peer(q8, blobs)
    err = one(peer.handle(activation(q8, **kwargs)[0]))
    assert err.type == MsgType.ERROR and err.payload["code"] == code
    assert peer.ready


def test_activation_naming_another_session_is_dropped(q8, blobs):
    """Sealed with the session key but naming another session (what was BAD_SESSION before
    sessions were authenticated): not of this session, so dropped without an answer."""
    peer = ready_peer(q8, blobs)
    before = peer.stats()
    assert peer.handle(activation(q8, session=SESSION + 1)[0]) == []
    after = peer.stats()
    assert after["auth_dropped"] == before["auth_dropped"] + 1 and after["errors_sent"] == before["errors_sent"]
    assert peer.ready and partial_is_exact(q8, peer.handle(activation(q8)[0])[0])


def test_bye_of_another_session_is_ignored(q8, blobs):
    peer = ready_peer(q8, blobs)
    auth_dropped = peer.stats()["auth_dropped"]
    assert peer.handle(frame(MsgType.BYE, {"reason": 0}, session=9)) == []
    assert peer.ready and peer.stats()["auth_dropped"] == auth_dropped + 1
    assert peer.handle(frame(MsgType.BYE, {"reason": 0})) == []
    assert not peer.ready and peer.layers_assigned == 0
    assert peer.session == 0 and not lib.tpfed_peer_in_session(peer.ptr)
    # The session is over: its frames are not answered any more, not even with an error ...
    assert peer.handle(activation(q8)[0]) == []
    assert peer.stats()["auth_dropped"] == auth_dropped + 2
    # ... and a new handshake starts from scratch (nothing assigned).
    peer.link = SealedLink(peer.raw, KEY, 1, SESSION + 1)
    peer.handshake()
    err = one(peer.handle(activation(q8, session=SESSION + 1)[0]))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_STATE


def test_heartbeat_and_probe(q8):
    peer = new_peer()
    peer.now_ms = 4242
    hb = one(peer.handle(frame(MsgType.HEARTBEAT, HEARTBEAT)))
    assert hb.type == MsgType.HEARTBEAT and hb.payload["uptime_ms"] == 4242
    probe = {"nonce": 77, "t_send_us": 123456789, "pad": bytes(range(256)) * 40}
    reply = one(peer.handle(frame(MsgType.PROBE, probe, seq=999)))
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
    err = one(peer.handle(assign_frame(q8.config, entries)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_PAYLOAD, err.payload
    assert peer.ready and peer.session == SESSION  # the assignment held stays
    assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])


def test_layer_named_twice_is_bad_payload(q8):
    peer = new_peer()
    c = q8.config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
               "n_kv_heads": c.n_kv_heads, "seq_len": 8, "norm_eps": c.norm_eps,
               "rope_theta": c.rope_theta,
               "entries": [{"layer": 1, "kv_groups": [0], "mlp_ranges": []}] * 2}
    err = one(peer.handle(frame(MsgType.ASSIGN, payload)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BAD_PAYLOAD
    assert "twice" in err.payload["text"]


def test_assignment_larger_than_the_arena_is_out_of_memory(q8, blobs):
    peer = ready_peer(q8, blobs)
    c = q8.config
    everything = {layer: (tuple(range(c.n_kv_heads)), ((0, c.hidden_dim),)) for layer in range(c.n_layers)}
    err = one(peer.handle(assign_frame(c, everything, seq_len=1 << 16 - 1)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.OUT_OF_MEMORY
    assert "arena" in err.payload["text"]
    assert peer.ready and peer.session == SESSION
    assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])
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
    err = one(peer.handle(frame(MsgType.ASSIGN, payload)))
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
    err = one(peer.handle(frame(MsgType.ASSIGN, assign)))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.UNSUPPORTED
    assert "needs frames of" in err.payload["text"]


def test_arena_below_the_minimum_is_refused():
    from tpfed.errors import TpfedError
    from tpfed.runtime.peer_core import arena_min_bytes

    with pytest.raises(TpfedError, match="at least"):
        new_peer(arena_bytes=arena_min_bytes() - 1, handshake=False)


# ----------------------------------------------------------------------------- authentication


def _counts(peer) -> tuple[int, ...]:
    s = peer.stats()
    return s["auth_dropped"], s["replayed"], s["sessions"], s["busy"], s["errors_sent"]


def test_unsealed_frames_after_the_handshake_get_no_answer_and_are_counted(q8, blobs):
    peer = ready_peer(q8, blobs)
    s0 = peer.stats()
    plain = [frame(MsgType.HELLO, HELLO), frame(MsgType.HEARTBEAT, HEARTBEAT),
             frame(MsgType.PROBE, {"nonce": 1, "t_send_us": 2, "pad": b"x"}),
             activation(q8)[0], assign_frame(q8.config, {0: ((0,), ())}),
             weights_frame(2, blobs[2], 0, GRANULE), frame(MsgType.BYE, {"reason": 0}),
             frame(MsgType.HELLO, HELLO, dst=0xFF)]
    for f in plain:
        assert peer.raw(f) == []
    s1 = peer.stats()
    assert s1["auth_dropped"] == s0["auth_dropped"] + len(plain)
    assert s1["frames_in"] == s0["frames_in"] + len(plain) and s1["frames_out"] == s0["frames_out"]
    assert (s1["replayed"], s1["dropped"], s1["errors_sent"]) == (s0["replayed"], s0["dropped"], s0["errors_sent"])
    # Nothing changed: the share is held, the session goes on.
    assert peer.ready and peer.layers_held == 2 and peer.session == SESSION
    assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])
    # A sealed frame with a flipped tag bit (CRC fixed) is no better than an unsealed one.
    sealed = bytearray(peer.link.seal(frame(MsgType.HEARTBEAT, HEARTBEAT)))
    sealed[-CRC_SIZE - 1] ^= 1
    sealed[-CRC_SIZE:] = zlib.crc32(sealed[:-CRC_SIZE]).to_bytes(4, "little")
    assert peer.raw(bytes(sealed)) == []
    assert peer.stats()["auth_dropped"] == s1["auth_dropped"] + 1


def test_replayed_sealed_frames_get_no_answer(q8, blobs):
    peer = ready_peer(q8, blobs)
    sealed = peer.link.seal(activation(q8)[0])
    (first,) = peer.raw(sealed)
    assert partial_is_exact(q8, peer.link.open(first))
    replayed = peer.stats()["replayed"]
    activations = peer.stats()["activations"]
    assert peer.raw(sealed) == []                      # the very same bytes again
    assert peer.stats()["replayed"] == replayed + 1 and peer.stats()["activations"] == activations
    # Out of order within the window is taken (once); older than the window is not.
    hb = [peer.link.seal(frame(MsgType.HEARTBEAT, HEARTBEAT, seq=i)) for i in range(1, 4)]
    assert types([peer.link.open(r) for r in peer.raw(hb[2])]) == [MsgType.HEARTBEAT]
    assert types([peer.link.open(r) for r in peer.raw(hb[0])]) == [MsgType.HEARTBEAT]
    assert peer.raw(hb[0]) == [] and peer.raw(hb[2]) == []
    for i in range(auth.REPLAY_WINDOW + 1):
        peer.handle(frame(MsgType.HEARTBEAT, HEARTBEAT, seq=100 + i))
    assert peer.raw(hb[1]) == []                       # never seen, but older than the window
    assert peer.stats()["replayed"] == replayed + 4
    # The coordinator's side refuses a replay of the peer's frame the same way.
    with pytest.raises(Replayed):
        peer.link.open(first)


def test_wrong_key_coordinator_gets_nowhere(q8, blobs):
    """A coordinator with another key: its CHALLENGE's RESPONSE proof does not verify with its
    key, and its CONFIRM (proved with its key) is dropped without an answer, whether the peer
    is in a session or not."""
    wrong = auth.new_key()
    for in_session in (False, True):
        peer = ready_peer(q8, blobs) if in_session else new_peer(handshake=False)
        before = _counts(peer)
        intruder = SealedLink(peer.raw, wrong, device_id=1, session=SESSION + 1)
        (resp,) = intruder.deliver(intruder.challenge_frame())
        with pytest.raises(auth.AuthError):
            intruder.confirm_frame(resp)
        # It sends the CONFIRM it can compute (with its key) anyway.
        r = decode_frame(resp).payload["body"]
        hs = intruder.hs
        proof_c = auth.coordinator_proof(wrong, hs.nonce_c, r["nonce_p"], 1, SESSION + 1)
        confirm = encode_frame(Frame(MsgType.AUTH, auth.confirm(proof_c), dst=1, session=SESSION + 1))
        assert peer.raw(confirm) == []
        after = _counts(peer)
        assert after[0] == before[0] + 1 and after[1:] == before[1:]  # auth_dropped only
        assert lib.tpfed_peer_in_session(peer.ptr) == in_session
        if in_session:
            assert peer.session == SESSION and peer.ready
            assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])
        else:
            assert peer.session == 0 and peer.raw(stranger_seal(frame(MsgType.HELLO, HELLO))) == []


def test_second_coordinator_is_told_busy_and_the_first_session_goes_on(q8, blobs):
    peer = ready_peer(q8, blobs)
    peer.now_ms = 1000
    peer.handle(frame(MsgType.HEARTBEAT, HEARTBEAT))  # the session is live
    second = SealedLink(peer.raw, KEY, device_id=2, session=SESSION + 7)
    (resp,) = peer.raw(second.challenge_frame())
    confirm = second.confirm_frame(resp)              # it holds the key: the proof verifies
    (busy,) = peer.raw(confirm)
    second.session = second.hs.session
    second.open(busy)                                 # sealed with the second session's key
    with pytest.raises(BadTag):
        peer.link.open(busy)                          # ... not the first one's
    err = decode_frame(busy)
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BUSY
    assert "busy with another session" in err.payload["text"]
    assert err.session == SESSION + 7
    s = peer.stats()
    assert (s["busy"], s["sessions"]) == (1, 1)
    # The first session keeps working; the second one's sealed frames are not taken.
    assert peer.session == SESSION and peer.device_id == 1 and peer.ready
    assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])
    assert peer.raw(second.seal(frame(MsgType.BYE, {"reason": 0}, session=SESSION + 7))) == []
    assert peer.raw(second.seal(frame(MsgType.BYE, {"reason": 0}, dst=1, session=SESSION))) == []
    assert peer.ready and peer.stats()["auth_dropped"] == s["auth_dropped"] + 2
    # Once the first session has been idle long enough, a new handshake replaces it (and its
    # assignment), and the old session's frames are dropped.
    peer.now_ms = 1000 + SESSION_IDLE_MS
    third = SealedLink(peer.raw, KEY, device_id=3, session=SESSION + 8)
    third.handshake()
    assert peer.session == SESSION + 8 and peer.device_id == 3 and peer.layers_assigned == 0
    assert peer.raw(peer.link.seal(activation(q8)[0])) == []
    assert peer.stats()["sessions"] == 2


def test_handshake_repeats_are_idempotent():
    """A repeated CHALLENGE gets the same RESPONSE; a repeated CONFIRM of the current session
    is ACKed again (its ACK was lost) without a new session."""
    peer = new_peer(handshake=False)
    link = peer.link
    challenge = link.challenge_frame()
    (r1,) = peer.raw(challenge)
    (r2,) = peer.raw(challenge)
    assert r1 == r2
    confirm = link.confirm_frame(r1)
    link.session = link.hs.session
    (a1,) = peer.raw(confirm)
    (a2,) = peer.raw(confirm)
    for a in (a1, a2):
        ack = decode_frame(link.open(a))
        assert ack.type == MsgType.ACK and ack.payload["acked_type"] == MsgType.AUTH
    assert peer.stats()["sessions"] == 1
    assert one(peer.handle(frame(MsgType.HELLO, HELLO))).type == MsgType.HELLO
    # AUTH frames are never sealed: a sealed one is dropped.
    assert peer.raw(link.seal(challenge)) == []


def test_stranger_injections_change_nothing(q8, blobs):
    """Someone without the key injects ACTIVATION, WEIGHTS, BYE, ASSIGN (unsealed, sealed under
    a key of its own, or with a forged tag in the session's trailer) and a CONFIRM it made up:
    no answer, nothing changes, and the coordinator's next frames are served as before."""
    peer = ready_peer(q8, blobs)
    used, held = peer.arena_used, peer.layers_held
    s0 = peer.stats()
    injected = [activation(q8)[0], activation(q8, stage=Stage.MLP)[0],
                weights_frame(2, blobs[2], 0, GRANULE, digest=bytes(32)),
                assign_frame(q8.config, {1: ((0,), ())}), frame(MsgType.BYE, {"reason": 0}),
                assign_frame(q8.config, {0: ((9, 3, 3), ())})]
    sent = 0
    for f in injected:
        for variant in (f, stranger_seal(f, counter=10_000), stranger_seal(f, counter=1)):
            assert peer.raw(variant) == []
            sent += 1
    challenge_like = SealedLink(peer.raw, auth.new_key(), session=SESSION)
    confirm = encode_frame(Frame(MsgType.AUTH, auth.confirm(bytes(32)), dst=1, session=SESSION))
    assert peer.raw(confirm) == []
    sent += 1
    s1 = peer.stats()
    assert s1["auth_dropped"] == s0["auth_dropped"] + sent
    assert s1["frames_out"] == s0["frames_out"] and s1["activations"] == s0["activations"]
    assert (peer.arena_used, peer.layers_held, peer.session, peer.device_id) == (used, held, SESSION, 1)
    assert peer.ready and lib.tpfed_peer_in_session(peer.ptr)
    # The stranger's CHALLENGE does get a RESPONSE (anyone may start a handshake), whose proof
    # its key cannot check, and the session stays.
    (resp,) = peer.raw(challenge_like.challenge_frame())
    with pytest.raises(auth.AuthError):
        challenge_like.confirm_frame(resp)
    assert partial_is_exact(q8, peer.handle(activation(q8)[0])[0])
    assert partial_is_exact(q8, peer.handle(activation(q8, stage=Stage.MLP)[0])[0], stage=Stage.MLP)


def test_peer_without_a_key_answers_nothing(q8):
    peer = new_peer(key=None, handshake=False)
    assert not lib.tpfed_peer_keyed(peer.ptr)
    link = SealedLink(peer.raw, KEY)
    frames = [link.challenge_frame(),
              encode_frame(Frame(MsgType.AUTH, auth.confirm(bytes(32)), dst=1, session=SESSION)),
              frame(MsgType.HELLO, HELLO), stranger_seal(frame(MsgType.HELLO, HELLO)),
              frame(MsgType.HEARTBEAT, HEARTBEAT, dst=0xFF), assign_frame(q8.config, {0: ((0,), ())}),
              encode_frame(Frame(MsgType.PROVISION, {"key": KEY}))]  # not a provisionable peer
    for f in frames:
        assert peer.raw(f) == []
    s = peer.stats()
    assert s["frames_out"] == 0 and s["auth_dropped"] == len(frames) and s["sessions"] == 0
    assert not lib.tpfed_peer_keyed(peer.ptr) and peer.session == 0


def test_provisionable_peer_takes_one_key():
    """A board-like peer (provision) takes one PROVISION frame while keyless (ACKed unsealed),
    ACKs a repeat of that key, drops any other; then the handshake with that key works."""
    peer = new_peer(key=None, handshake=False, provision=True)
    prov = encode_frame(Frame(MsgType.PROVISION, {"key": KEY}, seq=9))
    for _ in range(2):
        ack = one(peer.raw(prov))
        assert ack.type == MsgType.ACK and ack.payload["acked_type"] == MsgType.PROVISION
        assert not ack.flags & Flag.AUTH
    assert peer.raw(encode_frame(Frame(MsgType.PROVISION, {"key": auth.new_key()}))) == []
    assert lib.tpfed_peer_keyed(peer.ptr)
    peer.handshake()
    assert one(peer.handle(frame(MsgType.HELLO, HELLO))).type == MsgType.HELLO


# ----------------------------------------------------------------------------- never crashes


@pytest.fixture(scope="module")
def shared_ready_peer(q8, blobs):
    return ready_peer(q8, blobs)


@pytest.fixture(scope="module")
def mutation_peer(q8, blobs):
    return ready_peer(q8, blobs)  # sealed mutations may end its session (a BYE): its own peer


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_crashes_and_replies_are_well_formed(shared_ready_peer, data):
    peer = shared_ready_peer
    for reply in peer.raw(data):
        decode_frame(reply)  # whatever the peer sends back is a valid frame
    assert peer.ready  # and it still serves


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_sealed_under_the_session_key_never_crashes(shared_ready_peer, data, header):
    """Garbage that gets past authentication: random bytes (a frame's magic, its length field
    fitted, no AUTH flag; with ``header`` also this version, dst and session) sealed with the
    session key, so the state machine sees them."""
    peer = shared_ready_peer
    body = bytearray(data) + bytes(max(0, HEADER_SIZE - len(data)))
    body[0] = MAGIC
    body[3] &= ~int(Flag.AUTH) & 0xFF
    if header:
        body[1] = decode_frame(frame(MsgType.HEARTBEAT, HEARTBEAT)).version
        body[5], body[8:10] = 1, SESSION.to_bytes(2, "little")  # dst, session
        if body[2] in (MsgType.BYE, MsgType.ASSIGN, MsgType.WEIGHTS):  # would end "ready"
            body[2] = MsgType.HEARTBEAT
    body[HEADER_SIZE - 2:HEADER_SIZE] = (len(body) - HEADER_SIZE).to_bytes(2, "little")
    unsealed = bytes(body) + bytes(CRC_SIZE)
    for reply in peer.raw(peer.link.seal(unsealed)):
        decode_frame(peer.link.open(reply))
    assert peer.ready


def _fit(frame_bytes: bytearray) -> bytes:
    """A mutated unsealed frame made sealable: magic, no AUTH flag, length field = its size."""
    f = bytearray(frame_bytes) + bytes(max(0, HEADER_SIZE + CRC_SIZE - len(frame_bytes)))
    f[0] = MAGIC
    f[3] &= ~int(Flag.AUTH) & 0xFF
    f[HEADER_SIZE - 2:HEADER_SIZE] = (len(f) - HEADER_SIZE - CRC_SIZE).to_bytes(2, "little")
    return bytes(f)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_frames_never_crash(mutation_peer, q8, blobs, data):
    """Valid frames with a few bytes changed and cut short: sent sealed as they are (the tag
    or CRC no longer matches), or mutated first and then sealed properly (the state machine
    sees them)."""
    peer = mutation_peer
    base = data.draw(st.sampled_from([
        activation(q8)[0], activation(q8, stage=1)[0],
        weights_frame(0, blobs[0], 0, 4 * GRANULE),
        frame(MsgType.HEARTBEAT, HEARTBEAT),
        assign_frame(q8.config, SHARE),
    ]))
    seal_after = data.draw(st.booleans())
    f = bytearray(base if seal_after else peer.link.seal(base))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(f) - 1))
        f[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(f)))
    if seal_after:
        sent = peer.link.seal(_fit(f[:cut]))
        for reply in peer.raw(sent):
            decode_frame(peer.link.open(reply))
    else:
        for reply in peer.raw(bytes(f[:cut])):
            decode_frame(reply)


@settings(max_examples=200, deadline=None)
@given(layer=st.integers(0, 65535), stage=st.integers(0, 255), pos=st.integers(0, 65535),
       n=st.integers(0, 200))
def test_any_valid_activation_frame_gets_one_answer(shared_ready_peer, layer, stage, pos, n):
    x = quantize_q8_0(np.ones(n, np.float32)) if n else None
    qs = x.qs if x is not None else np.zeros(0, np.int8)
    d = x.d if x is not None else np.zeros(0, np.uint16)
    replies = shared_ready_peer.handle(encode_activation(layer, stage, pos, qs, d, dst=1, session=SESSION))
    assert len(replies) == 1
    assert decode_frame(replies[0]).type in (MsgType.PARTIAL, MsgType.ERROR)


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(0, 70000), hidden=st.integers(0, 2**32 - 1), heads=st.integers(0, 300),
       kv=st.integers(0, 300), seq_len=st.integers(0, 70000), layers=st.integers(0, 300),
       groups=st.lists(st.integers(0, 300), max_size=6),
       ranges=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4))
def test_any_assign_is_answered_once_and_never_crashes(dim, hidden, heads, kv, seq_len, layers,
                                                       groups, ranges):
    peer = new_peer(arena_bytes=1 << 20, hello=False)
    payload = {"dim": dim, "hidden_dim": hidden, "n_layers": layers, "n_heads": heads,
               "n_kv_heads": kv, "seq_len": seq_len, "norm_eps": 1e-5, "rope_theta": 1e4,
               "entries": [{"layer": 0, "kv_groups": groups,
                            "mlp_ranges": [{"start": a, "end": b} for a, b in ranges]}]}
    try:
        f = frame(MsgType.ASSIGN, payload)
    except Exception:  # outside what the schema can encode (u16 fields)
        return
    reply = one(peer.handle(f))
    assert reply.type in (MsgType.ACK, MsgType.ERROR)

