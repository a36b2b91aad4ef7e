"""``tpfed peer``: serve as a desktop peer on a UDP port until stopped."""

from __future__ import annotations

import argparse

NAME = "peer"
HELP = "Serve as a desktop peer: hold a share of the model and answer activations over UDP."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=None, metavar="udp://HOST:PORT",
                        help="where to listen; port 0 picks a free one and prints it (default: "
                             "udp://0.0.0.0:0 with a key file, udp://127.0.0.1:0 without)")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="the federation key (64 hex digits; default: $TPFED_KEY_FILE, else "
                             "~/.config/tpfed/federation.key, which a peer on loopback creates)")
    parser.add_argument("--name", default=None, help="name announced in HELLO (default: host name)")
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="memory offered for weights, KV cache and buffers (default: what is free)")
    parser.add_argument("--mtu", type=int, default=1400, help="UDP payload size before fragmenting")
    parser.add_argument("--verbose", action="store_true", help="print frame counts on exit")
    parser.add_argument("--spin-us", type=int, default=300, metavar="US",
                        help="after a frame, look for the next one this long before sleeping: "
                             "faster stages for a little CPU (300; 0 on battery)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not log sessions and shares (peers a coordinator starts itself)")
    parser.add_argument("--bus", default=None, metavar="mqtt://HOST:PORT",
                        help="announce this peer on an MQTT fleet bus (retained, with a last will)")


def run(args: argparse.Namespace) -> int:
    import math
    import socket
    import sys

    from tpfed.errors import TpfedError
    from tpfed.runtime.desktop_peer import run_peer
    from tpfed.transport import parse_udp_uri

    name = args.name or socket.gethostname()
    memory = None
    if args.memory_mb is not None:
        if not math.isfinite(args.memory_mb) or args.memory_mb <= 0:
            raise TpfedError(f"--memory-mb must be a positive number of MiB, not {args.memory_mb:g}")
        memory = int(args.memory_mb * 2**20)
    from tpfed.runtime import keys

    src = keys.key_source(args.key_file)
    listen = args.listen or ("udp://0.0.0.0:0" if src is not None else "udp://127.0.0.1:0")
    if not 0 <= args.spin_us <= 1_000_000:
        raise TpfedError(f"--spin-us must be 0..1000000, not {args.spin_us}")
    host, port = parse_udp_uri(listen)
    if src is None:
        if not keys.is_loopback(host):
            raise TpfedError(f"a peer listens beyond loopback ({host}) only with a federation key: "
                             f"--key-file PATH or ${keys.ENV} (the same key as the coordinator's)")
        src = keys.create_default_key()
        print(f"tpfed peer: no federation key given; created one in {src} (mode 0600): give the "
              f"coordinator the same file", file=sys.stderr, flush=True)
    key = keys.load_key(src)
    on_listening = None
    if args.bus:
        from tpfed.serve.bus import announce_listening

        on_listening = announce_listening(args.bus)
    run_peer(host, port, name, memory, args.mtu, args.verbose, on_listening=on_listening, key=key,
             quiet=args.quiet, spin_us=args.spin_us)
    return 0
