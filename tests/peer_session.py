"""A test coordinator's end of one authenticated session with a peer core (DESIGN: Security).

``SealedLink(deliver, key)`` talks to a peer through ``deliver`` (frame bytes in, the frames the
peer sent back out): ``handshake()`` runs CHALLENGE -> RESPONSE (the peer's proof checked) ->
CONFIRM -> the peer's sealed ACK, then ``request(frame)`` seals a frame with the session key and
the next counter and opens every reply (BadTag / Replayed raise). ``seal`` keeps the header as it
is (its session included), so a test can also seal a frame that names another session.

``AuthedMemPeer`` is a :class:`MemPeer` behind such a link: its ``handle`` seals and opens,
``raw`` hands bytes to the core as they are (a stranger's frames).
"""

from __future__ import annotations

from collections.abc import Callable

from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.schema import COORDINATOR, AuthStep, MsgType

from tpfed.runtime.peer_core import DeviceInfo, MemPeer, PeerConfig

KEY = bytes(range(0x40, 0x60))  # the federation key of the tests (any 32 bytes)
SESSION = 5


class SealedLink:
    """One coordinator's session with one peer (see the module docstring)."""

    def __init__(self, deliver: Callable[[bytes], list[bytes]], key: bytes = KEY,
                 device_id: int = 1, session: int = SESSION) -> None:
        self.deliver = deliver
        self.key = key
        self.device_id = device_id
        self.session_id = session
        self.hs: auth.CoordinatorHandshake | None = None
        self.session: auth.AuthSession | None = None
        self.seq = 0

    def _seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        return self.seq

    # -- handshake, step by step (tests of the handshake itself use the steps) -------------
    def challenge_frame(self, nonce_c: bytes | None = None) -> bytes:
        self.hs = auth.CoordinatorHandshake(self.key, self.device_id, session_id=self.session_id,
                                            **({"nonce_c": nonce_c} if nonce_c else {}))
        return encode_frame(Frame(MsgType.AUTH, self.hs.challenge(), src=COORDINATOR,
                                  dst=self.device_id, seq=self._seq(), session=self.session_id))

    def confirm_frame(self, response: bytes) -> bytes:
        """The CONFIRM answering a RESPONSE frame (auth.AuthError if its proof is wrong)."""
        r = decode_frame(response)
        assert r.type == MsgType.AUTH and r.payload["step"] == AuthStep.RESPONSE, r
        assert not auth.is_sealed(response)  # handshake frames travel unsealed
        assert (r.src, r.dst, r.session) == (self.device_id, COORDINATOR, self.session_id), r
        confirm = self.hs.on_response(r.payload)
        return encode_frame(Frame(MsgType.AUTH, confirm, src=COORDINATOR, dst=self.device_id,
                                  seq=self._seq(), session=self.session_id))

    def handshake(self) -> Frame:
        """The whole handshake; returns the peer's ACK (opened with the new session key)."""
        replies = self.deliver(self.challenge_frame())
        assert len(replies) == 1, replies
        confirm = self.confirm_frame(replies[0])
        self.session = self.hs.session
        replies = self.deliver(confirm)
        assert len(replies) == 1, replies
        self.open(replies[0])
        ack = decode_frame(replies[0])
        assert ack.type == MsgType.ACK and ack.payload["acked_type"] == MsgType.AUTH, ack
        assert ack.session == self.session_id and ack.src == self.device_id, ack
        return ack

    # -- sealed frames ----------------------------------------------------------------------
    def seal(self, frame: bytes) -> bytes:
        """frame sealed with the session key and the next counter (its header as it is)."""
        assert self.session is not None, "no session: run handshake() first"
        self.session.tx_counter += 1
        return self.session.key.seal(frame, self.session.tx_counter)

    def open(self, raw: bytes) -> bytes:
        """raw if it is sealed in this session with a fresh counter; BadTag / Replayed else."""
        assert auth.is_sealed(raw), decode_frame(raw)
        return bytes(self.session.open(raw))

    def request(self, frame: bytes) -> list[bytes]:
        """Send frame sealed; the replies, every one opened."""
        return [self.open(r) for r in self.deliver(self.seal(frame))]


class AuthedMemPeer(MemPeer):
    """A MemPeer holding ``key`` with a coordinator's session to it (``link``, once
    ``handshake()`` ran): ``handle`` seals what goes in and opens what comes out, ``raw`` does
    neither."""

    def __init__(self, info: DeviceInfo, arena_bytes: int, config: PeerConfig,
                 device_id: int = 1, session: int = SESSION, **kw) -> None:
        super().__init__(info, arena_bytes, config, **kw)
        self.link = SealedLink(self.raw, config.key or KEY, device_id, session)

    def raw(self, frame: bytes) -> list[bytes]:
        return MemPeer.handle(self, frame)

    def handle(self, frame: bytes) -> list[bytes]:
        return self.link.request(frame)

    def handshake(self) -> Frame:
        return self.link.handshake()


def stranger_seal(frame: bytes, counter: int = 1, key: bytes | None = None) -> bytes:
    """frame sealed under a session key that is not the peer's (a forger's best try)."""
    return auth.seal(key or auth.new_key(), frame, counter)


__all__ = ["KEY", "SESSION", "AuthedMemPeer", "SealedLink", "stranger_seal"]
