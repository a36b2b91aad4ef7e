#!/usr/bin/env python3
"""Seed corpus of the libFuzzer harnesses in tests/fuzz (tools/fuzz.sh runs this).

    python3 tests/fuzz/gen_corpus.py OUT_DIR      -> OUT_DIR/{frame,cobs,datagram,peer}/*

Frames are built by hand here (struct + zlib: CRC-32 over header + payload); when the repo's
Python codec (shared_protocol) is importable, every built frame is checked with it and its
golden frames are added to the frame and COBS seeds. Only the standard library is needed
otherwise. The seed formats follow the harnesses' input layouts (see each fuzz_*.c).

The peer seeds play a whole session against a small model geometry (dim 64, 8 heads, 4 KV
heads, hidden 172, 2 layers, seq_len 16): the AUTH handshake (CHALLENGE, RESPONSE, CONFIRM, with
the peer nonces fuzz_peer.c's deterministic random hands out and its federation key FUZZ_KEY),
then every frame sealed with the session key (counter and tag, as shared_protocol/auth.py does):
HELLO, ASSIGN, WEIGHTS chunks of valid layer shares (the layout of host/tpfed/compute/share.py,
SHA-256 included), READY, then ACTIVATIONs of both stages, HEARTBEAT, PROBE, BYE, and some
variations (chunks out of order and repeated, a bad hash, re-ASSIGN, a too-small frame limit).
Others exercise the authentication: unsealed and replayed frames, another session, a second
coordinator (BUSY), a wrong key, a new handshake after BYE, PROVISION of a keyless peer, a peer
without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAGIC, FRAG_MAGIC, VERSION = 0xA7, 0xA8, 0x10
HELLO, ASSIGN, WEIGHTS, READY, AUTH, PROVISION = 1, 2, 3, 4, 5, 6
ACTIVATION, PARTIAL = 16, 17
HEARTBEAT, ACK, NACK, ERROR, BYE = 32, 33, 34, 35, 36
PROBE, PROBE_REPLY = 48, 49
TYPES = [HELLO, ASSIGN, WEIGHTS, READY, ACTIVATION, PARTIAL, HEARTBEAT, ACK, NACK, ERROR, BYE,
         PROBE, PROBE_REPLY]   # the order of fuzz_frame.c's payload selector
GRANULE = 64
FLAG_AUTH = 4
AUTH_OVERHEAD = 36          # header 12 + counter 4 + tag 16 + CRC 4
FUZZ_KEY = bytes(range(0x30, 0x50))  # fuzz_peer.c FUZZ_KEY
NONCE_C = bytes(range(0xC0, 0xD0))   # the seeds' coordinator nonce (any 16 bytes)
CHALLENGE, RESPONSE, CONFIRM = 1, 2, 3

try:  # the repo's codec, to cross-check what is built here
    sys.path.insert(0, str(ROOT))
    from shared_protocol import auth as _auth  # noqa: E402
    from shared_protocol import codec as _codec  # noqa: E402
    from shared_protocol import golden_data as _golden  # noqa: E402
except Exception:  # construct missing, or the package moved: hand-built bytes only
    _auth = None
    _codec = None
    _golden = None


def frame(msg_type: int, payload: bytes, *, src: int = 0, dst: int = 1, seq: int = 0,
          session: int = 7, flags: int = 0, version: int = VERSION, check: bool = True) -> bytes:
    head = struct.pack("<BBBBBBHHH", MAGIC, version, msg_type, flags, src, dst, seq, session,
                       len(payload))
    body = head + payload
    out = body + struct.pack("<I", zlib.crc32(body))
    if check and _codec is not None:
        _codec.decode_frame(out)   # raises if the hand-built frame is not what the codec says
    return out


# --------------------------------------------------------------------------- authentication
# (shared_protocol/auth.py, with the standard library only; cross-checked with it if importable)

def _binding(nonce_c: bytes, nonce_p: bytes, device_id: int, session: int) -> bytes:
    return nonce_c + nonce_p + struct.pack("<BH", device_id, session)


def derive(key: bytes, label: bytes, nonce_c: bytes, nonce_p: bytes, device_id: int,
           session: int) -> bytes:
    return hmac.new(key, label + _binding(nonce_c, nonce_p, device_id, session), hashlib.sha256).digest()


def seal(ks: bytes, unsealed: bytes, counter: int) -> bytes:
    """A frame without AUTH -> sealed: AUTH flag, counter and tag before a new CRC."""
    body = bytearray(unsealed[:-4])
    body[3] |= FLAG_AUTH
    body += struct.pack("<I", counter)
    body += hmac.new(ks, bytes(body), hashlib.sha256).digest()[:16]
    out = bytes(body) + struct.pack("<I", zlib.crc32(body))
    if _auth is not None:
        assert out == _auth.seal(ks, unsealed, counter)
        assert _auth.verify(ks, out) == counter
        _codec.decode_frame(out)
    return out


def peer_nonce(index: int) -> bytes:
    """The peer nonce of the index-th handshake fuzz_peer.c's random serves (byte i: i)."""
    return bytes((16 * index + i) & 0xFF for i in range(16))


