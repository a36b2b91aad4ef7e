"""Transports over real sockets: UDP between two processes (fragmented 64 KiB frames) and
between endpoints in one process; serial via pyserial's socket:// against a local TCP server."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest
from tpfed.protocol import (
    Frame,
    MsgType,
    StreamFramer,
    decode_frame,
    decode_partial,
    encode_activation,
    encode_frame,
    encode_partial,
)
from tpfed.protocol.golden_data import read

from tpfed.errors import PeerError
from tpfed.transport import (
    LinkClosed,
    UdpEndpoint,
    open_serial_link,
    open_udp_link,
    parse_serial_url,
    parse_udp_uri,
)

# A peer process: echoes every frame back to its sender, with src/dst swapped.
ECHO_PEER = r"""
import asyncio, sys
from tpfed.protocol import decode_frame, encode_frame
from tpfed.transport import UdpEndpoint

async def main():
    ep = await UdpEndpoint.bind("127.0.0.1", 0, mtu=int(sys.argv[1]))
    print(ep.address[1], flush=True)
    while True:
        data, addr = await ep.recv()
        f = decode_frame(data)
        f.src, f.dst = f.dst, f.src
        await ep.send(encode_frame(f), addr)

asyncio.run(main())
"""


def big_weights(seq: int) -> bytes:
    data = bytes((i * 7 + seq) & 0xFF for i in range(65535 - 42))
    return encode_frame(Frame(MsgType.WEIGHTS, {"shard_id": 1, "offset": 0, "total": len(data),
                                                "sha256": bytes(32), "data": data},
                              src=0, dst=7, seq=seq))


@pytest.mark.parametrize("mtu", [1400, 508])
def test_two_processes_exchange_large_fragmented_frames(mtu: int) -> None:
    async def run() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ECHO_PEER, str(mtu),
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
            link = await open_udp_link(f"udp://127.0.0.1:{port}", mtu=mtu, name="echo")
            for seq in range(4):
                frame = big_weights(seq)
                await link.send(frame)
                back = decode_frame(await link.recv(timeout=10))
                assert back.seq == seq and back.src == 7 and back.dst == 0
                assert back.payload["data"] == decode_frame(frame).payload["data"]
            qs = np.arange(-32, 32, dtype=np.int8)
            act = encode_activation(1, 0, 5, qs, np.array([0x2C00, 0x2E00], np.uint16), dst=7, seq=9)
            await link.send(act)
            assert decode_frame(await link.recv(timeout=5)).payload["qs"] == qs.tolist()
            s = link.stats
            assert s.frames_sent == 5 and s.frames_received == 5 and s.dropped == 0
            assert link.endpoint.stats.bytes_sent > 4 * 65551  # fragment headers on the wire
            await link.close()
            with pytest.raises(LinkClosed):
                await link.recv(timeout=1)
        finally:
            proc.kill()
            await proc.wait()

    asyncio.run(run())


def test_endpoint_links_demultiplex_and_time_out() -> None:
    async def run() -> None:
        server = await UdpEndpoint.bind("127.0.0.1", 0)
        a = await open_udp_link(f"127.0.0.1:{server.address[1]}", name="a")
        b = await open_udp_link(f"udp://localhost:{server.address[1]}", name="b")
        await a.send(read("hello_esp32s3.bin"))
        frame, addr_a = await server.recv(timeout=2)
        assert frame == read("hello_esp32s3.bin")
        to_a = server.link(addr_a, name="peer-a")
        await b.send(read("ready.bin"))
        frame, addr_b = await server.recv(timeout=2)
        assert frame == read("ready.bin") and addr_b != addr_a
        await a.send(read("heartbeat.bin"))  # now routed to the per-peer link
        assert await to_a.recv(timeout=2) == read("heartbeat.bin")
        await to_a.send(read("ack.bin"))
        await server.send(read("nack.bin"), addr_b)
        assert await a.recv(timeout=2) == read("ack.bin")
        assert await b.recv(timeout=2) == read("nack.bin")
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await a.recv(timeout=0.05)
        assert time.perf_counter() - t0 < 1.0
        # Garbage and corrupted frames are dropped and counted, not delivered.
        bad = bytearray(read("ack.bin"))
        bad[-1] ^= 0xFF
        server_drops = server.stats.dropped
        a.endpoint._transport.sendto(bytes(bad), server.address)
        a.endpoint._transport.sendto(b"\x00garbage", server.address)
        await a.send(read("bye.bin"))
        assert await to_a.recv(timeout=2) == read("bye.bin")
        assert server.stats.dropped == server_drops + 2
        # Round-trip latency of a token-loop-sized exchange, for the record.
        part = encode_partial(0, 0, 0, np.ones(64, np.float32), src=1)
        n, t0 = 200, time.perf_counter()
        for _ in range(n):
            await to_a.send(part)
            got = decode_partial(await a.recv(timeout=2))
        rtt = (time.perf_counter() - t0) / n
        print(f"UDP loopback one-way send+recv in one loop: {rtt * 1e6:.0f} us")
        assert got.n == 64
        for link in (a, b, to_a):
            await link.close()
        await server.close()

    asyncio.run(run())


def test_udp_uri_parsing() -> None:
    assert parse_udp_uri("udp://10.0.0.2:7000") == ("10.0.0.2", 7000)
    assert parse_udp_uri("host:1") == ("host", 1)
    assert parse_udp_uri("udp://[::1]:9") == ("::1", 9)
    for bad in ("udp://nohost", "tcp://a:1", "udp://:5"):
        with pytest.raises(PeerError):
            parse_udp_uri(bad)


def test_serial_url_parsing() -> None:
    assert parse_serial_url("/dev/ttyUSB0") == ("/dev/ttyUSB0", 921600)
    assert parse_serial_url("serial:///dev/ttyACM1?baud=115200") == ("/dev/ttyACM1", 115200)
    assert parse_serial_url("socket://127.0.0.1:5555") == ("socket://127.0.0.1:5555", 921600)
    assert parse_serial_url("COM3", 460800) == ("COM3", 460800)
    for bad in ("serial://", "serial:///dev/x?baud=fast", "serial:///dev/x?parity=E", ""):
        with pytest.raises(PeerError):
            parse_serial_url(bad)


def test_serial_link_over_pyserial_socket_url() -> None:
    """A board's UART stand-in: a TCP server that answers each frame with an ACK, with line
    noise before every answer."""

    async def run() -> None:
        async def board(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = StreamFramer()
            while data := await reader.read(65536):
                for raw in framer.feed(data):
                    f = decode_frame(raw)
                    ack = Frame(MsgType.ACK, {"acked_seq": f.seq, "acked_type": f.type}, src=f.dst, dst=f.src,
                                seq=f.seq)
                    writer.write(b"\x11noise\xff" + b"\x00" + StreamFramer.encode(encode_frame(ack)))
                    if f.type == MsgType.WEIGHTS:
                        writer.write(StreamFramer.encode(raw))  # and echo the big one back
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(board, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = await open_serial_link(f"socket://127.0.0.1:{port}", name="emu-0")
        try:
            for seq in range(20):
                await link.send(encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": seq, "load_pct": 1},
                                                   src=3, dst=0, seq=seq)))
                ack = decode_frame(await link.recv(timeout=5))
                assert ack.type == MsgType.ACK and ack.payload["acked_seq"] == seq
            big = big_weights(99)
            await link.send(big)
            assert decode_frame(await link.recv(timeout=5)).type == MsgType.ACK
            assert await link.recv(timeout=5) == big
            s = link.stats
            assert s.frames_sent == 21 and s.frames_received == 22
            assert s.dropped == 21  # each noise burst is one dropped segment
        finally:
            await link.close()
            server.close()
            await server.wait_closed()
        with pytest.raises(LinkClosed):
            await link.send(b"x")

    asyncio.run(run())


def test_serial_link_reports_a_vanished_board() -> None:
    async def run() -> None:
        async def board(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(board, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = await open_serial_link(f"socket://127.0.0.1:{port}")
        with pytest.raises(LinkClosed):
            await link.recv(timeout=5)
        await link.close()
        server.close()
        with pytest.raises(PeerError):
            await open_serial_link(f"socket://127.0.0.1:{port}")

    asyncio.run(run())
