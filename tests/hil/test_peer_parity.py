"""One peer core, two builds: the emulated musca-b1 (the firmware, ARM, over its UART) and the
host's CFFI build (firmware/ports/host/mem_peer.c) configured as that board (its device info,
max_frame, arena size, groups/ranges limits, and the MAC/s it announced) answer one corpus of
frames — a valid session, malformed and oversize frames, ASSIGNs a board must refuse, and the
authentication's refusals (unsealed, replayed, other sessions, a wrong key, a second
coordinator) — alike.

Both are keyed the same way (one PROVISION frame: the board's and the host's ACKs are compared
byte for byte) and each runs its own handshake: their nonces differ, so each has its own session
key, and every frame of the corpus is sealed once per peer (same counters, different tags). The
answers are opened with each side's session and compared: every header field but the tag and
CRC (the counter included) and the payload, byte for byte. Handshake RESPONSEs differ in their
nonce and proof only (each proof is checked).

Compared field by field with these masked, as they depend on the build's pointer size or clock:
READY's arena_used/arena_free and the byte counts in an OUT_OF_MEMORY text (the core's tables
hold pointers: 4 bytes on the board, 8 here), and HEARTBEAT's uptime.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.fastpath import encode_activation
from tpfed.protocol.framing import StreamFramer
from tpfed.protocol.schema import COORDINATOR, CRC_SIZE, AuthStep, ErrorCode, MsgType, Stage

pytestmark = pytest.mark.hil

ARENA = 393216          # firmware/platformio.ini [env:musca-b1] TPFED_ARENA_SIZE
MAX_FRAME = 1024        # firmware/ports/common/main.c TPFED_BOARD_MAX_FRAME
MAX_GROUPS, MAX_RANGES = 32, 8
CHUNK = 896             # WEIGHTS data per frame: 14 granules, fits MAX_FRAME sealed
SEQ_LEN = 32
SESSION = 1             # the handshake's session: the corpus's frames name it
SHARE = {0: ((1, 3), ((0, 64), (160, 172))), 1: ((2,), ()), 3: ((), ((32, 96),))}
HELLO = {"device_class": 0, "name": "coordinator", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
         "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
         "temperature_dc": -32768, "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0}
NONCE_C = bytes(range(16))  # the same CHALLENGE to both peers (their nonces differ anyway)


def frame(t: MsgType, payload: dict, session: int = SESSION, seq: int = 0, dst: int = 1) -> bytes:
    return encode_frame(Frame(t, payload, src=COORDINATOR, dst=dst, session=session, seq=seq))


def assign(config, entries, seq_len=SEQ_LEN, session=SESSION, **geometry) -> bytes:
    c = config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
               "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": seq_len,
               "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
               "entries": [{"layer": layer, "kv_groups": list(g),
                            "mlp_ranges": [{"start": a, "end": b} for a, b in r]}
                           for layer, (g, r) in sorted(entries.items())]}
    payload.update(geometry)
    return frame(MsgType.ASSIGN, payload, session=session)


def weights(layer, blob, off, session=SESSION, digest=None, n=CHUNK) -> bytes:
    return frame(MsgType.WEIGHTS, {"shard_id": layer, "offset": off, "total": len(blob),
                                   "sha256": digest or hashlib.sha256(blob).digest(),
                                   "data": blob[off:off + n]}, session=session)


def activation(dim, layer, stage, pos, seed, session=SESSION, n=None) -> bytes:
    x = np.random.default_rng(seed).standard_normal(n if n is not None else dim).astype(np.float32)
    from tpfed.compute.kernels import quantize_q8_0

    q = quantize_q8_0(x)
    return encode_activation(layer, stage, pos, q.qs, q.d, dst=1, session=session, seq=seed)


# ----------------------------------------------------------------------------- corpus


@dataclass
class Send:
    """One corpus frame: sealed with each peer's session (unless ``seal`` is false), then
    ``post`` applied to the bytes (damage done after sealing)."""

    frame: bytes
    seal: bool = True
    post: Callable[[bytes], bytes] | None = None


@dataclass
class Replay:
    """The bytes last sent to each peer, again."""


@dataclass
class Handshake:
    """A handshake with each peer: ``key`` None is the federation key. ``expect``: "ack" (a new
    session, which the corpus goes on in), "busy" (a sealed ERROR BUSY under the newcomer's key)
    or "none" (a wrong key: the RESPONSE's proof does not verify, the CONFIRM gets no answer)."""

    session: int
    device_id: int = 1
    expect: str = "ack"
    wrong_key: bool = False


def _flip_last(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 0xFF])


def _refit_crc(b: bytes) -> bytes:
    return b[:-CRC_SIZE] + zlib.crc32(b[:-CRC_SIZE]).to_bytes(4, "little")


def _flip_version(b: bytes) -> bytes:
    return b[:1] + bytes([b[1] ^ 0x70]) + b[2:]  # (CRC now bad too, as before sealing)


def _flip_tag(b: bytes) -> bytes:
    return _refit_crc(b[:-CRC_SIZE - 1] + bytes([b[-CRC_SIZE - 1] ^ 1]) + b[-CRC_SIZE:])


def corpus(q8) -> list[Send | Replay | Handshake]:
    from tpfed.compute.share import serialize_layer_share

    c = q8.config
    blobs = {layer: serialize_layer_share(q8, layer, g, r) for layer, (g, r) in SHARE.items()}
    out: list[Send | Replay | Handshake] = []

    def add(f: bytes, **kw) -> None:
        out.append(Send(f, **kw))

    # -- ASSIGNs to refuse before anything is held
    everything = {layer: (tuple(range(c.n_kv_heads)), ((0, c.hidden_dim),)) for layer in range(c.n_layers)}
    add(assign(c, everything, seq_len=512))                               # OUT_OF_MEMORY
    add(assign(c, {0: ((9, 3, 3), ())}))                                  # BAD_PAYLOAD
    add(assign(c, {0: ((), ((5, 999),))}))                                # BAD_PAYLOAD
    add(assign(c, {9: ((0,), ())}))                                       # no such layer
    wide = {"dim": 64, "hidden_dim": 4096, "n_heads": 64, "n_kv_heads": 64}
    add(assign(c, {0: (tuple(range(33)), ())}, **wide))                   # > max_groups
    add(assign(c, {0: ((), tuple((64 * i, 64 * i + 32) for i in range(9)))}, **wide))  # > max_ranges
    for geometry in (
        # 32-bit wrap-around of share and KV sizes; frames that do not fit
        {"dim": 250, "hidden_dim": 0x7FFFFFE0, "n_heads": 1, "n_kv_heads": 1, "seq_len": 65535},
        {"dim": 224, "hidden_dim": 0x0FFFFFE0, "n_heads": 1, "n_kv_heads": 1, "seq_len": 65535},
        {"dim": 128, "hidden_dim": 0x01000000, "n_heads": 2, "n_kv_heads": 2, "seq_len": 65535},
        {"dim": 65535, "hidden_dim": 0xFFFFFFFF, "n_heads": 5, "n_kv_heads": 5, "seq_len": 65535},
        {"dim": 246, "hidden_dim": 64, "n_heads": 1, "n_kv_heads": 1},   # PARTIAL just too big
        {"dim": 0, "hidden_dim": 64, "n_heads": 1, "n_kv_heads": 1},
        {"dim": 64, "hidden_dim": 64, "n_heads": 3, "n_kv_heads": 1},
    ):
        hd = geometry["hidden_dim"]
        seq = geometry.pop("seq_len", SEQ_LEN)
        add(assign(c, {0: ((0,), ((0, hd),))}, seq_len=seq, n_layers=1, **geometry))
    add(assign(c, {layer: ((0,), ()) for layer in range(3)}, n_layers=65535, seq_len=4))
    # -- malformed and stray frames (damage done after sealing: the frame checks come first)
    probe = frame(MsgType.PROBE, {"nonce": 7, "t_send_us": 99, "pad": bytes(range(200))}, seq=4242)
    add(probe)
    add(probe, post=_flip_last)                                           # bad CRC
    add(probe, post=lambda b: b[: len(b) - CRC_SIZE - 3])                 # truncated
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}), post=_flip_version)
    add(frame(MsgType.READY, {"shard_bytes": 0, "arena_used": 0, "arena_free": 0}))  # not for a peer
    add(frame(MsgType.PARTIAL, {"layer": 0, "stage": 0, "pos": 0, "encoding": 0, "n": 1,
                                "data": b"\0\0\0\0"}))
    add(frame(MsgType.BYE, {"reason": 0}), post=lambda b: b[:2] + b"\x77" + b[3:])  # unknown type, CRC bad
    add(frame(MsgType.PROBE, {"nonce": 1, "t_send_us": 2, "pad": bytes(MAX_FRAME)}))  # oversize
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=9))  # not for us
    add(activation(c.dim, 0, Stage.ATTENTION, 0, seed=1))                 # before ASSIGN: BAD_STATE
    # -- authentication: unsealed, a bad tag, a replay, another session: no answer
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}), seal=False)
    add(assign(c, SHARE), seal=False)
    add(probe, post=_flip_tag)
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, seq=31))
    out.append(Replay())
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, session=SESSION + 1))
    add(frame(MsgType.AUTH, auth.challenge(NONCE_C, SESSION, 1)))         # AUTH sealed: dropped
    add(frame(MsgType.AUTH, auth.confirm(bytes(32))), seal=False)         # a made-up CONFIRM
    out.append(Handshake(session=7, wrong_key=True, expect="none"))
    # -- the valid session: WEIGHTS in order, out of order, with duplicates
    add(assign(c, SHARE))
    add(weights(0, blobs[0], 0, session=2))                               # another session
    add(weights(4, blobs[0], 0))                                          # layer not assigned
    add(weights(0, blobs[0], 10))                                         # off the granules
    rng = np.random.default_rng(0)
    for layer, blob in blobs.items():
        offs = list(range(0, len(blob), CHUNK))
        if layer == 1:
            offs = list(rng.permutation(offs)) + list(rng.choice(offs, 3))
        elif layer == 3:
            offs = offs[::-1] + offs[:2]
        for off in offs:
            add(weights(layer, blob, int(off)))
    add(weights(0, blobs[0], 0))                                          # held: no answer
    last = (len(blobs[3]) - 1) // CHUNK * CHUNK
    add(weights(3, blobs[3], last))                                       # held, last: ACK + READY
    # -- compute
    seed = 100
    for pos in (0, 1, 2, 5, SEQ_LEN - 1):
        for layer, (g, r) in SHARE.items():
            if g:
                add(activation(c.dim, layer, Stage.ATTENTION, pos, seed))
                seed += 1
            if r:
                add(activation(c.dim, layer, Stage.MLP, pos, seed))
                seed += 1
    add(activation(c.dim, 0, 7, 0, seed=1))                               # unknown stage
    add(activation(c.dim, 2, Stage.MLP, 0, seed=2))                       # not held
    add(activation(c.dim, 1, Stage.MLP, 0, seed=3))                       # attention only
    add(activation(c.dim, 0, Stage.ATTENTION, SEQ_LEN, seed=4))           # beyond seq_len
    add(activation(c.dim, 0, Stage.ATTENTION, 0, seed=5, n=32))           # wrong n
    add(activation(c.dim, 0, Stage.ATTENTION, 0, seed=6, session=9))      # another session
    add(activation(c.dim, 0, Stage.ATTENTION, 1, seed=6), seal=False)     # unsealed
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}))
    add(probe)
    # -- a second coordinator while the session is live: BUSY, and the session goes on
    out.append(Handshake(session=5, device_id=2, expect="busy"))
    add(activation(c.dim, 3, Stage.MLP, 6, seed=9))
    # -- refusals while ready keep the assignment
    add(assign(c, everything, seq_len=512))
    add(activation(c.dim, 0, Stage.MLP, 3, seed=7))
    # -- a corrupted share and a share that lies about its layer
    add(assign(c, {2: ((), ((0, 32),))}))
    good = serialize_layer_share(q8, 2, (), ((0, 32),))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    for off in range(0, len(bad), CHUNK):
        add(weights(2, bytes(bad), off, digest=hashlib.sha256(good).digest()))
    liar = bytearray(serialize_layer_share(q8, 2, (), ((0, 32),)))
    liar[8] = 3
    for off in range(0, len(liar), CHUNK):
        add(weights(2, bytes(liar), off))
    # -- BYE: another session's is dropped, the own one ends the session (nothing answered in it
    # any more); a new handshake starts from scratch
    add(frame(MsgType.BYE, {"reason": 0}, session=3))
    add(frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}))
    add(frame(MsgType.BYE, {"reason": 0}))
    add(activation(c.dim, 0, Stage.MLP, 0, seed=8))
    out.append(Handshake(session=4))
    add(activation(c.dim, 0, Stage.MLP, 0, seed=8, session=4))            # BAD_STATE
    add(frame(MsgType.HELLO, HELLO, session=4))
    return out