# --------------------------------------------------------------------------- payloads

def hello(name: bytes = b"fuzz", max_frame: int = 1024) -> bytes:
    return (struct.pack("<BB", 7, len(name)) + name
            + struct.pack("<IIIHBBQBhBHI", 512, 0, 4096, 240, 2, 1, 1_000_000, 255, -32768, 2,
                          max_frame, 64))


def layer_entry(layer: int, groups: list[int], ranges: list[tuple[int, int]],
                sha: bytes = bytes(32)) -> bytes:
    """One ASSIGN entry naming ``sha``, the sha256 of the share wanted (zeros: none)."""
    out = struct.pack("<HB", layer, len(groups)) + b"".join(struct.pack("<H", g) for g in groups)
    out += struct.pack("<B", len(ranges)) + b"".join(struct.pack("<II", a, b) for a, b in ranges)
    return out + sha


class Geometry:
    def __init__(self, dim=64, hidden=172, n_layers=2, n_heads=8, n_kv=4, seq_len=16):
        self.dim, self.hidden, self.n_layers = dim, hidden, n_layers
        self.n_heads, self.n_kv, self.seq_len = n_heads, n_kv, seq_len
        self.head_size = dim // n_heads
        self.group_size = n_heads // n_kv


def assign(g: Geometry, entries: list[bytes], flags: int = 0) -> bytes:
    return (struct.pack("<HIHHHHffHH", g.dim, g.hidden, g.n_layers, g.n_heads, g.n_kv, g.seq_len,
                        1e-5, 10000.0, flags, len(entries)) + b"".join(entries))


def weights(shard_id: int, offset: int, total: int, sha: bytes, data: bytes) -> bytes:
    return struct.pack("<HII", shard_id, offset, total) + sha + data


