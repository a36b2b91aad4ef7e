"""``tpfed peer``: serve as a desktop peer on a UDP port until stopped."""

from __future__ import annotations

import argparse

NAME = "peer"
HELP = "Serve as a desktop peer: hold a share of the model and answer activations over UDP."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="udp://0.0.0.0:0", metavar="udp://HOST:PORT",
                        help="where to listen; port 0 picks a free one and prints it")
    parser.add_argument("--name", default=None, help="name announced in HELLO (default: host name)")
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="memory offered for weights, KV cache and buffers (default: what is free)")
    parser.add_argument("--mtu", type=int, default=1400, help="UDP payload size before fragmenting")
    parser.add_argument("--verbose", action="store_true", help="print frame counts on exit")


def run(args: argparse.Namespace) -> int:
    import math
    import socket

    from tpfed.errors import TpfedError
    from tpfed.runtime.desktop_peer import run_peer
    from tpfed.transport import parse_udp_uri

    name = args.name or socket.gethostname()
    memory = None
    if args.memory_mb is not None:
        if not math.isfinite(args.memory_mb) or args.memory_mb <= 0:
            raise TpfedError(f"--memory-mb must be a positive number of MiB, not {args.memory_mb:g}")
        memory = int(args.memory_mb * 2**20)
    host, port = parse_udp_uri(args.listen)
    run_peer(host, port, name, memory, args.mtu, args.verbose)
    return 0
