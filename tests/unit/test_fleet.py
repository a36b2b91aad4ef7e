"""Fleet YAML loading, profile filling and derating."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpfed.errors import FleetError
from tpfed.planning.fleet import (
    DeviceSpec,
    battery_derating,
    identical_fleet,
    load_fleet,
    parse_fleet,
    thermal_derating,
)
from tpfed.planning.profiles import load_profile


def test_shipped_fleets_load(repo_root):
    fleets = sorted((repo_root / "boards" / "fleets").glob("*.yaml"))
    assert fleets
    for path in fleets:
        devices = load_fleet(path)
        assert len({d.name for d in devices}) == len(devices)
    assert len(load_fleet(repo_root / "boards" / "fleets" / "lab-100.yaml")) == 100


def test_profile_fills_missing_fields_and_count_expands():
    devices = parse_fleet({"devices": [
        {"name": "esp", "count": 3, "profile": "esp32"},
        {"name": "s3", "profile": "esp32-s3", "transport": "ble", "int8_gmacs": 0.1},
    ]})
    assert [d.name for d in devices] == ["esp-1", "esp-2", "esp-3", "s3"]
    esp = load_profile("esp32")
    assert devices[0].memory_bytes == esp.usable_bytes
    assert devices[0].int8_macs == esp.int8_macs
    assert devices[0].bandwidth_Bps == esp.link("serial").bandwidth_Bps
    assert devices[0].device_class == "mcu" and devices[0].profile == "esp32"
    s3 = devices[3]
    assert s3.int8_macs == 0.1e9  # explicit figure wins over the profile
    assert s3.latency_s == load_profile("esp32-s3").link("ble").latency_s
    assert s3.transport == "ble"


def test_explicit_device_without_profile():
    (d,) = parse_fleet({"devices": [
        {"name": "box", "ram_mb": 512, "int8_gmacs": 20, "latency_ms": 0.25, "bandwidth_mbps": 800}]})
    assert d.memory_bytes == 512 << 20
    assert d.int8_macs == 20e9 and d.latency_s == 0.25e-3 and d.bandwidth_Bps == 100e6


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"devices": [{"name": "a", "profile": "nope"}]}, "unknown board profile 'nope'"),
        ({"devices": [{"name": "a", "ram_mb": 1}]}, "without a profile it needs int8_gmacs"),
        ({"devices": [{"name": "a", "profile": "esp32", "transport": "ethernet"}]}, "no 'ethernet' transport"),
        ({"devices": [{"name": "a", "profile": "esp32", "colour": "red"}]}, "unknown keys"),
        ({"devices": [{"name": "a", "profile": "esp32", "count": 0}]}, "count must be a positive"),
        ({"devices": [{"name": "a", "profile": "esp32", "ram_mb": -3}]}, "ram_mb must be positive"),
        ({"devices": [{"name": "a", "profile": "esp32"}, {"name": "a", "profile": "esp32"}]}, "appears twice"),
        ({"devices": []}, "non-empty list"),
        ({"hosts": []}, "'devices' list"),
        ([1, 2], "'devices' list"),
        ({"devices": [{"name": "a", "profile": "esp32", "battery_pct": 140}]}, "battery_pct"),
    ],
)
def test_bad_fleets_fail_with_one_clear_error(doc, message):
    with pytest.raises(FleetError, match=message):
        parse_fleet(doc)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [ {name: a, profile: esp32\n")
    with pytest.raises(FleetError, match="not valid YAML"):
        load_fleet(bad)
    with pytest.raises(FleetError, match="cannot read fleet file"):
        load_fleet(tmp_path / "missing.yaml")


def test_derating():
    assert battery_derating(None) == 1.0 and battery_derating(50) == 1.0
    assert battery_derating(15) == 0.7 and battery_derating(5) == 0.5
    assert thermal_derating(80, "desktop") == 1.0  # desktops do not throttle in range
    assert thermal_derating(40, "phone") == 1.0
    assert thermal_derating(55, "phone") == pytest.approx(0.8)
    assert thermal_derating(90, "laptop") == 0.4
    d = DeviceSpec("p", 1 << 30, 10e9, 1e-3, 1e6, device_class="phone", battery_pct=15, temperature_c=55)
    assert d.effective_macs == pytest.approx(10e9 * 0.7 * 0.8)
    assert d.stage_link_s(1000) == pytest.approx(2e-3 + 1e-3)


def test_device_spec_validates():
    with pytest.raises(FleetError):
        DeviceSpec("", 1, 1.0, 0.0, 1.0)
    with pytest.raises(FleetError, match="int8_macs"):
        DeviceSpec("a", 1, 0.0, 0.0, 1.0)
    with pytest.raises(FleetError, match="latency"):
        DeviceSpec("a", 1, 1.0, float("nan"), 1.0)


def test_identical_fleet():
    devices = identical_fleet(3)
    assert [d.name for d in devices] == ["peer-1", "peer-2", "peer-3"]
    assert all(d.profile == "desktop" for d in devices)
    with pytest.raises(FleetError):
        identical_fleet(0)