def activation(layer: int, stage: int, pos: int, qs: bytes, scales: list[int]) -> bytes:
    return (struct.pack("<HBHH", layer, stage, pos, len(qs))
            + b"".join(struct.pack("<H", s) for s in scales) + qs)


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def q8_matrix(rows: int, cols: int, rng: random.Random) -> bytes:
    qs = bytes(rng.randrange(256) for _ in range(rows * cols))
    nb = -(-cols // 32)
    # Finite fp16 scales around 2^-8 .. 2^-6.
    scales = b"".join(struct.pack("<H", 0x1C00 + rng.randrange(0x800)) for _ in range(rows * nb))
    return pad4(qs) + pad4(scales)


def layer_share(g: Geometry, layer: int, groups: list[int], ranges: list[tuple[int, int]],
                rng: random.Random) -> bytes:
    gq = g.group_size * g.head_size
    body = pad4(b"".join(struct.pack("<H", x) for x in groups))
    body += b"".join(struct.pack("<II", a, b) for a, b in ranges)
    for _ in groups:
        body += q8_matrix(gq, g.dim, rng) + q8_matrix(g.head_size, g.dim, rng)
        body += q8_matrix(g.head_size, g.dim, rng) + q8_matrix(g.dim, gq, rng)
    for a, b in ranges:
        n = b - a
        body += q8_matrix(n, g.dim, rng) + q8_matrix(n, g.dim, rng) + q8_matrix(g.dim, n, rng)
    total = 40 + len(body)
    head = b"TPLS" + struct.pack("<HHIIIHHHHHHQ", 1, 40, layer, g.dim, g.hidden, g.head_size,
                                 g.group_size, len(groups), len(ranges), g.n_kv, 0, total)
    return head + body


# --------------------------------------------------------------------------- peer sessions

MAX_FRAMES = [1024, 320, 4096, 65535]   # fuzz_peer.c's config bits 0-1


def peer_config(max_frame_idx: int = 0, big: bool = False, fixup: bool = True, skew: int = 0,
                tight: bool = False) -> int:
    return (max_frame_idx | (4 if big else 0) | (8 if fixup else 0) | ((skew & 7) << 4)
            | (0x80 if tight else 0))


KEYED, NO_KEY, PROVISIONABLE = 0, 1, 3   # fuzz_peer.c's byte 1


def records(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("<H", len(f)) + f for f in frames)


class Session:
    """A coordinator's frames to one fuzzed peer: handshakes, then frames sealed in the
    current session (``send``), unsealed (``send_plain``) or replayed (``replay``)."""

    def __init__(self, max_frame: int, session: int = 7, dst: int = 1):
        self.frames: list[bytes] = []
        self.seq = 0
        self.session = session
        self.dst = dst
        self.max_frame = max_frame
        self.handshakes = 0       # new CHALLENGEs the peer answered (each took 16 random bytes)
        self.ks: bytes | None = None
        self.counter = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq & 0xFFFF

    def handshake(self, session: int | None = None, device_id: int | None = None,
                  key: bytes = FUZZ_KEY, adopt: bool = True, confirm: bool = True) -> None:
        """CHALLENGE and CONFIRM (the RESPONSE is the peer's). adopt: the session is now this
        one (false: a second coordinator, answered BUSY)."""
        session = self.session if session is None else session
        device_id = self.dst if device_id is None else device_id
        nonce_p = peer_nonce(self.handshakes)
        self.handshakes += 1
        self.frames.append(frame(AUTH, bytes([CHALLENGE]) + NONCE_C + struct.pack("<HB", session, device_id),
                                 seq=self._next_seq(), session=session, dst=device_id))
        if not confirm:
            return
        proof_c = derive(key, b"tpfed-coord", NONCE_C, nonce_p, device_id, session)
        self.frames.append(frame(AUTH, bytes([CONFIRM]) + proof_c, seq=self._next_seq(),
                                 session=session, dst=device_id))
        if _auth is not None:
            assert proof_c == _auth.coordinator_proof(key, NONCE_C, nonce_p, device_id, session)
        if adopt:
            self.session, self.dst = session, device_id
            self.ks = derive(key, b"tpfed-session", NONCE_C, nonce_p, device_id, session)
            self.counter = 0

    def send(self, msg_type: int, payload: bytes, **kw) -> None:
        kw.setdefault("dst", self.dst)
        kw.setdefault("session", self.session)
        f = frame(msg_type, payload, seq=self._next_seq(), **kw)
        if self.ks is not None:
            self.counter += 1
            f = seal(self.ks, f, self.counter)
        self.frames.append(f)

    def send_plain(self, msg_type: int, payload: bytes, **kw) -> None:
        kw.setdefault("dst", self.dst)
        kw.setdefault("session", self.session)
        self.frames.append(frame(msg_type, payload, seq=self._next_seq(), **kw))

    def replay(self, back: int = 1) -> None:
        self.frames.append(self.frames[-back])

    def chunks(self, layer: int, share: bytes, sha: bytes | None = None, order=None, repeat=False):
        sha = sha or hashlib.sha256(share).digest()
        room = (self.max_frame - AUTH_OVERHEAD - 42) // GRANULE * GRANULE
        offs = list(range(0, len(share), room))
        if order == "reverse":
            offs.reverse()
        elif order == "shuffle":
            random.Random(layer).shuffle(offs)
        for i, off in enumerate(offs):
            self.send(WEIGHTS, weights(layer, off, len(share), sha, share[off:off + room]))
            if repeat and i == 0:
                self.send(WEIGHTS, weights(layer, off, len(share), sha, share[off:off + room]))


def peer_seeds() -> dict[str, bytes]:
    g = Geometry()
    rng = random.Random(1234)
    act_qs = bytes(rng.randrange(256) for _ in range(g.dim))
    act_scales = [0x3C00, 0x3800]   # fp16 1.0, 0.5
    seeds: dict[str, bytes] = {}

    def work(s: Session, plan, order=None, repeat=False, bad_hash=False, positions=1) -> dict:
        s.send(ASSIGN, assign(g, [layer_entry(*e) for e in plan]))
        shares = {}
        for layer, groups, ranges in plan:
            share = shares[layer] = layer_share(g, layer, groups, ranges, rng)
            if bad_hash:
                s.chunks(layer, share, sha=b"\x5a" * 32)
            s.chunks(layer, share, order=order, repeat=repeat)
        for pos in range(positions):
            for layer, groups, ranges in plan:
                if groups:
                    s.send(ACTIVATION, activation(layer, 0, pos, act_qs, act_scales))
                if ranges:
                    s.send(ACTIVATION, activation(layer, 1, pos, act_qs, act_scales))
        return shares

    def session(name: str, cfg: int, plan: list[tuple[int, list[int], list[tuple[int, int]]]],
                order=None, repeat=False, bad_hash=False, reassign=False, tail=True,
                auth_cfg=KEYED, extra=None, keep=False):
        s = Session(MAX_FRAMES[cfg & 3])
        if auth_cfg == PROVISIONABLE:
            s.send_plain(PROVISION, FUZZ_KEY, session=0)
        s.handshake()
        s.send(HELLO, hello(), dst=1)
        shares = work(s, plan, order=order, repeat=repeat, bad_hash=bad_hash,
                      positions=3 if tail else 1)
        if keep:
            # the same shares named by sha256 (kept), then in reverse order with one left out
            # and one named by another share's hash (moved, dropped), then after BYE and a new
            # session, kept again
            shas = {layer: hashlib.sha256(b).digest() for layer, b in shares.items()}
            s.send(ASSIGN, assign(g, [layer_entry(*e, sha=shas[e[0]]) for e in plan]))
            s.send(ACTIVATION, activation(plan[0][0], 0, 0, act_qs, act_scales))
            first = plan[0]
            s.send(ASSIGN, assign(g, [layer_entry(*plan[-1], sha=shas[first[0]]),
                                      layer_entry(first[0], first[1], first[2], sha=shas[first[0]])]
                                  if len(plan) > 1 else [layer_entry(*first, sha=shas[first[0]])]))
            s.send(BYE, b"\0")
            s.handshake()
            s.send(ASSIGN, assign(g, [layer_entry(*e, sha=shas[e[0]]) for e in plan]))
        if tail:
            s.send(HEARTBEAT, struct.pack("<IB", 1234, 5))
            s.send(PROBE, struct.pack("<IQ", 99, 123456) + b"pad" * 5)
            if reassign:
                layer, groups, ranges = plan[0]
                s.send(ASSIGN, assign(g, [layer_entry(layer, groups[:1], ranges[:1])]))
                s.chunks(layer, layer_share(g, layer, groups[:1], ranges[:1], rng))
                s.send(ACTIVATION, activation(layer, 0, 0, act_qs, act_scales))
            if extra:
                extra(s)
            s.send(BYE, b"\0")
            s.send(HEARTBEAT, struct.pack("<IB", 1, 0))
        seeds[name] = bytes([cfg, auth_cfg]) + records(s.frames)

    small = [(0, [1], [(0, 32)])]
    mlp_only = [(1, [], [(160, 172)])]
    two = [(0, [0, 2], [(0, 64), (160, 172)]), (1, [1, 3], [(32, 96)])]
    session("small", peer_config(0), small)
    session("small_nofix", peer_config(0, fixup=False), small)
    session("small_skew", peer_config(0, skew=3), small, order="reverse", repeat=True)
    session("small_badhash", peer_config(0), small, bad_hash=True)
    session("mlp_only", peer_config(0), mlp_only)
    session("frame320", peer_config(1), small)
    session("frame4096", peer_config(2), small, order="shuffle")
    session("two_layers_big", peer_config(0, big=True), two, reassign=True)
    session("two_layers_kept", peer_config(0, big=True), two, keep=True)
    session("small_kept", peer_config(0), small, keep=True)
    session("two_layers_64k", peer_config(3, big=True), two)
    session("two_layers_small_arena", peer_config(0), two)
    session("tight_limits", peer_config(0, big=True, tight=True), two, tail=False)
    session("provisioned", peer_config(0), small, auth_cfg=PROVISIONABLE)

    # -- authentication
    def refusals(s: Session) -> None:
        """Unsealed frames, a replay, another session, a sealed AUTH, a made-up CONFIRM."""
        s.send_plain(HEARTBEAT, struct.pack("<IB", 1, 0))
        s.send_plain(ACTIVATION, activation(0, 0, 1, act_qs, act_scales))
        s.send_plain(BYE, b"\0")
        s.send(HEARTBEAT, struct.pack("<IB", 2, 0))
        s.replay()
        s.send(HEARTBEAT, struct.pack("<IB", 3, 0), session=s.session + 1)
        s.send(AUTH, bytes([CHALLENGE]) + NONCE_C + struct.pack("<HB", s.session, 1))
        s.send_plain(AUTH, bytes([CONFIRM]) + bytes(32))
        s.send(ACTIVATION, activation(0, 0, 1, act_qs, act_scales))

    def second_coordinator(s: Session) -> None:
        s.handshake(session=s.session + 5, device_id=2, adopt=False)   # BUSY
        s.send(ACTIVATION, activation(0, 0, 2, act_qs, act_scales))

    def wrong_key(s: Session) -> None:
        s.handshake(session=s.session + 6, key=bytes(32), adopt=False)  # CONFIRM dropped
        s.send(HEARTBEAT, struct.pack("<IB", 4, 0))

    def repeats(s: Session) -> None:
        """A CHALLENGE and a CONFIRM repeated (lost answers): the same RESPONSE, the ACK again."""
        s.frames += s.frames[:2] if s.frames[0][2] == AUTH else s.frames[1:3]
        s.send(HEARTBEAT, struct.pack("<IB", 5, 0))

    session("auth_refusals", peer_config(0), small, extra=refusals)
    session("auth_refusals_nofix", peer_config(0, fixup=False), small, extra=refusals)
    session("auth_busy", peer_config(0), small, extra=second_coordinator)
    session("auth_wrong_key", peer_config(0), small, extra=wrong_key)
    session("auth_repeats", peer_config(0), small, extra=repeats)

    # After BYE a new handshake (session 11) starts from scratch.
    s = Session(MAX_FRAMES[0])
    s.handshake()
    work(s, small)
    s.send(BYE, b"\0")
    s.send(ACTIVATION, activation(0, 0, 0, act_qs, act_scales))   # no session: dropped
    s.handshake(session=11, device_id=3)
    s.send(ACTIVATION, activation(0, 0, 0, act_qs, act_scales))   # BAD_STATE
    work(s, mlp_only)
    seeds["auth_rehandshake"] = bytes([peer_config(0), KEYED]) + records(s.frames)

    # The same session without the handshake and unsealed: all dropped.
    s = Session(MAX_FRAMES[0])
    s.send(HELLO, hello(), dst=1)
    work(s, small)
    seeds["unsealed"] = bytes([peer_config(0), KEYED]) + records(s.frames)
    # A peer without a key: a handshake and everything after it go unanswered.
    s = Session(MAX_FRAMES[0])
    s.send_plain(PROVISION, FUZZ_KEY, session=0)   # not provisionable
    s.handshake()
    s.send(HELLO, hello(), dst=1)
    work(s, small)
    seeds["no_key"] = bytes([peer_config(0), NO_KEY]) + records(s.frames)
    # Garbage after a good handshake.
    s = Session(MAX_FRAMES[0])
    s.handshake()
    s.frames += [bytes(random.Random(i).randrange(256) for _ in range(40 + 13 * i)) for i in range(6)]
    s.send(HEARTBEAT, struct.pack("<IB", 1, 0))
    seeds["garbage"] = bytes([peer_config(0), KEYED]) + records(s.frames)
    return seeds


# --------------------------------------------------------------------------- other harnesses

def sample_frames() -> list[bytes]:
    g = Geometry()
    rng = random.Random(5)
    share = layer_share(g, 0, [1], [(0, 32)], rng)
    out = [
        frame(HELLO, hello(name="Küche ✓".encode())),
        frame(ASSIGN, assign(g, [layer_entry(0, [0, 2], [(0, 64), (160, 172)]), layer_entry(1, [1], [])])),
        frame(WEIGHTS, weights(0, 0, len(share), hashlib.sha256(share).digest(), share[:512])),
        frame(READY, struct.pack("<III", 1, 2, 3)),
        frame(ACTIVATION, activation(0, 0, 3, bytes(range(64)), [0x3C00, 0x3800])),
        frame(ACTIVATION, activation(0, 1, 3, bytes(range(33)), [0x3C00, 0x3800])),
        frame(PARTIAL, struct.pack("<HBHBH", 0, 0, 1, 0, 4) + struct.pack("<4f", 1, 2, 3, 4)),
        frame(PARTIAL, struct.pack("<HBHBH", 0, 1, 1, 1, 3) + b"\x00\x3c" * 3),
        frame(PARTIAL, struct.pack("<HBHBH", 0, 1, 1, 2, 33) + b"\x00\x3c" * 2 + bytes(33)),
        frame(HEARTBEAT, struct.pack("<IB", 1, 2)),
        frame(ACK, struct.pack("<HB", 5, 3)),
        frame(NACK, struct.pack("<HBB", 5, 3, 2)),
        frame(ERROR, struct.pack("<HB", 5, 4) + b"oops"),
        frame(BYE, b"\x02"),
        frame(PROBE, struct.pack("<IQ", 1, 2) + b"xyz"),
        frame(PROBE_REPLY, struct.pack("<IQ", 1, 2)),
    ]
    if _golden is not None:
        for e in _golden.entries():
            if e["kind"] in ("frame", "invalid"):
                out.append(_golden.read(e["file"]))
    return out


def cobs_encode(data: bytes) -> bytes:
    out, block = bytearray(), bytearray()
    for b in data:
        if b == 0:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out += b"\xff" + block
                block = bytearray()
    out += bytes([len(block) + 1]) + block
    return bytes(out)


def frame_seeds() -> dict[str, bytes]:
    seeds = {}
    for i, f in enumerate(sample_frames()):
        seeds[f"whole_{i}"] = b"\x00" + f
        seeds[f"fixed_{i}"] = b"\x20" + f     # length and CRC fixed up by the harness
        seeds[f"limit_{i}"] = b"\x08" + f     # max_payload 1008
        if len(f) >= 16 and f[0] == MAGIC and f[2] in TYPES:
            seeds[f"payload_{i}"] = b"\x01" + bytes([TYPES.index(f[2])]) + f[12:-4]
    seeds["utf8"] = b"\x03" + "Küche ✓ 😀".encode() + b"\xed\xa0\x80\xf4\x90\x80\x80"
    seeds["crc"] = b"\x04" + bytes(range(200))
    seeds["struct_first"] = b"\x02" + bytes(range(256))
    seeds["sub_share_header"] = b"\x01" + bytes([104 + 2]) + layer_share(Geometry(), 0, [1], [(0, 32)],
                                                                         random.Random(1))[:40]
    seeds["sub_entry"] = b"\x01" + bytes([104 + 3]) + layer_entry(3, [1, 2], [(0, 32)])
    return seeds


def cobs_seeds() -> dict[str, bytes]:
    seeds = {}
    frames = sample_frames()[:16]
    for i, f in enumerate(frames):
        seeds[f"frame_{i}"] = b"\x00" + f
    seeds["zeros"] = b"\x00" + bytes(600)
    seeds["long"] = b"\x00" + bytes((i % 255) + 1 for i in range(700))
    stream = b"".join(cobs_encode(f) + b"\x00" for f in frames[:6])
    seeds["stream_roomy"] = b"\x01\xff" + b"garbage\x00" + stream
    seeds["stream_small"] = b"\x01\x40" + stream
    if _golden is not None:
        for e in _golden.entries("cobs_stream"):
            seeds[e["file"]] = b"\x01\xff" + _golden.read(e["file"])
    return seeds


def datagram_seeds() -> dict[str, bytes]:
    seeds = {}
    frames = sample_frames()[:16]

    def cfg(slots=4, max_frame=2048, timeout=100, skew=0, now=1000):
        return struct.pack("<BHBBI", slots - 1, max_frame - 16, (timeout - 1) // 8, skew, now)

    def split(f: bytes, mtu: int, order=0, drop=0, tag=0):
        return struct.pack("<BHHBB", 0xA0 + tag, mtu, len(f), order, drop) + f

    def raw(d: bytes, source=0, dt=0):
        return struct.pack("<BH", (source & 3) | ((dt & 7) << 2), len(d)) + d

    seeds["whole"] = cfg() + b"".join(raw(f, i) for i, f in enumerate(frames[:4]))
    seeds["split_small_mtu"] = cfg() + b"".join(split(f, 40, order=i * 17) for i, f in enumerate(frames[:6]))
    seeds["split_dup_drop"] = cfg() + split(frames[2], 100, order=3, drop=4) + split(frames[4], 60, drop=3)
    seeds["split_big"] = cfg(max_frame=4096) + split(bytes([MAGIC]) + bytes(range(256)) * 12, 512, order=0x35)
    seeds["tight"] = cfg(slots=1, max_frame=64) + split(frames[0], 20) + split(frames[3], 20, tag=1)
    # Fragments by hand, interleaved from two sources, plus an expire.
    f = frames[1]
    chunk = 30
    parts = [f[i:i + chunk] for i in range(0, len(f), chunk)]
    frags = [struct.pack("<BHBB", FRAG_MAGIC, 9, i, len(parts)) + p for i, p in enumerate(parts)]
    seeds["raw_frags"] = cfg(slots=2) + b"".join(raw(x, 1) + raw(x, 2, dt=1) for x in reversed(frags)) + b"\xf0\x10\x00"
    return seeds


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    groups = {"frame": frame_seeds(), "cobs": cobs_seeds(), "datagram": datagram_seeds(),
              "peer": peer_seeds()}
    for name, seeds in groups.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed_*"):
            old.unlink()
        for key, data in seeds.items():
            (d / f"seed_{key}").write_bytes(data)
    counts = ", ".join(f"{k} {len(v)}" for k, v in groups.items())
    src = "shared_protocol checked" if _codec is not None else "hand-built only"
    print(f"gen_corpus.py: seeds in {out} ({counts}; {src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
