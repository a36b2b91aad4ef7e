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


@pytest.fixture(scope="session")
def model(stories260k_dir: Path):
    """stories260K as the int8 model and its tokenizer, loaded once for the whole run."""
    from tpfed.compute.int8_forward import Q8Model
    from tpfed.model.tokenizer import Tokenizer

    q8 = Q8Model.load(stories260k_dir / "stories260K.bin")
    return q8, Tokenizer.load(stories260k_dir / "tok512.bin", vocab_size=q8.config.vocab_size)
