"""The desktop peer's UDP port (firmware/ports/host/udp_peer.c) on loopback, in-process: the
C serve loop runs in a thread (the GIL is released), a plain socket plays the coordinator."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.framing import DatagramFramer
from tpfed.protocol.schema import MsgType

from tpfed.runtime.desktop_peer import UdpPeer, bind_udp
from tpfed.runtime.peer_core import DeviceInfo, PeerConfig

MTU = 512


@pytest.fixture
def served():
    sock = bind_udp("127.0.0.1", 0)
    log = io.StringIO()
    peer = UdpPeer(sock, DeviceInfo("udp-unit"), 4 << 20, MTU, PeerConfig(int8_macs=1000), log=log)
    stop = threading.Event()
    t = threading.Thread(target=peer.serve, args=(stop.is_set,), daemon=True)
    t.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    yield peer, sock.getsockname(), client, log
    stop.set()
    t.join(5)
    client.close()
    sock.close()


def _recv_frame(client, framer: DatagramFramer) -> bytes:
    while True:
        data, _ = client.recvfrom(65536)
        frame = framer.feed(data)
        if frame is not None:
            return frame


def test_hello_and_a_fragmented_probe_round_trip(served):
    peer, addr, client, _ = served
    framer = DatagramFramer(mtu=MTU)
    hello = {"device_class": 0, "name": "c", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
             "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
             "temperature_dc": -32768, "transports": 0, "max_frame": 65535, "arena_kb": 0}
    client.sendto(encode_frame(Frame(MsgType.HELLO, hello, dst=1)), addr)
    h = decode_frame(_recv_frame(client, framer))
    assert h.type == MsgType.HELLO and h.payload["name"] == "udp-unit" and h.payload["int8_macs"] == 1000
    pad = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    probe = encode_frame(Frame(MsgType.PROBE, {"nonce": 5, "t_send_us": 1, "pad": pad}, dst=1, seq=77))
    parts = framer.split(probe)
    assert len(parts) > 1
    for part in reversed(parts):  # out of order
        client.sendto(part, addr)
    reply = decode_frame(_recv_frame(client, framer))
    assert reply.type == MsgType.PROBE_REPLY and reply.seq == 77 and reply.payload["pad"] == pad


def test_garbage_datagrams_are_dropped_and_the_peer_keeps_serving(served):
    peer, addr, client, _ = served
    rng = np.random.default_rng(7)
    for n in (0, 1, 5, 6, 100, 1400, 9000, 65000):
        client.sendto(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), addr)
    client.sendto(bytes([0xA8, 1, 0, 9, 3]) + b"x" * 50, addr)   # fragment index >= count
    client.sendto(bytes([0xA8, 2, 0, 0, 200]) + b"x" * 50, addr)  # a fragment never completed
    client.sendto(bytes([0xA7]) + b"\x00" * 30, addr)              # a frame with a bad CRC
    hb = encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=0xFF))
    client.sendto(hb, addr)
    reply = decode_frame(_recv_frame(client, DatagramFramer(mtu=MTU)))
    assert reply.type == MsgType.HEARTBEAT
    assert peer.stats()["dropped"] >= 3
