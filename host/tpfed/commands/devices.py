"""``tpfed devices``: the peers a run could use, with what they announce and what their links
measure (HELLO and PROBE only; no weights are pushed). Without ``--peers`` it lists the serial
ports of this machine, so one sees which boards are attached, without opening them."""

from __future__ import annotations

import argparse

NAME = "devices"
HELP = "list reachable peers with their measured figures (and, without --peers, attached serial ports)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", metavar="SPEC", default=None,
                        help="peers to reach, as for tpfed run: local:N, emu:N, udp://HOST:PORT, "
                             "serial:///dev/X?baud=N, socket://HOST:PORT")
    parser.add_argument("--deadline", type=float, default=3.0, metavar="SECONDS",
                        help="a peer that does not answer within this is unreachable (3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="the federation key the peers hold (as for tpfed run)")


def serial_ports() -> list[dict]:
    """The serial ports of this machine (pyserial's list; none is opened)."""
    from serial.tools import list_ports

    return [{"device": p.device, "description": p.description or "",
             "hwid": p.hwid or "", "vid": p.vid, "pid": p.pid}
            for p in sorted(list_ports.comports(), key=lambda p: p.device)]


def device_row(peer) -> dict:
    """One reachable peer as ``tpfed devices --json`` reports it."""
    spec = peer.spec()
    h = peer.hello
    return {
        "name": h["name"] or peer.name,
        "uri": getattr(peer.link, "uri", ""),
        "device_class": spec.device_class,
        "int8_gmacs": h["int8_macs"] / 1e9,
        "arena_mib": h["arena_kb"] / 1024,
        "ram_mib": h["ram_kb"] / 1024,
        "psram_mib": h["psram_kb"] / 1024,
        "cores": h["cores"],
        "latency_us": peer.latency_s * 1e6,
        "bandwidth_mbytes_s": peer.bandwidth_Bps / 1e6,
        "battery_pct": spec.battery_pct,
        "temperature_c": spec.temperature_c,
        "max_frame": h["max_frame"],
    }


async def probe_peers(spec: str, deadline_s: float, key_file: str | None = None) -> list[dict]:
    """HELLO and PROBE every peer of ``spec`` (starting local peers and emulated boards for the
    time of the call); raises :class:`tpfed.errors.PeerError` naming an unreachable one."""
    import contextlib

    from tpfed.runtime.coordinator import PeerLinks
    from tpfed.runtime.peerspec import parse_peers
    from tpfed.runtime.session import federation_key, open_links

    specs = parse_peers(spec)
    key = federation_key(specs, key_file)
    async with contextlib.AsyncExitStack() as stack:
        links = await open_links(specs, stack, key=key)
        fleet = PeerLinks(links, key=key, deadline_s=deadline_s)
        try:
            peers = await fleet.connect()
            return [device_row(p) for p in peers]
        finally:
            await fleet.close()


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def run(args: argparse.Namespace) -> int:
    import json

    from tpfed.errors import PeerError, TpfedError
    from tpfed.runtime import aio

    if not args.deadline > 0:
        raise TpfedError(f"--deadline must be positive, got {args.deadline}")
    devices: list[dict] = []
    if args.peers is not None:
        try:
            devices = aio.run(probe_peers(args.peers, args.deadline, args.key_file))
        except (OSError, ConnectionError) as exc:
            raise PeerError(f"peer connection failed: {exc}") from None
    ports = serial_ports() if args.peers is None else []
    if args.json:
        doc: dict = {"devices": devices}
        if args.peers is None:
            doc["serial_ports"] = ports
        print(json.dumps(doc))
        return 0

    from rich.console import Console
    from rich.table import Table

    con = Console()
    if args.peers is not None:
        t = Table(title=f"{len(devices)} reachable peer(s)")
        for col in ("name", "uri", "class", "int8 GMAC/s", "arena MiB", "RAM MiB", "latency us",
                    "bandwidth MB/s", "battery", "temperature"):
            t.add_column(col, justify="left" if col in ("name", "uri", "class") else "right")
        for d in devices:
            t.add_row(d["name"], d["uri"], d["device_class"], f"{d['int8_gmacs']:.2f}",
                      f"{d['arena_mib']:.1f}", f"{d['ram_mib']:.0f}", f"{d['latency_us']:.0f}",
                      f"{d['bandwidth_mbytes_s']:.1f}",
                      _num(d["battery_pct"], "d") + ("%" if d["battery_pct"] is not None else ""),
                      _num(d["temperature_c"], ".1f") + (" C" if d["temperature_c"] is not None else ""))
        con.print(t)
    else:
        t = Table(title=f"{len(ports)} serial port(s) (not opened; reach a board with "
                        "--peers serial:///dev/X)")
        for col in ("device", "description", "hardware id"):
            t.add_column(col)
        for p in ports:
            t.add_row(p["device"], p["description"], p["hwid"])
        con.print(t)
        con.print("[dim]give --peers SPEC to reach peers and measure them[/dim]")
    return 0
