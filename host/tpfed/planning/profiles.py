"""Board and device profiles: one YAML file per device class in ``boards/`` (package
``tpfed.boards``).

A profile states the datasheet figures of a device class (RAM, PSRAM, flash, clock, cores,
FPU/SIMD), what a tpfed peer on it can use (``usable``: bytes for weights + KV cache), its
expected int8 matrix-vector throughput (``int8_gmacs``) and its links (``transports``: one-way
latency and payload bandwidth, or a UART baud rate). Every figure carries a ``sources`` entry
saying where it comes from (datasheet, firmware configuration, measurement or a stated estimate);
the loader refuses a profile with an unsourced figure.

Sizes are written with a unit (``520 KiB``, ``4 MiB``, ``12 GiB``, ``0 B``); bandwidths in Mbit/s
of payload; latencies in milliseconds, one way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tpfed.errors import FleetError

DEVICE_CLASSES = ("mcu", "phone", "laptop", "desktop")
TRANSPORT_KINDS = ("serial", "ble", "wifi", "ethernet", "loopback")
FIGURES = ("ram", "flash", "clock_mhz", "cores", "usable", "int8_gmacs")
"""Figures every profile must give a source for (plus ``psram`` when non-zero and each transport)."""

_UNITS = {
    "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B)\s*$", re.IGNORECASE)


def parse_size(value: Any, what: str) -> int:
    """``"520 KiB"`` -> 532480. Plain integers are bytes."""
    if isinstance(value, bool):
        raise FleetError(f"{what}: expected a size such as '512 KiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise FleetError(f"{what}: size must not be negative, got {value}")
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise FleetError(f"{what}: expected a size such as '512 KiB' or '4 GiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class LinkProfile:
    """One transport of a device class. ``latency_s`` is one way; ``bandwidth_Bps`` is payload."""

    kind: str
    latency_s: float
    bandwidth_Bps: float
    baud: int | None = None


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    device_class: str
    cpu: str
    cores: int
    clock_hz: float
    ram_bytes: int
    psram_bytes: int
    flash_bytes: int
    fpu: str
    simd: str
    usable_bytes: int
    int8_macs: float
    transports: dict[str, LinkProfile]
    default_transport: str
    platformio_env: str | None
    sources: dict[str, str] = field(default_factory=dict)

    def link(self, kind: str | None = None) -> LinkProfile:
        """The named transport (default: the profile's default transport)."""
        kind = kind or self.default_transport
        try:
            return self.transports[kind]
        except KeyError:
            raise FleetError(
                f"profile {self.name!r} has no {kind!r} transport (has: {', '.join(self.transports)})"
            ) from None


def _number(doc: dict, key: str, where: str, *, positive: bool = True) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FleetError(f"{where}: {key} must be a number, got {value!r}")
    if positive and value <= 0:
        raise FleetError(f"{where}: {key} must be positive, got {value}")
    return float(value)


def _text(doc: dict, key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip():
        raise FleetError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _link(kind: str, doc: Any, where: str) -> LinkProfile:
    where = f"{where}: transports.{kind}"
    if kind not in TRANSPORT_KINDS:
        raise FleetError(f"{where}: unknown transport (known: {', '.join(TRANSPORT_KINDS)})")
    if not isinstance(doc, dict):
        raise FleetError(f"{where}: expected a mapping")
    unknown = set(doc) - {"baud", "bandwidth_mbps", "latency_ms"}
    if unknown:
        raise FleetError(f"{where}: unknown keys {sorted(unknown)}")
    latency_s = _number(doc, "latency_ms", where) / 1e3
    if "baud" in doc:
        baud = int(_number(doc, "baud", where))
        return LinkProfile(kind, latency_s, baud / 10.0, baud)  # 8N1: ten bits on the wire per byte
    return LinkProfile(kind, latency_s, _number(doc, "bandwidth_mbps", where) * 1e6 / 8.0)


def parse_profile(doc: Any, where: str) -> BoardProfile:
    """Validate one profile document (raises :class:`FleetError` naming the problem)."""
    if not isinstance(doc, dict):
        raise FleetError(f"{where}: a profile must be a mapping")
    name = _text(doc, "name", where)
    device_class = _text(doc, "device_class", where)
    if device_class not in DEVICE_CLASSES:
        raise FleetError(f"{where}: device_class {device_class!r} is not one of {', '.join(DEVICE_CLASSES)}")
    transports_doc = doc.get("transports")
    if not isinstance(transports_doc, dict) or not transports_doc:
        raise FleetError(f"{where}: transports must be a non-empty mapping")
    transports = {kind: _link(kind, t, where) for kind, t in transports_doc.items()}
    default = _text(doc, "default_transport", where)
    if default not in transports:
        raise FleetError(f"{where}: default_transport {default!r} is not among its transports")
    env = doc.get("platformio_env")
    if env is not None and not isinstance(env, str):
        raise FleetError(f"{where}: platformio_env must be a string or null")
    sources = doc.get("sources")
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v for v in sources.values()):
        raise FleetError(f"{where}: sources must map each figure to where it comes from")
    psram = parse_size(doc.get("psram", 0), f"{where}: psram")
    needed = list(FIGURES) + [f"transports.{k}" for k in transports] + (["psram"] if psram else [])
    missing = [k for k in needed if k not in sources]
    if missing:
        raise FleetError(f"{where}: no source given for {', '.join(missing)}")
    cores = _number(doc, "cores", where)
    if cores != int(cores):
        raise FleetError(f"{where}: cores must be an integer")
    profile = BoardProfile(
        name=name,
        description=_text(doc, "description", where),
        device_class=device_class,
        cpu=_text(doc, "cpu", where),
        cores=int(cores),
        clock_hz=_number(doc, "clock_mhz", where) * 1e6,
        ram_bytes=parse_size(doc.get("ram"), f"{where}: ram"),
        psram_bytes=psram,
        flash_bytes=parse_size(doc.get("flash"), f"{where}: flash"),
        fpu=_text(doc, "fpu", where),
        simd=_text(doc, "simd", where),
        usable_bytes=parse_size(doc.get("usable"), f"{where}: usable"),
        int8_macs=_number(doc, "int8_gmacs", where) * 1e9,
        transports=transports,
        default_transport=default,
        platformio_env=env,
        sources=dict(sources),
    )
    if profile.usable_bytes <= 0:
        raise FleetError(f"{where}: usable memory must be positive")
    if profile.usable_bytes > profile.ram_bytes + profile.psram_bytes:
        raise FleetError(f"{where}: usable memory exceeds RAM + PSRAM")
    return profile


def load_profile_file(path: str | Path) -> BoardProfile:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FleetError(f"{path}: cannot read profile ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    profile = parse_profile(doc, str(path.name))
    if profile.name != path.stem:
        raise FleetError(f"{path}: profile name {profile.name!r} does not match its file name")
    return profile


def _boards_dir() -> Path:
    return Path(str(resources.files("tpfed.boards")))


def list_profiles() -> list[str]:
    """Names of the profiles shipped in ``tpfed.boards``."""
    return sorted(p.stem for p in _boards_dir().glob("*.yaml"))


@cache
def load_profile(name: str) -> BoardProfile:
    """The shipped profile ``name`` (raises :class:`FleetError` for an unknown name)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise FleetError(f"unknown board profile {name!r}")
    path = _boards_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FleetError(f"unknown board profile {name!r} (known: {', '.join(list_profiles())})")
    return load_profile_file(path)
