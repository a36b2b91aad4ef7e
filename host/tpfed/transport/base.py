"""What every transport offers: a Link carrying whole frames (bytes) to one remote endpoint."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tpfed.errors import PeerError

T = TypeVar("T")


class LinkClosed(PeerError):
    """The link was closed locally or the remote end went away."""


@dataclass
class LinkStats:
    bytes_sent: int = 0  # on the wire, framing included
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    dropped: int = 0  # frames lost to framing errors, bad CRC, expiry or a full receive queue


class FrameQueue(Generic[T]):
    """Bounded receive queue with a single waiter; the oldest item is dropped when full.

    Cheaper than asyncio.Queue + wait_for on the per-frame path (no task per receive)."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._items: deque[T] = deque()
        self._maxlen = maxlen
        self._waiter: asyncio.Future[T] | None = None
        self._closed: BaseException | None = None
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        w = self._waiter
        if w is not None and not w.done():
            self._waiter = None
            w.set_result(item)
            return
        self._items.append(item)
        if len(self._items) > self._maxlen:
            self._items.popleft()
            self.overflows += 1

    def close(self, exc: BaseException) -> None:
        self._closed = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self._waiter = None

    async def get(self, timeout: float | None = None) -> T:
        if self._items:
            return self._items.popleft()
        if self._closed is not None:
            raise self._closed
        if self._waiter is not None:
            raise RuntimeError("FrameQueue supports one receiver at a time")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except (TimeoutError, asyncio.CancelledError):
            # put() may have handed us an item in the same loop pass as the timeout or
            # cancellation: keep it for the next get() instead of losing it
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._items.appendleft(fut.result())
            raise
        finally:
            if self._waiter is fut:
                self._waiter = None


class Link(ABC):
    """A bidirectional frame pipe to one remote endpoint.

    ``recv`` raises TimeoutError after ``timeout`` seconds and LinkClosed once the link is
    closed (frames already received are still delivered first). One receiver at a time."""

    name: str = "link"
    # When set, every received frame is offered to this callback first, as it arrives (no
    # queue, no task switch); it returns True when it took the frame, False to queue it for
    # ``recv``. The coordinator gathers a stage's partials this way.
    on_frame: Callable[[bytes], bool] | None = None

    @abstractmethod
    async def send(self, frame: bytes) -> None: ...

    @abstractmethod
    async def recv(self, timeout: float | None = None) -> bytes: ...

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def stats(self) -> LinkStats: ...

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
