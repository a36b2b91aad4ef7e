"""The coordinator's authenticated session with one peer, kept in C (``tpfed_auth_session``).

After the handshake (``tpfed.protocol.auth.CoordinatorHandshake``) both sides hold the session
key Ks. Every frame the coordinator sends to the peer is sealed under it with the next counter,
and every frame from the peer must open under it (tag, session, replay window) or it is
dropped and counted. The state lives in one C struct, so the Python paths (``seal``, ``open``)
and the C stage exchange (:class:`tpfed.transport.udp_fleet.UdpFleet`) share its counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpfed.compute._native import ffi, lib
from tpfed.protocol.schema import AUTH_TRAILER_SIZE, CRC_SIZE, HEADER_SIZE, MAX_PAYLOAD, Flag

_FLAGS = 3  # header byte of the flags
_SESSION = 8  # header bytes of the session (u16 LE)
_AUTH = int(Flag.AUTH)


@dataclass
class AuthCounts:
    sealed: int = 0
    opened: int = 0
    bad_tag: int = 0  # unauthenticated, wrongly tagged or of another session: dropped
    replayed: int = 0  # a counter seen before or older than the window: dropped


class PeerAuth:
    """Seal and open the frames of one peer's session."""

    def __init__(self, session_key: bytes, session: int) -> None:
        self.session = session
        self.c = ffi.new("tpfed_auth_session *")
        ks = ffi.new("uint8_t[]", session_key)
        lib.tpfed_auth_session_init(self.c, ks, session)
        lib.tpfed_wipe(ks, len(session_key))
        self.counts = AuthCounts()
        self._h = ffi.new("tpfed_header_t *")
        self._pl = ffi.new("const uint8_t **")

    def seal(self, frame: bytes) -> bytes:
        """An unsealed frame (header, payload, CRC) -> the same frame sealed for this peer (its
        header's session set to this session's)."""
        body = len(frame) - CRC_SIZE
        buf = bytearray(body + AUTH_TRAILER_SIZE + CRC_SIZE)
        buf[:body] = memoryview(frame)[:body]
        buf[_FLAGS] |= _AUTH
        buf[_SESSION:_SESSION + 2] = self.session.to_bytes(2, "little")  # sealed = this session
        if lib.tpfed_auth_session_stamp(self.c, ffi.from_buffer(buf), len(buf)) != lib.TPFED_OK:
            raise ValueError("cannot seal this frame (malformed, or the session's counter is spent)")
        self.counts.sealed += 1
        return bytes(buf)

    def open(self, frame: bytes | bytearray | memoryview) -> bool:
        """True if ``frame`` is intact, sealed in this session and fresh (its counter is then
        taken); False (counted) otherwise."""
        buf = ffi.from_buffer(frame)
        if len(frame) < HEADER_SIZE + CRC_SIZE or lib.tpfed_frame_decode(
                buf, len(frame), MAX_PAYLOAD, self._h, self._pl) != lib.TPFED_OK:
            self.counts.bad_tag += 1
            return False
        rc = lib.tpfed_auth_session_open(self.c, buf, len(frame))
        if rc == lib.TPFED_OK:
            self.counts.opened += 1
            return True
        if rc == lib.TPFED_E_REPLAYED:
            self.counts.replayed += 1
        else:
            self.counts.bad_tag += 1
        return False


__all__ = ["AuthCounts", "PeerAuth"]
