"""Bad links for the tests: a lossy UDP proxy and a bit-flipping TCP proxy.

Both run in a thread of their own (so a test may drive the coordinator with ``asyncio.run`` or a
``tpfed`` subprocess alike), are seeded (the same seed makes the same decisions for the same
traffic) and count what they did.

``LossyUdpProxy(target)``: a UDP address that forwards to ``target`` and back to whoever last
sent to it, dropping, duplicating, reordering and delaying datagrams with the probabilities of
its :class:`Impairment` (one per direction)::

    with LossyUdpProxy(("127.0.0.1", 7000), up=Impairment(loss=0.1), seed=1) as proxy:
        ... udp://127.0.0.1:{proxy.port} ...

``BitFlipTcpProxy(target)``: a TCP listener that forwards byte streams to ``target`` (QEMU's
serial chardev) and back, flipping one random bit of a byte with the given per-byte probability.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field

Addr = tuple[str, int]


@dataclass(frozen=True)
class Impairment:
    """What happens to the datagrams of one direction. ``jitter_s``: every datagram is delayed
    uniformly in [jitter/2, 3·jitter/2] (so 2 ms means 2 ± 1 ms); ``reorder``: the probability
    that one is held back a further ``reorder_delay_s`` (uniform up to it), so later ones
    overtake it; ``duplicate``: the probability that a second copy is sent (with its own
    delay); ``loss``: the probability that it is dropped."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    jitter_s: float = 0.0
    reorder_delay_s: float = 0.006

    @property
    def clean(self) -> bool:
        return not (self.loss or self.duplicate or self.reorder or self.jitter_s)


@dataclass
class DirectionCounts:
    datagrams: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    sent: int = 0


@dataclass
class ProxyCounts:
    up: DirectionCounts = field(default_factory=DirectionCounts)  # client -> target
    down: DirectionCounts = field(default_factory=DirectionCounts)  # target -> client


class LossyUdpProxy:
    """A seeded lossy UDP forwarder between one client and ``target`` (see the module)."""

    def __init__(self, target: Addr, *, up: Impairment | None = None,
                 down: Impairment | None = None, seed: int = 0, host: str = "127.0.0.1",
                 capture: bool = False) -> None:
        self.target = target
        self.up = up or Impairment()
        self.down = down if down is not None else self.up
        self.counts = ProxyCounts()
        self.captured: list[tuple[str, bytes]] = []
        """With ``capture``: every datagram as it arrived, ("up" | "down", bytes)."""
        self._capture = capture
        self._rng = random.Random(seed)
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind((host, 0))
        self._back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._back.bind((host, 0))
        for s in (self._front, self._back):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.host, self.port = self._front.getsockname()[:2]
        self.client: Addr | None = None
        self._queue: list[tuple[float, int, socket.socket, bytes, Addr]] = []
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lossy-udp-{self.port}",
                                        daemon=True)

    @property
    def uri(self) -> str:
        return f"udp://{self.host}:{self.port}"

    def start(self) -> LossyUdpProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._front.close()
        self._back.close()

    def __enter__(self) -> LossyUdpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _schedule(self, data: bytes, sock: socket.socket, to: Addr, imp: Impairment,
                  counts: DirectionCounts) -> None:
        counts.datagrams += 1
        rng = self._rng
        if imp.loss and rng.random() < imp.loss:
            counts.dropped += 1
            return
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            counts.duplicated += 1
        now = time.monotonic()
        for _ in range(copies):
            delay = imp.jitter_s * rng.uniform(0.5, 1.5) if imp.jitter_s else 0.0
            if imp.reorder and rng.random() < imp.reorder:
                delay += rng.uniform(0.0, imp.reorder_delay_s)
                counts.reordered += 1
            self._n += 1
            heapq.heappush(self._queue, (now + delay, self._n, sock, data, to))

    def _run(self) -> None:
        socks = [self._front, self._back]
        while not self._stop.is_set():
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, sock, data, to = heapq.heappop(self._queue)
                with contextlib.suppress(OSError):
                    sock.sendto(data, to)
                    (self.counts.up if sock is self._back else self.counts.down).sent += 1
            timeout = min(self._queue[0][0] - now, 0.05) if self._queue else 0.05
            try:
                ready, _, _ = select.select(socks, [], [], max(timeout, 0.0))
            except (OSError, ValueError):
                return
            for s in ready:
                for _ in range(64):  # drain what is there without blocking
                    try:
                        data, addr = s.recvfrom(65536, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if s is self._front:
                        self.client = (addr[0], addr[1])
                        if self._capture:
                            self.captured.append(("up", data))
                        self._schedule(data, self._back, self.target, self.up, self.counts.up)
                    elif self.client is not None:
                        if self._capture:
                            self.captured.append(("down", data))
                        self._schedule(data, self._front, self.client, self.down,
                                       self.counts.down)


def udp_addr(uri: str) -> Addr:
    """'udp://host:port' -> (host, port)."""
    host, _, port = uri.removeprefix("udp://").rpartition(":")
    return host.strip("[]"), int(port)


class BitFlipTcpProxy:
    """A TCP listener forwarding one connection at a time to ``target`` (and back), flipping a
    random bit in each byte with probability ``rate`` per direction (``up``: towards the target,
    ``down``: back to the client). ``flipped`` counts the damaged bytes per direction."""

    def __init__(self, target: Addr, *, rate: float = 1e-3, up: bool = True, down: bool = True,
                 seed: int = 0, host: str = "127.0.0.1") -> None:
        self.target = target
        self.rate = rate
        self.directions = {"up": up, "down": down}
        self.flipped = {"up": 0, "down": 0}
        self.bytes = {"up": 0, "down": 0}
        self._rng = random.Random(seed)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(4)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bitflip-tcp-{self.port}",
                                        daemon=True)

    @property
    def url(self) -> str:
        """What pyserial opens (``serial_for_url``)."""
        return f"socket://{self.host}:{self.port}"

    def start(self) -> BitFlipTcpProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> BitFlipTcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _damage(self, data: bytes, way: str) -> bytes:
        self.bytes[way] += len(data)
        if not self.directions[way] or not self.rate:
            return data
        out = bytearray(data)
        rng = self._rng
        # the positions of damaged bytes: geometric gaps (one draw per flip, not per byte)
        i = -1
        while True:
            gap = int(_geometric(rng, self.rate))
            i += gap + 1
            if i >= len(out):
                break
            out[i] ^= 1 << rng.randrange(8)
            self.flipped[way] += 1
        return bytes(out)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._pump(client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pairs = {client: (upstream, "up"), upstream: (client, "down")}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(pairs), [], [], 0.05)
                for s in ready:
                    other, way = pairs[s]
                    data = s.recv(65536)
                    if not data:
                        return
                    other.sendall(self._damage(data, way))
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


def _geometric(rng: random.Random, p: float) -> float:
    """Failures before the first success of Bernoulli(p) trials."""
    import math

    if p >= 1.0:
        return 0
    return math.floor(math.log(1.0 - rng.random()) / math.log(1.0 - p))


__all__ = ["BitFlipTcpProxy", "DirectionCounts", "Impairment", "LossyUdpProxy", "ProxyCounts",
           "udp_addr"]
