"""Board profiles: every shipped profile loads, is sourced, and bad ones fail clearly."""

from __future__ import annotations

import pytest

from tpfed.errors import FleetError
from tpfed.planning.profiles import FIGURES, list_profiles, load_profile, parse_profile, parse_size

REQUIRED = {
    "esp32": "esp32dev", "esp32-s3": "esp32-s3-devkitc-1", "esp32-c3": "esp32-c3-devkitm-1",
    "phone-budget": None, "phone-mid": None, "phone-high": None, "laptop": None,
    "desktop": None, "desktop-gpu": None, "lm3s6965evb": "lm3s6965evb",
}


def test_every_required_profile_ships_with_its_platformio_env():
    assert set(REQUIRED) <= set(list_profiles())
    for name, env in REQUIRED.items():
        assert load_profile(name).platformio_env == env


@pytest.mark.parametrize("name", list_profiles())
def test_profile_figures_are_positive_and_sourced(name):
    p = load_profile(name)
    assert p.ram_bytes > 0 and p.flash_bytes > 0 and p.clock_hz > 0 and p.cores >= 1
    assert 0 < p.usable_bytes <= p.ram_bytes + p.psram_bytes
    assert p.int8_macs > 0
    for figure in FIGURES:
        assert p.sources[figure].strip()
    for kind, link in p.transports.items():
        assert p.sources[f"transports.{kind}"].strip()
        assert link.bandwidth_Bps > 0 and link.latency_s >= 0
    assert p.default_transport in p.transports


def test_lm3s6965evb_matches_the_emulated_board():
    p = load_profile("lm3s6965evb")
    assert p.ram_bytes == 64 * 1024
    assert p.flash_bytes == 256 * 1024
    assert p.clock_hz == 50e6
    assert p.usable_bytes < p.ram_bytes
    assert p.link().baud == 115200 and p.link().bandwidth_Bps == 11520.0


def test_esp32_s3_has_psram_and_serial_at_921600():
    p = load_profile("esp32-s3")
    assert p.psram_bytes == 8 * 1024 * 1024
    assert p.usable_bytes > p.ram_bytes  # its arena lives in PSRAM
    assert p.link("serial").baud == 921600


def test_parse_size():
    assert parse_size("520 KiB", "x") == 520 * 1024
    assert parse_size("4 GiB", "x") == 4 << 30
    assert parse_size("1.5 MB", "x") == 1_500_000
    assert parse_size(12, "x") == 12
    for bad in ("lots", "-1 KiB", True, -5, "5 parsecs"):
        with pytest.raises(FleetError):
            parse_size(bad, "x")


def test_unknown_profile_is_a_fleet_error():
    with pytest.raises(FleetError, match="unknown board profile 'esp8266'"):
        load_profile("esp8266")
    with pytest.raises(FleetError):
        load_profile("../desktop")


def _doc(**changes):
    doc = {
        "name": "x", "description": "d", "device_class": "mcu", "platformio_env": None, "cpu": "c",
        "cores": 1, "clock_mhz": 10, "ram": "64 KiB", "psram": "0 B", "flash": "1 MiB", "fpu": "none",
        "simd": "none", "usable": "32 KiB", "int8_gmacs": 0.01, "default_transport": "serial",
        "transports": {"serial": {"baud": 115200, "latency_ms": 1}},
        "sources": {k: "s" for k in (*FIGURES, "transports.serial")},
    }
    doc.update(changes)
    return doc


def test_parse_profile_accepts_a_minimal_document():
    p = parse_profile(_doc(), "t")
    assert p.usable_bytes == 32 * 1024 and p.link().bandwidth_Bps == 11520.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sources": {k: "s" for k in FIGURES}}, "no source given for transports.serial"),
        ({"psram": "8 MiB"}, "no source given for psram"),
        ({"device_class": "toaster"}, "device_class"),
        ({"default_transport": "ble"}, "default_transport"),
        ({"transports": {"serial": {"latency_ms": 1}}}, "bandwidth_mbps"),
        ({"transports": {"pigeon": {"bandwidth_mbps": 1, "latency_ms": 1}}}, "unknown transport"),
        ({"usable": "1 GiB"}, "exceeds RAM"),
        ({"int8_gmacs": -1}, "int8_gmacs must be positive"),
        ({"cores": 1.5}, "cores must be an integer"),
    ],
)
def test_parse_profile_rejects(changes, message):
    with pytest.raises(FleetError, match=message):
        parse_profile(_doc(**changes), "t")
