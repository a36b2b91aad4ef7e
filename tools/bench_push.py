#!/usr/bin/env python3
"""Weight-push throughput over loopback against raw UDP throughput, in the same run.

A one-layer random Llama whose whole layer share is about ``--mb`` MB is quantised, one keyed
``tpfed peer`` process is started on loopback (one datagram per frame), and the share is pushed
``--tries`` times through the coordinator's windowed, selectively acknowledged WEIGHTS path
(ASSIGN, chunks, ACKs, READY; the peer verifies the sha256 every time). Raw loopback UDP is
measured first: 64 KB datagrams from one socket to another, counted as received.

    python tools/bench_push.py                 # 100 MB share, 20 tries
    python tools/bench_push.py --mb 12 --tries 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_llama import write_random_llama  # noqa: E402


def raw_udp_mb_s(total: int = 200 << 20, size: int = 65000) -> float:
    """Loopback UDP goodput: datagrams of ``size`` bytes sent as fast as one socket can, counted
    by a receiving thread (drops are not counted)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.3)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = [0, 0.0]

    def receive() -> None:
        buf = bytearray(65536)
        try:
            while True:
                n = rx.recv_into(buf)
                got[0] += n
                got[1] = time.perf_counter()
        except OSError:
            return

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    payload = bytes(size)
    addr = rx.getsockname()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        try:
            tx.sendto(payload, addr)
            sent += size
        except BlockingIOError:
            continue
    t.join()
    rx.close()
    tx.close()
    return got[0] / (got[1] - t0) / 1e6


def _timed(fn, acc: list[float]):
    """``fn`` (a coroutine method) with its run time added to ``acc[0]``."""
    async def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            acc[0] += time.perf_counter() - t
    return timed


async def push_runs(q8, tries: int, deadline_s: float) -> tuple[list[float], list[float], int, int]:
    """(seconds per push_weights call, seconds on the wire per call (chunks, ACKs, READY; the
    share's serialisation and sha256 on the coordinator excluded), failures, share bytes)."""
    from tpfed.protocol import auth

    from tpfed.runtime.coordinator import Coordinator
    from tpfed.runtime.localpeers import LocalPeers
    from tpfed.runtime.session import LOOPBACK_MTU
    from tpfed.transport import UdpEndpoint

    key = auth.new_key()
    times: list[float] = []
    failures = 0
    async with LocalPeers(1, key=key, extra_args=("--mtu", str(LOOPBACK_MTU))) as uris:
        ep = await UdpEndpoint.bind("127.0.0.1", 0, mtu=LOOPBACK_MTU)
        link = await ep.open_link(uris[0], name="local-0")
        coord = Coordinator(q8, [link], key=key, deadline_s=deadline_s, seq_len=q8.config.seq_len)
        wire = [0.0]
        for name in ("_push_chunks", "_await_ready"):
            setattr(coord, name, _timed(getattr(coord, name), wire))
        wire_times: list[float] = []
        try:
            await coord.connect()
            coord.make_plan("round-robin")
            for _ in range(tries):
                before = coord.weight_bytes_pushed
                wire[0] = 0.0
                t0 = time.perf_counter()
                try:
                    await coord.push_weights()
                except Exception as exc:  # noqa: BLE001 - a failure is counted and shown
                    failures += 1
                    print(f"push failed: {exc}", file=sys.stderr)
                    continue
                times.append(time.perf_counter() - t0)
                wire_times.append(wire[0])
                size = coord.weight_bytes_pushed - before
        finally:
            await coord.close()
            await ep.close()
    return times, wire_times, failures, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="share size in MB (about; 100)")
    ap.add_argument("--tries", type=int, default=20, help="pushes (20)")
    ap.add_argument("--deadline", type=float, default=10.0, help="coordinator deadline, s (10)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)

    from tpfed.compute.int8_forward import Q8Model

    # a layer of dim d and hidden 2.75 d holds 4 d^2 + 3 * 2.75 d^2 = 12.25 d^2 int8 weights
    dim = max(128, -(-int((args.mb * 1e6 / 1.0625 / 12.25) ** 0.5) // 128) * 128)
    hidden = dim * 11 // 4 // 32 * 32
    with tempfile.TemporaryDirectory(prefix="tpfed-bench-push-") as tmp:
        path = Path(tmp) / "random.bin"
        write_random_llama(path, dim=dim, hidden=hidden, layers=1, heads=dim // 128,
                           kv_heads=dim // 128, vocab=32, seq_len=8)
        q8 = Q8Model.load(path)
    raw = raw_udp_mb_s()
    times, wire_times, failures, size = asyncio.run(push_runs(q8, args.tries, args.deadline))
    rates = [size / t / 1e6 for t in times]
    wire_rates = [size / t / 1e6 for t in wire_times]
    out = {"share_bytes": size, "tries": args.tries, "failures": failures,
           "wire_mb_s_median": round(statistics.median(wire_rates), 1) if wire_rates else 0.0,
           "wire_mb_s_min": round(min(wire_rates), 1) if wire_rates else 0.0,
           "push_mb_s_median": round(statistics.median(rates), 1) if rates else 0.0,
           "push_mb_s_min": round(min(rates), 1) if rates else 0.0,
           "push_mb_s_max": round(max(rates), 1) if rates else 0.0,
           "raw_udp_mb_s": round(raw, 1)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"share {size / 1e6:.1f} MB, {args.tries} pushes, {failures} failed: "
              f"on the wire {out['wire_mb_s_median']} MB/s median (min {out['wire_mb_s_min']}), "
              f"push_weights {out['push_mb_s_median']} MB/s median ({out['push_mb_s_min']}..{out['push_mb_s_max']}, "
              "share serialised and hashed included); "
              f"raw loopback UDP {out['raw_udp_mb_s']} MB/s")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
