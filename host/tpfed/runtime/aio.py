"""The event loop tpfed runs on: uvloop where it is installed (Linux, macOS), else asyncio's.

Each generated token is ~10 request/response round trips per peer. On asyncio's pure-Python
loop one loopback round trip costs ~80-150 us on a small VM, on uvloop ~30 us: the loop, not
the network, sets the token rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on the platforms it supports
    uvloop = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest available loop."""
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)