# ----------------------------------------------------------------------------- comparison


def _masked(f: Frame) -> object:
    p = dict(f.payload)
    if f.type == MsgType.READY:
        p["arena_used"] = p["arena_free"] = None
    elif f.type == MsgType.HEARTBEAT:
        p["uptime_ms"] = None
    elif f.type == MsgType.ERROR and p["code"] == ErrorCode.OUT_OF_MEMORY:
        p["text"] = re.sub(r"\d{4,}", "N", p["text"])
    return _fields(f, p)


def _fields(f: Frame, payload=None) -> tuple:
    """Every header field but the tag (and the CRC, which Frame does not keep), the payload."""
    return (f.type, f.src, f.dst, f.seq, f.session, f.flags, f.version, f.counter,
            f.payload if payload is None else payload)


def _recv_raw(link, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while not link.pending:
        if time.monotonic() > deadline:
            raise TimeoutError
        link.pending += link.framer.feed(link.ser.read(max(1, link.ser.in_waiting)))
    return link.pending.pop(0)


def _describe(raw: bytes) -> str:
    try:
        f = decode_frame(raw)
        return f"{MsgType(f.type).name} seq={f.seq} {f.payload}"[:300]
    except Exception:  # noqa: BLE001
        return raw.hex()[:120]


class Side:
    """One of the two peers: how bytes reach it, its replies, and its current session."""

    def __init__(self, name: str, send: Callable[[bytes], None], recv: Callable[[float], bytes],
                 key: bytes) -> None:
        self.name, self.send, self.recv, self.key = name, send, recv, key
        self.session: auth.AuthSession | None = None
        self.last = b""

    def seal(self, f: bytes, session: auth.AuthSession | None = None) -> bytes:
        s = session or self.session
        s.tx_counter += 1
        return s.key.seal(f, s.tx_counter)

    def open(self, raw: bytes, session: auth.AuthSession | None = None) -> Frame:
        (session or self.session).open(raw)  # BadTag / Replayed if not this session's
        return decode_frame(raw)


def _handshake(side: Side, hs_item: Handshake) -> tuple[Frame, Frame | None]:
    """Run one handshake with side; returns the RESPONSE and the answer to the CONFIRM (None
    if there is none). With expect "ack" the side's session becomes the new one."""
    key = auth.new_key() if hs_item.wrong_key else side.key
    hs = auth.CoordinatorHandshake(key, hs_item.device_id, session_id=hs_item.session,
                                   nonce_c=NONCE_C)
    side.send(frame(MsgType.AUTH, hs.challenge(), session=hs_item.session, dst=hs_item.device_id))
    raw = side.recv(5.0)
    assert not auth.is_sealed(raw), f"{side.name}: a sealed RESPONSE"
    resp = decode_frame(raw)
    assert resp.type == MsgType.AUTH and resp.payload["step"] == AuthStep.RESPONSE, resp
    if hs_item.wrong_key:
        with pytest.raises(auth.AuthError):
            hs.on_response(resp.payload)
        body = resp.payload["body"]
        proof = auth.coordinator_proof(key, NONCE_C, body["nonce_p"], hs_item.device_id, hs_item.session)
        side.send(frame(MsgType.AUTH, auth.confirm(proof), session=hs_item.session, dst=hs_item.device_id))
        with pytest.raises(TimeoutError):
            side.recv(0.7)
        return resp, None
    confirm = hs.on_response(resp.payload)  # the side's proof verifies
    side.send(frame(MsgType.AUTH, confirm, session=hs_item.session, dst=hs_item.device_id))
    answer = side.open(side.recv(5.0), hs.session)
    if hs_item.expect == "ack":
        assert answer.type == MsgType.ACK and answer.payload["acked_type"] == MsgType.AUTH, answer
        side.session = hs.session
    else:
        assert answer.type == MsgType.ERROR and answer.payload["code"] == ErrorCode.BUSY, answer
    return resp, answer


def _response_fields(f: Frame) -> tuple:
    body = dict(f.payload["body"])
    assert len(body.pop("nonce_p")) == 16 and len(body.pop("proof_p")) == 32
    return _fields(f, {"step": f.payload["step"], "body": body})


def test_board_and_host_core_answer_every_frame_alike(musca_board, stories260k_dir):
    from tpfed.compute.int8_forward import Q8Model
    from tpfed.runtime.peer_core import DeviceInfo, MemPeer, PeerConfig

    q8 = Q8Model.load(stories260k_dir / "stories260K.bin")
    link = musca_board
    key = link.key
    link.provision()  # repeated until ACKed: bytes sent before its UART is up are lost
    board = Side("board", lambda b: link.send_raw(b"\x00" + StreamFramer.encode(b)),
                 lambda t: _recv_raw(link, t), key)
    with pytest.raises(TimeoutError):
        while True:  # ACKs of PROVISION frames that were slow rather than lost
            board.recv(0.5)
    # The PROVISION to compare (ACKed again: the board holds this key), before any handshake.
    provision = encode_frame(Frame(MsgType.PROVISION, {"key": key}, seq=500))
    board.send(provision)
    board_prov_ack = board.recv(5.0)
    assert decode_frame(board_prov_ack).payload == {"acked_seq": 500, "acked_type": MsgType.PROVISION, "held": b""}

    _, board_ack = _handshake(board, Handshake(SESSION))
    hello = frame(MsgType.HELLO, HELLO)
    board.send(board.seal(hello))
    board_hello = board.open(board.recv(5.0))
    assert board_hello.type == MsgType.HELLO, board_hello
    h = board_hello.payload
    info = DeviceInfo(board=h["name"], port="qemu-cortex-m33", cpu_hz=h["cpu_mhz"] * 1_000_000,
                      ram_bytes=h["ram_kb"] * 1024, flash_bytes=h["flash_kb"] * 1024,
                      link_baud=115200, cores=h["cores"], has_fpu=False, has_simd=False)
    config = PeerConfig(device_class=h["device_class"], transports=h["transports"],
                        max_frame=MAX_FRAME, max_groups=MAX_GROUPS, max_ranges=MAX_RANGES,
                        int8_macs=h["int8_macs"], provision=True)
    host = MemPeer(info, ARENA, config, manual_clock=True)
    host_out: list[bytes] = []
    hostside = Side("host", lambda b: host_out.extend(host.handle(b)), lambda t: _pop(host_out), key)

    # Keyed alike: the same PROVISION ACKed with the same bytes (the board ACKs its own key again).
    hostside.send(provision)
    assert hostside.recv(0) == board_prov_ack
    # Each its own handshake: RESPONSEs alike but for nonce and proof, ACKs alike once opened.
    host_resp, host_ack = _handshake(hostside, Handshake(SESSION))
    hostside.send(hostside.seal(hello))
    host_hello = hostside.open(hostside.recv(0))
    assert _fields(host_ack) == _fields(board_ack)
    assert _fields(host_hello) == _fields(board_hello)
    assert not host_out

    mismatches: list[str] = []
    compared = exact = 0
    items = corpus(q8)
    for i, item in enumerate(items):
        if isinstance(item, Handshake):
            b_resp, b_ans = _handshake(board, item)
            h_resp, h_ans = _handshake(hostside, item)
            same = [_response_fields(b_resp) == _response_fields(h_resp)]
            if b_ans is not None or h_ans is not None:
                same.append(b_ans is not None and h_ans is not None and _fields(b_ans) == _fields(h_ans))
            compared += len(same)
            exact += sum(same)
            if not all(same):
                mismatches.append(f"item {i} (handshake {item}): board {b_resp} {b_ans} "
                                  f"!= host {h_resp} {h_ans}")
            continue
        for side in (hostside, board):
            if isinstance(item, Replay):
                data = side.last
            else:
                data = side.seal(item.frame) if item.seal else item.frame
                data = item.post(data) if item.post else data
            side.last = data
        want = host.handle(hostside.last)
        board.send(board.last)
        what = _describe(item.frame) if isinstance(item, Send) else "replay"
        for k, w in enumerate(want):
            try:
                got = board.recv(5.0)
            except TimeoutError:
                mismatches.append(f"item {i} ({what}): board silent, host sent {_describe(w)}")
                break
            compared += 1
            try:
                gf, wf = board.open(got), hostside.open(w)
            except auth.ProtocolError as exc:
                mismatches.append(f"item {i} ({what}) reply {k}: does not open: {exc!r}")
                continue
            exact += _fields(gf) == _fields(wf)
            if _masked(gf) != _masked(wf):
                mismatches.append(f"item {i} ({what}) reply {k}: board {_describe(got)} "
                                  f"!= host {_describe(w)}")
        assert len(mismatches) < 5, "\n".join(mismatches)
    extra = []
    while True:
        try:
            extra.append(_describe(board.recv(0.5)))
        except TimeoutError:
            break
    assert not mismatches and not extra, "\n".join(mismatches + ["extra: " + e for e in extra])
    assert host.overflow == 0
    s = host.stats()
    assert s["activations"] > 10 and s["dropped"] > 5 and s["errors_sent"] > 15, s
    assert s["auth_dropped"] >= 8 and s["replayed"] == 1 and s["busy"] == 1 and s["sessions"] == 2, s
    assert link.board.alive(), link.board.output()
    # Only READY, HEARTBEAT and OUT_OF_MEMORY answers may differ, in their masked fields.
    assert compared > 50 and compared - exact <= 10, (compared, exact)


def _pop(out: list[bytes]) -> bytes:
    if not out:
        raise TimeoutError
    return out.pop(0)
