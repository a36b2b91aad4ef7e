"""Frame authentication: the Python reference (shared_protocol/auth.py), the C one
(firmware/lib/tpfed/src/auth.c through tpfed.compute._native) and the MicroPython codec agree
byte for byte on proofs, session keys, tags and sealed frames (golden vectors and random
input); the replay windows agree; and a Python coordinator runs the handshake against the C
peer core and talks to it with sealed frames only."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpfed.compute._native import ffi, lib
from tpfed.protocol import auth, mp_codec
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.errors import BadTag, Replayed
from tpfed.protocol.golden_data import entries, read
from tpfed.protocol.schema import MsgType, Status

VECTORS = entries("auth_vectors")
SEALED = [e for e in entries("frame") if "auth" in e]
WHAT = {"proof_p": lib.TPFED_AUTH_PEER_PROOF, "proof_c": lib.TPFED_AUTH_COORD_PROOF,
        "session_key": lib.TPFED_AUTH_SESSION_KEY}


def c_key(key: bytes):
    k = ffi.new("tpfed_hmac_key *")
    lib.tpfed_hmac_key_init(k, key, len(key))
    return k


def c_derive(key: bytes, what: int, nonce_c: bytes, nonce_p: bytes, device_id: int, session: int) -> bytes:
    out = ffi.new("uint8_t[32]")
    assert lib.tpfed_auth_derive(out, c_key(key), what, nonce_c, nonce_p, device_id, session) == 0
    return bytes(out)


# --- golden ----------------------------------------------------------------------------------


def test_golden_has_handshake_vectors_and_sealed_frames() -> None:
    assert len(VECTORS) == 1 and len(SEALED) >= 5
    assert any(not e["auth"]["valid"] for e in SEALED)
    assert {e["type"] for e in entries("frame")} >= {"AUTH", "PROVISION"}


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: "vectors")
def test_handshake_vectors_python_c_micropython(v: dict) -> None:
    u = bytes.fromhex
    key, args = u(v["key"]), (u(v["nonce_c"]), u(v["nonce_p"]), v["device_id"], v["session"])
    python = {"proof_p": auth.peer_proof(key, *args), "proof_c": auth.coordinator_proof(key, *args),
              "session_key": auth.session_key(key, *args)}
    for name, what in WHAT.items():
        assert python[name].hex() == v[name]
        assert c_derive(key, what, *args).hex() == v[name]
    for label, name in zip(mp_codec.AUTH_LABELS, ("proof_p", "proof_c", "session_key"), strict=True):
        assert mp_codec.auth_derive(key, label, *args).hex() == v[name]
    # The handshake frames carry them.
    resp = decode_frame(read("auth_response.bin"))
    conf = decode_frame(read("auth_confirm.bin"))
    assert resp.payload["body"]["proof_p"].hex() == v["proof_p"]
    assert conf.payload["body"]["proof_c"].hex() == v["proof_c"]


@pytest.mark.parametrize("entry", SEALED, ids=lambda e: e["file"])
def test_golden_sealed_frames_verify_alike(entry: dict) -> None:
    data, a = read(entry["file"]), entry["auth"]
    ks = bytes.fromhex(a["key"])
    counter = ffi.new("uint32_t *")
    c_rc = lib.tpfed_auth_verify(data, len(data), c_key(ks), counter)
    if a["valid"]:
        assert auth.verify(ks, data) == a["counter"] == mp_codec.verify(ks, data)
        assert c_rc == Status.OK and counter[0] == a["counter"]
    else:
        with pytest.raises(BadTag):
            auth.verify(ks, data)
        with pytest.raises(mp_codec.BadTag):
            mp_codec.verify(ks, data)
        assert c_rc == Status.BAD_TAG
    # Another key never verifies.
    assert lib.tpfed_auth_verify(data, len(data), c_key(bytes(32)), counter) == Status.BAD_TAG


# --- random input: C == Python ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_hmac_c_equals_python(key: bytes, data: bytes) -> None:
    mac = ffi.new("uint8_t[32]")
    lib.tpfed_hmac_sha256(mac, key, len(key), data, len(data))
    assert bytes(mac) == hmac.new(key, data, hashlib.sha256).digest() == mp_codec.hmac_sha256(key, data)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 0xFFFFFFFF),
       st.sampled_from([0, 1, 95, 270, 1000, 4104]), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_c_seal_equals_python_seal(ks: bytes, counter: int, n: int, dst: int, session: int) -> None:
    payload = {"nonce": 7, "t_send_us": 9, "pad": bytes(range(256)) * (n // 256) + bytes(n % 256)}
    plain = encode_frame(Frame(MsgType.PROBE, payload, dst=dst, seq=5, session=session))
    want = auth.seal(ks, plain, counter)
    assert mp_codec.seal(ks, plain, counter) == want
    # C: lay the payload out, tpfed_auth_finish.
    pl = plain[12:-4]
    buf = ffi.new("uint8_t[]", len(want))
    ffi.memmove(buf + 12, pl, len(pl))
    h = ffi.new("tpfed_header_t *", {"type": MsgType.PROBE, "dst": dst, "seq": 5, "session": session})
    flen = ffi.new("size_t *")
    assert lib.tpfed_auth_finish(buf, len(want), h, len(pl), c_key(ks), counter, flen) == Status.OK
    assert ffi.buffer(buf, flen[0])[:] == want
    # Re-stamping in place with another counter == sealing with it.
    assert lib.tpfed_auth_stamp(buf, flen[0], c_key(ks), 1) == Status.OK
    assert ffi.buffer(buf, flen[0])[:] == auth.seal(ks, plain, 1)
    assert lib.tpfed_auth_finish(buf, len(want) - 1, h, len(pl), c_key(ks), counter, flen) == Status.NO_SPACE
    f = decode_frame(want)
    assert (f.counter, f.payload["pad"]) == (counter, payload["pad"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=120))
def test_replay_windows_agree(counters: list[int]) -> None:
    py = auth.ReplayWindow()
    c = ffi.new("tpfed_replay_window *")
    lib.tpfed_replay_init(c)
    for k in counters:
        fresh = py.fresh(k)
        assert bool(lib.tpfed_replay_fresh(c, k)) == fresh
        if fresh:
            py.accept(k)
            lib.tpfed_replay_accept(c, k)
        assert (c.highest, c.bitmap) == (py.highest, py.bitmap)


def test_replay_window_rules() -> None:
    w = auth.ReplayWindow()
    assert not w.fresh(0)
    w.check(10)
    with pytest.raises(Replayed):
        w.check(10)
    w.check(9)
    w.check(100)
    assert not w.fresh(36) and w.fresh(37) and not w.fresh(100)


def test_sessions_seal_and_open_both_ways() -> None:
    key = auth.new_key()
    coord = auth.CoordinatorHandshake(key, 2)
    peer = auth.PeerHandshake(key)
    peer_side = peer.on_confirm(coord.on_response(peer.on_challenge(coord.challenge())))
    hb = encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 1, "load_pct": 2}, session=coord.session_id))
    sealed = coord.session.seal(hb)
    assert peer_side.open(sealed) is sealed
    with pytest.raises(Replayed):
        peer_side.open(sealed)
    other = auth.AuthSession(auth.new_key(), coord.session_id)
    with pytest.raises(BadTag):
        other.open(coord.session.seal(hb))
    assert (peer_side.stats.replayed, other.stats.auth_dropped) == (1, 1)
    wrong = auth.CoordinatorHandshake(auth.new_key(), 2)
    with pytest.raises(auth.AuthError):
        wrong.on_response(auth.PeerHandshake(key).on_challenge(wrong.challenge()))


def test_key_files(tmp_path) -> None:
    key = auth.new_key()
    p = auth.write_key_file(tmp_path / "fed.key", key)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert auth.read_key_file(p) == key
    (tmp_path / "raw.key").write_bytes(key)
    assert auth.read_key_file(tmp_path / "raw.key") == key
    (tmp_path / "bad.key").write_text("abc\n")
    with pytest.raises(ValueError, match="bad.key"):
        auth.read_key_file(tmp_path / "bad.key")
    out = ffi.new("uint8_t[32]")
    assert lib.tpfed_key_from_hex(out, key.hex().encode()) == 1 and bytes(out) == key
    assert lib.tpfed_key_from_hex(out, key.hex()[:-1].encode() + b"g") == 0
    assert lib.tpfed_key_from_hex(out, key.hex().encode() + b"0") == 0
    assert auth.key_hex_define(key) == f'-DTPFED_KEY_HEX=\\"{key.hex()}\\"'


# --- the C peer core and a Python coordinator ------------------------------------------------


class CPeer:
    """The C peer core in an arena, its HAL in Python callbacks (sent frames collected)."""

    def __init__(self, key: bytes | None) -> None:
        self.sent: list[bytes] = []
        self.now = 0
        self._cb = [
            ffi.callback("void(void *, const uint8_t *, uint32_t)",
                         lambda ctx, f, n: self.sent.append(ffi.buffer(f, n)[:])),
            ffi.callback("uint32_t(void *)", lambda ctx: self.now),
            ffi.callback("void(void *, uint8_t *, uint32_t)",
                         lambda ctx, buf, n: ffi.memmove(buf, os.urandom(n), n)),
        ]
        self.hal = ffi.new("tpfed_hal *", {"send_frame": self._cb[0], "millis": self._cb[1],
                                           "random": self._cb[2]})
        self.info = ffi.new("tpfed_device_info *")
        self._name = ffi.new("char[]", b"pytest")
        self.info.board = self._name
        self._key = ffi.new("uint8_t[32]", key) if key else ffi.NULL
        self.cfg = ffi.new("tpfed_peer_config *", {"hal": self.hal, "info": self.info,
                                                   "max_frame": 1024, "max_groups": 4,
                                                   "max_ranges": 4, "int8_macs": 1000,
                                                   "key": self._key})
        self.arena = ffi.new("uint8_t[]", 256 * 1024)
        self.p = lib.tpfed_peer_init(self.arena, 256 * 1024, self.cfg)
        assert self.p != ffi.NULL

    def feed(self, frame: bytes) -> list[bytes]:
        self.sent.clear()
        lib.tpfed_peer_handle_frame(self.p, frame, len(frame))
        return list(self.sent)


def test_python_coordinator_and_c_peer() -> None:
    key = auth.new_key()
    peer = CPeer(key)
    hs = auth.CoordinatorHandshake(key, 5)
    (resp,) = peer.feed(encode_frame(Frame(MsgType.AUTH, hs.challenge(), dst=5, session=hs.session_id)))
    confirm = hs.on_response(decode_frame(resp).payload)
    (ack,) = peer.feed(encode_frame(Frame(MsgType.AUTH, confirm, dst=5, seq=2, session=hs.session_id)))
    hs.session.open(ack)
    a = decode_frame(ack)
    assert a.type == MsgType.ACK and a.payload == {"acked_seq": 2, "acked_type": MsgType.AUTH, "held": b""}
    assert a.src == 5 and a.session == hs.session_id
    assert lib.tpfed_peer_in_session(peer.p) and lib.tpfed_peer_device_id(peer.p) == 5
    hello = {"device_class": 0, "name": "c", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0, "cpu_mhz": 0,
             "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255, "temperature_dc": 0,
             "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0}
    plain = encode_frame(Frame(MsgType.HELLO, hello, dst=5, seq=3, session=hs.session_id))
    assert peer.feed(plain) == []  # unsealed: dropped
    sealed = hs.session.seal(plain)
    (reply,) = peer.feed(sealed)
    hs.session.open(reply)
    assert decode_frame(reply).payload["name"] == "pytest"
    assert peer.feed(sealed) == []  # replayed: dropped
    stats = lib.tpfed_peer_get_stats(peer.p)
    assert (stats.auth_dropped, stats.replayed, stats.sessions) == (1, 1, 1)


def test_c_peer_without_key_answers_nothing() -> None:
    peer = CPeer(None)
    hs = auth.CoordinatorHandshake(auth.new_key(), 1)
    assert peer.feed(encode_frame(Frame(MsgType.AUTH, hs.challenge(), dst=1))) == []
    assert not lib.tpfed_peer_keyed(peer.p)
