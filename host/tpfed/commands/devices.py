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


async def probe_peers(spec: str, deadline_s: float, key_file: str | None = None
                      ) -> tuple[list[dict], list[dict]]:
    """HELLO and PROBE every peer of ``spec`` (starting local peers and emulated boards for the
    time of the call): (rows of the reachable peers, ``{"uri", "error"}`` of the others).

    Each peer is reached on its own session, one after the other (so probes do not time each
    other), and a peer that cannot be opened or does not answer does not hide the rest. Local
    peers and emulated boards are started here: failing to start them raises."""
    import contextlib

    from tpfed.errors import TpfedError
    from tpfed.runtime.coordinator import PeerLinks
    from tpfed.runtime.peerspec import parse_peers
    from tpfed.runtime.session import federation_key, open_links

    specs = parse_peers(spec)
    key = federation_key(specs, key_file)
    rows: list[dict] = []
    unreachable: list[dict] = []
    async with contextlib.AsyncExitStack() as stack:
        ours = [s for s in specs if s.kind in ("local", "emu")]
        ours_links = iter(await open_links(ours, stack, key=key) if ours else [])
        targets = []  # (uri, link or the error that kept it from opening), in --peers order
        for s in specs:
            if s.kind in ("local", "emu"):
                targets.append((s.uri, next(ours_links)))
                continue
            try:
                targets.append((s.uri, (await open_links([s], stack, key=key))[0]))
            except (OSError, ConnectionError, TpfedError) as exc:
                targets.append((s.uri, exc))
        for uri, link in targets:
            if isinstance(link, BaseException):
                unreachable.append({"uri": uri, "error": str(link)})
                continue
            fleet = PeerLinks([link], key=key, deadline_s=deadline_s)
            try:
                peers = await fleet.connect()
                rows.append(device_row(peers[0]))
            except (OSError, ConnectionError, TpfedError) as exc:
                unreachable.append({"uri": getattr(link, "uri", "") or uri, "error": str(exc)})
            finally:
                await fleet.close()
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):  # two peers that announce one name stay apart
        if row["name"] in seen:
            row["name"] = f"{row['name']}#{i + 1}"
        seen[row["name"]] = i
    return rows, unreachable


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tpfed.errors import PeerError, TpfedError
    from tpfed.runtime import aio

    if not args.deadline > 0:
        raise TpfedError(f"--deadline must be positive, got {args.deadline}")
    devices: list[dict] = []
    unreachable: list[dict] = []
    if args.peers is not None:
        try:
            devices, unreachable = aio.run(probe_peers(args.peers, args.deadline, args.key_file))
        except (OSError, ConnectionError) as exc:
            raise PeerError(f"peer connection failed: {exc}") from None
        if unreachable and not devices:  # nothing to show: one line that names them
            raise PeerError("; ".join(u["error"] for u in unreachable))
    ports = serial_ports() if args.peers is None else []
    # some peers unreachable: the others are shown, each unreachable one named on stderr, exit 1
    status = 1 if unreachable else 0
    for u in unreachable:
        why = u["error"] if u["uri"] in u["error"] else f"{u['uri']}: {u['error']}"
        print(f"tpfed: unreachable: {why}", file=sys.stderr)
    if args.json:
        doc: dict = {"devices": devices}
        if args.peers is None:
            doc["serial_ports"] = ports
        else:
            doc["unreachable"] = unreachable
        print(json.dumps(doc))
        return status

    from rich.table import Table

    from tpfed.commands._output import console

    con = console()
    if args.peers is not None:
        title = f"{len(devices)} reachable peer(s)"
        if unreachable:
            title += f", {len(unreachable)} unreachable: " + ", ".join(u["uri"] for u in unreachable)
        t = Table(title=title)
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
        return status
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
