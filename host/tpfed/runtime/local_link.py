"""The coordinator's own CPU as a device: ``--peers self``.

A :class:`LocalLink` is a link to a peer core running in this process (the same C core as
every other device, through :class:`tpfed.runtime.peer_core.MemPeer`): a frame sent is handed
to the core at once and its replies are queued for ``recv``. The peer says HELLO with its
measured MAC/s, takes ASSIGN, WEIGHTS and ACTIVATION like any device, and the planner weighs
it like any device. In the stage fast path (:class:`tpfed.transport.udp_fleet.UdpFleet`) it
computes its share while the remote peers compute theirs.
"""

from __future__ import annotations

from tpfed.runtime.peer_core import DeviceInfo, MemPeer, PeerConfig, available_memory_bytes
from tpfed.transport.base import FrameQueue, Link, LinkClosed, LinkStats

NAME = "self"


class LocalLink(Link):
    """Frames to and from a peer core in this process."""

    def __init__(self, key: bytes, memory_bytes: int | None = None, name: str = NAME) -> None:
        arena = memory_bytes if memory_bytes is not None else available_memory_bytes() // 2
        self.peer = MemPeer(DeviceInfo(board=name, port="in-process"), arena, PeerConfig(key=key))
        self.name = name
        self.uri = NAME
        self._queue: FrameQueue[bytes] = FrameQueue(1024)
        self._stats = LinkStats()
        self._closed = False

    def in_process(self) -> tuple[object, object]:
        """(``tpfed_mem_peer *``, ``tpfed_peer *``) for the C stage exchange."""
        return self.peer.mem_ptr, self.peer.ptr

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise LinkClosed(f"link {self.name} is closed")
        self._stats.frames_sent += 1
        self._stats.bytes_sent += len(frame)
        for reply in self.peer.handle(frame):
            self._stats.frames_received += 1
            self._stats.bytes_received += len(reply)
            hook = self.on_frame
            if hook is None or not hook(reply):
                self._queue.put(reply)

    async def recv(self, timeout: float | None = None) -> bytes:
        return await self._queue.get(timeout)

    async def close(self) -> None:
        self._closed = True
        self._queue.close(LinkClosed(f"link {self.name} closed"))

    @property
    def stats(self) -> LinkStats:
        return self._stats


__all__ = ["NAME", "LocalLink"]
