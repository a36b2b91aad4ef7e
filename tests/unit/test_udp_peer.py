"""The desktop peer's UDP port (firmware/ports/host/udp_peer.c) on loopback, in-process: the
C serve loop runs in a thread (the GIL is released), a plain socket plays the coordinator. Every
exchange runs in an authenticated session (tests/peer_session.py): the handshake first, then
frames sealed both ways; unsealed and replayed datagrams get no answer."""

from __future__ import annotations

import contextlib
import io
import socket
import threading

import numpy as np
import pytest
from peer_session import KEY, SESSION, SealedLink
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.framing import DatagramFramer
from tpfed.protocol.schema import ErrorCode, Flag, MsgType

from tpfed.runtime.desktop_peer import UdpPeer, bind_udp
from tpfed.runtime.peer_core import DeviceInfo, PeerConfig

MTU = 512
HELLO = {"device_class": 0, "name": "c", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
         "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
         "temperature_dc": -32768, "transports": 0, "max_frame": 65535, "arena_kb": 0}
HEARTBEAT = {"uptime_ms": 0, "load_pct": 0}


class Client:
    """A coordinator's UDP socket to the peer: frames split to MTU, replies reassembled."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.framer = DatagramFramer(mtu=MTU)

    def send(self, data: bytes, reverse: bool = False) -> None:
        parts = self.framer.split(data)
        for part in reversed(parts) if reverse else parts:
            self.sock.sendto(part, self.addr)

    def recv(self, timeout: float = 5.0) -> bytes | None:
        """The next whole frame, or None if none comes within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data, _ = self.sock.recvfrom(65536)
                frame = self.framer.feed(data)
                if frame is not None:
                    return frame
        except TimeoutError:
            return None

    def exchange(self, data: bytes, timeout: float = 5.0) -> list[bytes]:
        """Send data; the one frame that answers it ([] if none within timeout)."""
        self.send(data)
        reply = self.recv(timeout)
        return [] if reply is None else [reply]

    def link(self, key: bytes = KEY, device_id: int = 1, session: int = SESSION) -> SealedLink:
        return SealedLink(self.exchange, key, device_id, session)


@contextlib.contextmanager
def serving(config: PeerConfig):
    sock = bind_udp("127.0.0.1", 0)
    log = io.StringIO()
    peer = UdpPeer(sock, DeviceInfo("udp-unit"), 4 << 20, MTU, config, log=log)
    stop = threading.Event()
    t = threading.Thread(target=peer.serve, args=(stop.is_set,), daemon=True)
    t.start()
    clients: list[Client] = []

    def client() -> Client:
        clients.append(Client(sock.getsockname()))
        return clients[-1]

    try:
        yield peer, client, log
    finally:
        stop.set()
        t.join(5)
        for c in clients:
            c.sock.close()
        sock.close()


@pytest.fixture
def served():
    """A keyed peer served on loopback and a client that has run the handshake with it."""
    with serving(PeerConfig(int8_macs=1000, key=KEY)) as (peer, client, log):
        c = client()
        link = c.link()
        link.handshake()
        yield peer, c, link, client, log


def test_hello_and_a_fragmented_probe_round_trip(served):
    peer, c, link, _, log = served
    (raw,) = link.request(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1, session=SESSION)))
    h = decode_frame(raw)
    assert h.type == MsgType.HELLO and h.payload["name"] == "udp-unit" and h.payload["int8_macs"] == 1000
    assert h.flags & Flag.AUTH and h.session == SESSION
    pad = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    probe = encode_frame(Frame(MsgType.PROBE, {"nonce": 5, "t_send_us": 1, "pad": pad}, dst=1,
                               seq=77, session=SESSION))
    sealed = link.seal(probe)
    assert len(c.framer.split(sealed)) > 1
    c.send(sealed, reverse=True)  # fragments out of order
    reply = decode_frame(link.open(c.recv()))
    assert reply.type == MsgType.PROBE_REPLY and reply.seq == 77 and reply.payload["pad"] == pad
    assert peer.stats()["sessions"] == 1


