"""The devices a plan is made for: :class:`DeviceSpec` (built by the coordinator from HELLO and
probes, or read from a fleet YAML file by :func:`load_fleet`).

Fleet YAML::

    description: optional text
    devices:
      - {name: gpu, profile: desktop-gpu}                  # figures from boards/desktop-gpu.yaml
      - {name: phone, count: 3, profile: phone-mid, battery_pct: 15}
      - {name: esp, profile: esp32, transport: ble}      # the profile's BLE link figures
      - {name: box, ram_mb: 2048, int8_gmacs: 20, latency_ms: 0.2, bandwidth_mbps: 940}

``ram_mb`` is the memory (MiB) the device gives to weights + KV cache, ``int8_gmacs`` its int8
matrix-vector throughput (10^9 MAC/s), ``latency_ms`` its one-way link latency,
``bandwidth_mbps`` its link payload rate (Mbit/s). A ``profile`` fills whatever is not given;
without a profile all four are required. ``count: N`` expands to ``name-1`` .. ``name-N``.

Derating (applied by :attr:`DeviceSpec.effective_macs`, which the planner and the simulator use):

- battery: below 20 % phones and laptops enter battery saver, which caps the big cores:
  x0.7; below 10 %: x0.5. ``battery_pct`` None (mains power) means no derating.
- temperature (phones and laptops only; passively cooled SoCs throttle, desktops and MCUs run
  at full clock within their rated range): above 45 C the throughput falls by 2 % per degree,
  down to x0.4 at 75 C and beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tpfed.errors import FleetError
from tpfed.planning.profiles import DEVICE_CLASSES, load_profile

MIB = 1 << 20
THROTTLING_CLASSES = ("phone", "laptop")
_ENTRY_KEYS = {
    "name", "count", "ram_mb", "int8_gmacs", "latency_ms", "bandwidth_mbps", "profile",
    "transport", "battery_pct", "temperature_c", "device_class",
}


def battery_derating(battery_pct: int | None) -> float:
    if battery_pct is None or battery_pct >= 20:
        return 1.0
    return 0.7 if battery_pct >= 10 else 0.5


def thermal_derating(temperature_c: float | None, device_class: str) -> float:
    if temperature_c is None or device_class not in THROTTLING_CLASSES or temperature_c <= 45.0:
        return 1.0
    return max(0.4, 1.0 - 0.02 * (temperature_c - 45.0))


@dataclass
class DeviceSpec:
    """One peer as the planner sees it.

    ``memory_bytes`` is what it can give to weights + KV cache (before the planner's safety
    margin), ``int8_macs`` its measured or expected int8 matrix-vector MAC/s at full power,
    ``latency_s`` its one-way link latency and ``bandwidth_Bps`` its link payload bytes/s.
    """

    name: str
    memory_bytes: int
    int8_macs: float
    latency_s: float
    bandwidth_Bps: float
    profile: str | None = None
    device_class: str = "desktop"
    battery_pct: int | None = None
    temperature_c: float | None = None
    transport: str | None = None

    def __post_init__(self) -> None:
        where = f"device {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise FleetError("a device needs a non-empty name")
        if self.memory_bytes < 0:
            raise FleetError(f"{where}: memory must not be negative")
        for key in ("int8_macs", "bandwidth_Bps"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise FleetError(f"{where}: {key} must be a positive number, got {v!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise FleetError(f"{where}: latency must be a non-negative number")
        if self.device_class not in DEVICE_CLASSES:
            raise FleetError(f"{where}: device_class {self.device_class!r} is not one of {DEVICE_CLASSES}")
        if self.battery_pct is not None and not 0 <= self.battery_pct <= 100:
            raise FleetError(f"{where}: battery_pct must be 0..100")

    @property
    def derating(self) -> float:
        """Throughput factor for low battery and heat (see the module docstring)."""
        return battery_derating(self.battery_pct) * thermal_derating(self.temperature_c, self.device_class)

    @property
    def effective_macs(self) -> float:
        return self.int8_macs * self.derating

    def stage_link_s(self, stage_bytes: int) -> float:
        """Link time of one stage: activation there and partial back (two one-way latencies)."""
        return 2.0 * self.latency_s + stage_bytes / self.bandwidth_Bps


def device_from_profile(name: str, profile: str, transport: str | None = None, **overrides: Any) -> DeviceSpec:
    """A device with the figures of a shipped board profile."""
    p = load_profile(profile)
    link = p.link(transport)
    fields: dict[str, Any] = {
        "memory_bytes": p.usable_bytes,
        "int8_macs": p.int8_macs,
        "latency_s": link.latency_s,
        "bandwidth_Bps": link.bandwidth_Bps,
        "device_class": p.device_class,
        "transport": link.kind,
    }
    fields.update(overrides)
    return DeviceSpec(name=name, profile=profile, **fields)


def identical_fleet(n: int, profile: str = "desktop", prefix: str = "peer") -> list[DeviceSpec]:
    """``n`` devices of one profile, named ``prefix-1`` .. ``prefix-n``."""
    if n < 1:
        raise FleetError(f"a fleet needs at least one device, got {n}")
    return [device_from_profile(f"{prefix}-{i}", profile) for i in range(1, n + 1)]


def _num(entry: dict, key: str, where: str) -> float | None:
    if key not in entry or entry[key] is None:
        return None
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise FleetError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def parse_entry(entry: Any, where: str) -> list[DeviceSpec]:
    if not isinstance(entry, dict):
        raise FleetError(f"{where}: expected a mapping with at least a name")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise FleetError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_ENTRY_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FleetError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name})"
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FleetError(f"{where}: count must be a positive integer, got {count!r}")
    ram_mb = _num(entry, "ram_mb", where)
    gmacs = _num(entry, "int8_gmacs", where)
    latency_ms = _num(entry, "latency_ms", where)
    mbps = _num(entry, "bandwidth_mbps", where)
    battery = _num(entry, "battery_pct", where)
    temperature = _num(entry, "temperature_c", where)
    transport = entry.get("transport")
    if transport is not None and not isinstance(transport, str):
        raise FleetError(f"{where}: transport must be a string")
    for key, v in (("ram_mb", ram_mb), ("int8_gmacs", gmacs), ("bandwidth_mbps", mbps)):
        if v is not None and v <= 0:
            raise FleetError(f"{where}: {key} must be positive, got {v:g}")
    if latency_ms is not None and latency_ms < 0:
        raise FleetError(f"{where}: latency_ms must not be negative")
    fields: dict[str, Any] = {}
    profile = entry.get("profile")
    if profile is not None:
        if not isinstance(profile, str):
            raise FleetError(f"{where}: profile must be a string")
        try:
            p = load_profile(profile)
            link = p.link(transport)
        except FleetError as exc:
            raise FleetError(f"{where}: {exc}") from None
        fields = {
            "memory_bytes": p.usable_bytes,
            "int8_macs": p.int8_macs,
            "latency_s": link.latency_s,
            "bandwidth_Bps": link.bandwidth_Bps,
            "device_class": p.device_class,
            "transport": link.kind,
        }
    else:
        missing = [k for k, v in (("ram_mb", ram_mb), ("int8_gmacs", gmacs), ("latency_ms", latency_ms),
                                  ("bandwidth_mbps", mbps)) if v is None]
        if missing:
            raise FleetError(f"{where}: without a profile it needs {', '.join(missing)}")
        fields = {"transport": transport}
    if ram_mb is not None:
        fields["memory_bytes"] = int(ram_mb * MIB)
    if gmacs is not None:
        fields["int8_macs"] = gmacs * 1e9
    if latency_ms is not None:
        fields["latency_s"] = latency_ms / 1e3
    if mbps is not None:
        fields["bandwidth_Bps"] = mbps * 1e6 / 8.0
    if entry.get("device_class") is not None:
        fields["device_class"] = entry["device_class"]
    fields["battery_pct"] = None if battery is None else int(battery)
    fields["temperature_c"] = temperature
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    return [DeviceSpec(name=n, profile=profile, **fields) for n in names]


def parse_fleet(doc: Any, where: str = "fleet") -> list[DeviceSpec]:
    if not isinstance(doc, dict) or "devices" not in doc:
        raise FleetError(f"{where}: expected a mapping with a 'devices' list")
    unknown = set(doc) - {"devices", "description"}
    if unknown:
        raise FleetError(f"{where}: unknown top-level keys {sorted(unknown)}")
    entries = doc["devices"]
    if not isinstance(entries, list) or not entries:
        raise FleetError(f"{where}: 'devices' must be a non-empty list")
    devices: list[DeviceSpec] = []
    for i, entry in enumerate(entries):
        devices.extend(parse_entry(entry, f"{where}: devices[{i}]"))
    seen: set[str] = set()
    for d in devices:
        if d.name in seen:
            raise FleetError(f"{where}: device name {d.name!r} appears twice")
        seen.add(d.name)
    return devices


def fleet_names() -> list[str]:
    """The fleets that ship with tpfed (``boards/fleets/*.yaml``), by name."""
    from importlib import resources

    folder = resources.files("tpfed.boards") / "fleets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_fleet(name_or_path: str | Path) -> Path:
    """A fleet file: ``name_or_path`` if it is a file, else the shipped fleet of that name
    (``lab-100`` or ``lab-100.yaml``; see :func:`fleet_names`; an unknown name raises
    :class:`FleetError`). A path that does not exist is returned as it is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:
        from importlib import resources

        stem = text[:-5] if text.endswith(".yaml") else text
        shipped = resources.files("tpfed.boards") / "fleets" / f"{stem}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
        raise FleetError(f"{name_or_path}: no such fleet file, and not a shipped fleet "
                         f"(shipped: {', '.join(fleet_names())})")
    if text.startswith(("boards/fleets/", "./boards/fleets/")):
        return resolve_fleet(path.name)  # the README's path, from outside a checkout
    return path  # load_fleet says it cannot be read


def load_fleet(path: str | Path) -> list[DeviceSpec]:
    """Read a fleet YAML file, or a shipped fleet by name (raises :class:`FleetError` with one
    clear line on any problem)."""
    path = resolve_fleet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"{path}: cannot read fleet file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise FleetError(f"{path}: not a fleet file (not UTF-8 text: byte 0x{exc.object[exc.start]:02x} "
                         f"at offset {exc.start})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_fleet(doc, str(path))
