"""Frame authentication, the Python reference (the C one is firmware/lib/tpfed/src/auth.c).

Keys. Every member of a federation holds the federation key K (32 bytes). A handshake proves K
in both directions with fresh nonces and derives a session key Ks for one coordinator and one
peer; every later frame, both ways, carries an AUTH trailer: a per-sender counter and a tag.

Handshake (message type AUTH; frames without the AUTH flag; ``b = nonce_c || nonce_p ||
device_id (u8) || session (u16 LE)``)::

    coordinator -> peer   CHALLENGE  nonce_c[16], session u16, device_id u8
    peer -> coordinator   RESPONSE   nonce_p[16], proof_p = HMAC(K, "tpfed-peer"  || b)
    coordinator -> peer   CONFIRM    proof_c = HMAC(K, "tpfed-coord" || b)
    peer -> coordinator   ACK (acked_type AUTH), the first frame sealed with
                          Ks = HMAC(K, "tpfed-session" || b)

Sealed frames: flags has ``Flag.AUTH``, header.session is the handshake's session, and
``counter u32 LE || tag[16]`` sit between payload and CRC, with
``tag = HMAC-SHA256(Ks, header || payload || counter)[:16]`` (the header as sent). Each sender
counts from 1; a receiver keeps a replay window (the highest counter seen and a 64-bit map of
the ones below it) and drops repeated counters and counters older than the window.

Use::

    ks = auth.session_key(K, nonce_c, nonce_p, device_id, session)
    link = auth.AuthSession(ks, session)
    wire = link.seal(encode_frame(frame))        # any unauthenticated frame -> sealed
    frame_bytes = link.open(received)            # BadTag / Replayed, or the frame (checked)

``CoordinatorHandshake`` and ``PeerHandshake`` run the three steps on payload dicts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codec import COUNTER_STRUCT, CRC_STRUCT
from .errors import BadPayload, BadTag, ProtocolError, Replayed
from .schema import (
    AUTH_TRAILER_SIZE,
    CRC_SIZE,
    HEADER_SIZE,
    KEY_SIZE,
    MAGIC,
    NONCE_SIZE,
    PROOF_SIZE,
    TAG_SIZE,
    AuthStep,
    Flag,
)

LABEL_PEER = b"tpfed-peer"
LABEL_COORDINATOR = b"tpfed-coord"
LABEL_SESSION = b"tpfed-session"
REPLAY_WINDOW = 64  # counters below the highest seen that are still taken (once)
COUNTER_MAX = 0xFFFFFFFF  # a sender that reaches it must run a new handshake

_AUTH = int(Flag.AUTH)
_FLAGS_OFFSET = 3
_SESSION_OFFSET = 8
_LEN_OFFSET = HEADER_SIZE - 2
_BINDING = struct.Struct("<BH")


class AuthError(ProtocolError):
    """A handshake step failed (wrong proof, unexpected step or values)."""

    status = BadTag.status
    error_code = BadTag.error_code


# ----------------------------------------------------------------------------------- keys


def new_key() -> bytes:
    """A fresh random federation key."""
    return secrets.token_bytes(KEY_SIZE)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def new_session() -> int:
    """A random session number (never 0, which means "no session" in the C peer's getters)."""
    return 1 + secrets.randbelow(0xFFFF)


def parse_key(text_or_bytes: bytes | str) -> bytes:
    """A key as stored in a key file: 64 hex digits (surrounding whitespace ignored) or 32 raw
    bytes. Raises ValueError naming what is wrong."""
    raw = text_or_bytes.encode() if isinstance(text_or_bytes, str) else bytes(text_or_bytes)
    stripped = raw.strip()
    if len(stripped) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == KEY_SIZE:
        return raw
    raise ValueError(f"a federation key is {2 * KEY_SIZE} hex digits or {KEY_SIZE} raw bytes; "
                     f"got {len(raw)} bytes that are neither")


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The federation key stored in ``path`` (see parse_key). ValueError/OSError name the file."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return parse_key(data)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def write_key_file(path: str | os.PathLike[str], key: bytes) -> Path:
    """Write key as 64 hex digits and a newline, readable by the owner only (mode 0600)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a federation key is {KEY_SIZE} bytes, got {len(key)}")
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(p, 0o600)
    return p


def key_hex_define(key: bytes) -> str:
    """The build flag that bakes key into board firmware (``tpfed flash --key-file``)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a federation key is {KEY_SIZE} bytes, got {len(key)}")
    return f'-DTPFED_KEY_HEX=\\"{key.hex()}\\"'


# ------------------------------------------------------------------------------ HMAC, KDF


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def binding(nonce_c: bytes, nonce_p: bytes, device_id: int, session: int) -> bytes:
    """``nonce_c || nonce_p || device_id u8 || session u16 LE``: what every proof and the session
    key are bound to."""
    if len(nonce_c) != NONCE_SIZE or len(nonce_p) != NONCE_SIZE:
        raise BadPayload(f"nonces are {NONCE_SIZE} bytes, got {len(nonce_c)} and {len(nonce_p)}")
    return bytes(nonce_c) + bytes(nonce_p) + _BINDING.pack(device_id, session)


def peer_proof(key: bytes, nonce_c: bytes, nonce_p: bytes, device_id: int, session: int) -> bytes:
    return hmac_sha256(key, LABEL_PEER, binding(nonce_c, nonce_p, device_id, session))


def coordinator_proof(key: bytes, nonce_c: bytes, nonce_p: bytes, device_id: int,
                      session: int) -> bytes:
    return hmac_sha256(key, LABEL_COORDINATOR, binding(nonce_c, nonce_p, device_id, session))


def session_key(key: bytes, nonce_c: bytes, nonce_p: bytes, device_id: int, session: int) -> bytes:
    return hmac_sha256(key, LABEL_SESSION, binding(nonce_c, nonce_p, device_id, session))


# ------------------------------------------------------------------------------ frames


def _lengths(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(payload length, flags) of a frame whose size agrees with its header; else BadTag."""
    if len(frame) < HEADER_SIZE + CRC_SIZE or frame[0] != MAGIC:
        raise BadTag("not a frame")
    plen = int.from_bytes(frame[_LEN_OFFSET:HEADER_SIZE], "little")
    flags = frame[_FLAGS_OFFSET]
    extra = AUTH_TRAILER_SIZE if flags & _AUTH else 0
    if len(frame) != HEADER_SIZE + plen + extra + CRC_SIZE:
        raise BadTag(f"frame of {len(frame)} bytes does not match its header")
    return plen, flags


class FrameKey:
    """HMAC state of one session key, made once (``hmac`` copies it per frame)."""

    __slots__ = ("_mac",)

    def __init__(self, ks: bytes) -> None:
        if len(ks) != KEY_SIZE:
            raise ValueError(f"a session key is {KEY_SIZE} bytes, got {len(ks)}")
        self._mac = hmac.new(bytes(ks), digestmod=hashlib.sha256)

    def tag(self, signed: bytes | bytearray | memoryview) -> bytes:
        """tag of ``header || payload || counter`` (the signed part of a sealed frame)."""
        m = self._mac.copy()
        m.update(signed)
        return m.digest()[:TAG_SIZE]

    def seal(self, frame: bytes | bytearray | memoryview, counter: int) -> bytes:
        """An unauthenticated frame (flags without AUTH) -> the same frame sealed: AUTH set,
        counter and tag after the payload, CRC over everything before it."""
        plen, flags = _lengths(frame)
        if flags & _AUTH:
            raise ProtocolError("frame is sealed already")
        if not 1 <= counter <= COUNTER_MAX:
            raise ProtocolError(f"counter {counter} out of range 1..{COUNTER_MAX}")
        end = HEADER_SIZE + plen
        buf = bytearray(end + AUTH_TRAILER_SIZE + CRC_SIZE)
        buf[:end] = frame[:end]
        buf[_FLAGS_OFFSET] = flags | _AUTH
        COUNTER_STRUCT.pack_into(buf, end, counter)
        signed = end + COUNTER_STRUCT.size
        buf[signed:signed + TAG_SIZE] = self.tag(memoryview(buf)[:signed])
        crc_at = end + AUTH_TRAILER_SIZE
        CRC_STRUCT.pack_into(buf, crc_at, zlib.crc32(memoryview(buf)[:crc_at]))
        return bytes(buf)

    def verify(self, frame: bytes | bytearray | memoryview) -> int:
        """The counter of a sealed frame whose tag verifies under this key; BadTag otherwise.
        (Checks the size and tag, not the CRC or payload: decode the frame for those.)"""
        plen, flags = _lengths(frame)
        if not flags & _AUTH:
            raise BadTag("frame is not authenticated")
        end = HEADER_SIZE + plen
        signed = end + COUNTER_STRUCT.size
        want = self.tag(memoryview(frame)[:signed])
        if not hmac.compare_digest(want, bytes(frame[signed:signed + TAG_SIZE])):
            raise BadTag("frame tag does not verify")
        return COUNTER_STRUCT.unpack_from(frame, end)[0]


def seal(ks: bytes, frame: bytes | bytearray | memoryview, counter: int) -> bytes:
    """One-off ``FrameKey(ks).seal(frame, counter)``."""
    return FrameKey(ks).seal(frame, counter)


def verify(ks: bytes, frame: bytes | bytearray | memoryview) -> int:
    """One-off ``FrameKey(ks).verify(frame)``: the counter, or BadTag."""
    return FrameKey(ks).verify(frame)


def is_sealed(frame: bytes | bytearray | memoryview) -> bool:
    return len(frame) > _FLAGS_OFFSET and bool(frame[_FLAGS_OFFSET] & _AUTH)


@dataclass
class ReplayWindow:
    """Highest counter seen and a bitmap of the 64 counters up to it (bit i: highest - i)."""

    highest: int = 0
    bitmap: int = 0

    def fresh(self, counter: int) -> bool:
        """True if counter has not been seen and is not older than the window."""
        if counter <= 0 or counter > COUNTER_MAX:
            return False
        if counter > self.highest:
            return True
        diff = self.highest - counter
        return diff < REPLAY_WINDOW and not (self.bitmap >> diff) & 1

    def accept(self, counter: int) -> None:
        """Mark counter seen (call only after ``fresh`` and a good tag)."""
        if counter > self.highest:
            shift = counter - self.highest
            self.bitmap = 0 if shift >= REPLAY_WINDOW else (self.bitmap << shift) & ((1 << REPLAY_WINDOW) - 1)
            self.bitmap |= 1
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)

    def check(self, counter: int) -> None:
        """accept, or Replayed."""
        if not self.fresh(counter):
            raise Replayed(f"counter {counter} replayed or older than the window "
                           f"(highest {self.highest})")
        self.accept(counter)


@dataclass
class AuthStats:
    sealed: int = 0
    opened: int = 0
    auth_dropped: int = 0  # no AUTH, another session, bad tag
    replayed: int = 0


class AuthSession:
    """One end of an established session: seals what it sends (its own counter from 1) and
    opens what it receives (session, tag, replay window)."""

    def __init__(self, ks: bytes, session: int) -> None:
        self.key = FrameKey(ks)
        self.session = session
        self.tx_counter = 0
        self.window = ReplayWindow()
        self.stats = AuthStats()

    def seal(self, frame: bytes | bytearray | memoryview) -> bytes:
        """Seal an unauthenticated frame of this session with the next counter."""
        if int.from_bytes(frame[_SESSION_OFFSET:_SESSION_OFFSET + 2], "little") != self.session:
            raise ProtocolError(f"frame of session {int.from_bytes(frame[8:10], 'little')} sealed "
                                f"in session {self.session}")
        if self.tx_counter >= COUNTER_MAX:
            raise ProtocolError("frame counter exhausted: run a new handshake")
        self.tx_counter += 1
        self.stats.sealed += 1
        return self.key.seal(frame, self.tx_counter)

    def open(self, frame: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Check a received sealed frame: AUTH set, this session, tag, fresh counter. Returns the
        frame; raises BadTag or Replayed (and counts them)."""
        try:
            if len(frame) < HEADER_SIZE or int.from_bytes(frame[8:10], "little") != self.session:
                raise BadTag("frame of another session")
            counter = self.key.verify(frame)
        except BadTag:
            self.stats.auth_dropped += 1
            raise
        try:
            self.window.check(counter)
        except Replayed:
            self.stats.replayed += 1
            raise
        self.stats.opened += 1
        return frame


# ------------------------------------------------------------------------------ handshake


def challenge(nonce_c: bytes, session: int, device_id: int) -> dict[str, Any]:
    """AUTH payload of step CHALLENGE."""
    return {"step": int(AuthStep.CHALLENGE),
            "body": {"nonce_c": bytes(nonce_c), "session": session, "device_id": device_id}}


def response(nonce_p: bytes, proof_p: bytes) -> dict[str, Any]:
    return {"step": int(AuthStep.RESPONSE), "body": {"nonce_p": bytes(nonce_p), "proof_p": bytes(proof_p)}}


def confirm(proof_c: bytes) -> dict[str, Any]:
    return {"step": int(AuthStep.CONFIRM), "body": {"proof_c": bytes(proof_c)}}


def _body(payload: Mapping[str, Any], step: AuthStep) -> Mapping[str, Any]:
    if payload.get("step") != step:
        raise AuthError(f"expected AUTH step {step.name}, got {payload.get('step')!r}")
    return payload["body"]


@dataclass
class CoordinatorHandshake:
    """The coordinator's side with one peer: ``challenge()`` -> send; ``on_response(payload)``
    -> the CONFIRM payload to send (AuthError if the peer does not hold the key); then
    ``session`` is the AuthSession (established for the coordinator once the peer's sealed ACK
    opens with it)."""

    key: bytes
    device_id: int
    session_id: int = field(default_factory=new_session)
    nonce_c: bytes = field(default_factory=new_nonce)
    nonce_p: bytes | None = None
    session: AuthSession | None = None

    def challenge(self) -> dict[str, Any]:
        return challenge(self.nonce_c, self.session_id, self.device_id)

    def on_response(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        body = _body(payload, AuthStep.RESPONSE)
        nonce_p, proof_p = bytes(body["nonce_p"]), bytes(body["proof_p"])
        args = (self.nonce_c, nonce_p, self.device_id, self.session_id)
        if not hmac.compare_digest(peer_proof(self.key, *args), proof_p):
            raise AuthError("the peer's proof does not verify: it holds another federation key")
        self.nonce_p = nonce_p
        self.session = AuthSession(session_key(self.key, *args), self.session_id)
        return confirm(coordinator_proof(self.key, *args))


@dataclass
class PeerHandshake:
    """A peer's side (the C peer core does this on devices; this is for tests and tools)."""

    key: bytes
    nonce_p: bytes = field(default_factory=new_nonce)
    challenge_body: Mapping[str, Any] | None = None
    session: AuthSession | None = None

    def on_challenge(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        body = _body(payload, AuthStep.CHALLENGE)
        self.challenge_body = dict(body)
        return response(self.nonce_p, peer_proof(self.key, bytes(body["nonce_c"]), self.nonce_p,
                                                 body["device_id"], body["session"]))

    def on_confirm(self, payload: Mapping[str, Any]) -> AuthSession:
        body = _body(payload, AuthStep.CONFIRM)
        c = self.challenge_body
        if c is None:
            raise AuthError("CONFIRM without a CHALLENGE")
        args = (bytes(c["nonce_c"]), self.nonce_p, c["device_id"], c["session"])
        if not hmac.compare_digest(coordinator_proof(self.key, *args), bytes(body["proof_c"])):
            raise AuthError("the coordinator's proof does not verify")
        self.session = AuthSession(session_key(self.key, *args), c["session"])
        return self.session


__all__ = [
    "COUNTER_MAX", "LABEL_COORDINATOR", "LABEL_PEER", "LABEL_SESSION", "PROOF_SIZE",
    "REPLAY_WINDOW", "AuthError", "AuthSession", "AuthStats", "CoordinatorHandshake", "FrameKey",
    "PeerHandshake", "ReplayWindow", "binding", "challenge", "confirm", "coordinator_proof",
    "hmac_sha256", "is_sealed", "key_hex_define", "new_key", "new_nonce", "new_session",
    "parse_key", "peer_proof", "read_key_file", "response", "seal", "session_key", "verify",
    "write_key_file",
]
