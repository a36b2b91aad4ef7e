"""``tpfed peer``: serve as a desktop peer on a UDP port until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

NAME = "peer"
HELP = "Serve as a desktop peer: hold a share of the model and answer activations over UDP."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="udp://0.0.0.0:0", metavar="udp://HOST:PORT",
                        help="where to listen; port 0 picks a free one and prints it")
    parser.add_argument("--name", default=None, help="name announced in HELLO (default: host name)")
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="cap the memory offered for weights and KV cache (default: what is free)")
    parser.add_argument("--mtu", type=int, default=1400, help="UDP payload size before fragmenting")
    parser.add_argument("--verbose", action="store_true", help="print frame counts on exit")


async def serve(listen: str, name: str, memory_limit: int | None, mtu: int,
                verbose: bool = False) -> None:
    from tpfed.runtime.desktop_peer import Capabilities, DesktopPeer
    from tpfed.transport import UdpEndpoint, parse_udp_uri

    host, port = parse_udp_uri(listen)
    caps = Capabilities.measure(name, memory_limit)
    peer = DesktopPeer(caps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with await UdpEndpoint.bind(host, port, mtu=mtu) as ep:
        bound_host, bound_port = ep.address[:2]
        print(f"tpfed peer {name} listening on udp://{bound_host}:{bound_port} "
              f"({caps.int8_macs / 1e9:.2f} GMAC/s int8, {caps.arena_bytes >> 20} MiB offered)",
              flush=True)

        def on_frame(frame: bytes, addr: tuple) -> None:
            for reply in peer.handle(frame):
                ep.send_nowait(reply, addr)

        ep.handler = on_frame
        await stop.wait()
    s = peer.stats
    if verbose:
        print(f"tpfed peer {name}: {s.frames_in} frames in, {s.activations} activations, "
              f"{s.dropped} dropped, {s.errors_sent} errors sent", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import socket

    name = args.name or socket.gethostname()
    limit = int(args.memory_mb * 2**20) if args.memory_mb is not None else None
    from tpfed.runtime import aio

    aio.run(serve(args.listen, name, limit, args.mtu, args.verbose))
    return 0
