"""Access to the golden frames (shared_protocol/golden, written by tools/gen_golden.py)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def to_json(obj: Any) -> Any:
    """Decoded payload -> JSON-able (bytes become {"$bytes": hex})."""
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$bytes": bytes(obj).hex()}
    return obj


def from_json(obj: Any) -> Any:
    """Inverse of to_json."""
    if isinstance(obj, dict):
        if set(obj) == {"$bytes"}:
            return bytes.fromhex(obj["$bytes"])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


@cache
def manifest() -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / "manifest.json").read_text(encoding="utf-8"))


def entries(kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in manifest()["entries"] if kind is None or e["kind"] == kind]


def read(name: str) -> bytes:
    return (GOLDEN_DIR / name).read_bytes()
