"""Shared pytest configuration: the reference model location and the HIL options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("TPFED_MODELS", REPO.parent / "shared" / "models"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--board-port",
        action="append",
        default=[],
        metavar="PORT",
        help="run HIL tests against a real board on this serial port (repeatable); "
        "without it they run against emulated boards",
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    d = SHARED_MODELS / "stories260K"
    if not (d / "stories260K.bin").is_file():
        pytest.fail(f"stories260K not found in {d}; set TPFED_MODELS to the folder holding it")
    return d


@pytest.fixture(scope="session")
def board_ports(request: pytest.FixtureRequest) -> list[str]:
    return list(request.config.getoption("--board-port"))