def test_garbage_datagrams_are_dropped_and_the_peer_keeps_serving(served):
    peer, c, link, _, _ = served
    rng = np.random.default_rng(7)
    for n in (0, 1, 5, 6, 100, 1400, 9000, 65000):
        c.sock.sendto(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), c.addr)
    c.sock.sendto(bytes([0xA8, 1, 0, 9, 3]) + b"x" * 50, c.addr)   # fragment index >= count
    c.sock.sendto(bytes([0xA8, 2, 0, 0, 200]) + b"x" * 50, c.addr)  # a fragment never completed
    c.sock.sendto(bytes([0xA7]) + b"\x00" * 30, c.addr)              # a frame with a bad CRC
    hb = encode_frame(Frame(MsgType.HEARTBEAT, HEARTBEAT, dst=0xFF, session=SESSION))
    (reply,) = link.request(hb)
    assert decode_frame(reply).type == MsgType.HEARTBEAT
    assert peer.stats()["dropped"] >= 3


def test_unsealed_and_replayed_datagrams_get_no_answer(served):
    peer, c, link, _, _ = served
    before = peer.stats()
    plain = [encode_frame(Frame(MsgType.HELLO, HELLO, dst=1, session=SESSION)),
             encode_frame(Frame(MsgType.HEARTBEAT, HEARTBEAT, dst=0xFF, session=SESSION)),
             encode_frame(Frame(MsgType.PROBE, {"nonce": 1, "t_send_us": 2, "pad": bytes(3000)},
                                dst=1, session=SESSION)),  # fragmented
             encode_frame(Frame(MsgType.BYE, {"reason": 0}, dst=1, session=SESSION))]
    for f in plain:
        c.send(f)
    sealed = link.seal(encode_frame(Frame(MsgType.HEARTBEAT, HEARTBEAT, dst=1, seq=41, session=SESSION)))
    c.send(sealed)
    first = decode_frame(link.open(c.recv()))
    assert first.type == MsgType.HEARTBEAT and first.seq > 0  # the first answer is the sealed one's
    c.send(sealed)  # the same datagram again (a replay)
    c.send(auth.seal(auth.new_key(), plain[0], 1))  # sealed under a key that is not the session's
    assert c.recv(timeout=0.5) is None
    after = peer.stats()
    assert after["auth_dropped"] - before["auth_dropped"] == len(plain) + 1
    assert after["replayed"] - before["replayed"] == 1
    # The session is still on (the unsealed BYE did not end it).
    (raw,) = link.request(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1, session=SESSION)))
    assert decode_frame(raw).type == MsgType.HELLO and peer.core.session == SESSION


def test_second_coordinator_is_told_busy(served):
    peer, _, link, client, _ = served
    other = client().link(device_id=2, session=SESSION + 1)
    (resp,) = other.deliver(other.challenge_frame())
    confirm = other.confirm_frame(resp)
    other.session = other.hs.session
    (busy,) = other.deliver(confirm)
    err = decode_frame(other.open(busy))
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.BUSY
    assert peer.stats()["busy"] == 1
    (raw,) = link.request(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1, session=SESSION)))
    assert decode_frame(raw).type == MsgType.HELLO


def test_wrong_key_and_no_key_get_nothing():
    with serving(PeerConfig(int8_macs=1000, key=KEY)) as (peer, client, _):
        c = client()
        wrong = c.link(key=auth.new_key())
        (resp,) = wrong.deliver(wrong.challenge_frame())
        with pytest.raises(auth.AuthError):
            wrong.confirm_frame(resp)
        hs = wrong.hs
        nonce_p = decode_frame(resp).payload["body"]["nonce_p"]
        proof = auth.coordinator_proof(wrong.key, hs.nonce_c, nonce_p, 1, SESSION)
        confirm = encode_frame(Frame(MsgType.AUTH, auth.confirm(proof), dst=1, session=SESSION))
        assert c.exchange(confirm, timeout=0.5) == []
        assert peer.stats()["sessions"] == 0 and peer.stats()["auth_dropped"] == 1
    with serving(PeerConfig(int8_macs=1000)) as (peer, client, _):  # no key at all
        c = client()
        link = c.link()
        assert c.exchange(link.challenge_frame(), timeout=0.5) == []
        assert c.exchange(encode_frame(Frame(MsgType.HELLO, HELLO, dst=1)), timeout=0.3) == []
        assert peer.stats()["frames_out"] == 0 and peer.stats()["auth_dropped"] == 2
