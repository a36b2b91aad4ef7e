"""The coordinator: introduces itself to the peers, plans, pushes their shards and generates.

Per token it owns the embedding, the norms, the classifier and sampling (the steps of
:class:`tpfed.compute.int8_forward.Int8Transformer`); per layer and stage it broadcasts the Q8_0
activation once to every device holding part of that stage, gathers their PARTIAL vectors and
adds them to the residual in plan order (so the result does not depend on arrival order).
The activations broadcast for the sequence are kept in ``history``: that is what a replacement
device needs to rebuild a lost device's KV cache exactly (``AttentionShard.replay``). Replacing a
device mid-run is not wired in yet; a device that stops answering, goes away or loses its share
ends the run with an error that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from tpfed.compute._native import ffi, lib
from tpfed.compute.int8_forward import ActivationLog, Int8Transformer, Q8Model, Stage
from tpfed.compute.kernels import Q8Tensor
from tpfed.compute.share import DeviceShards, serialize_layer_share, share_flags
from tpfed.errors import PeerError, PeerLost, PeerRefused, PeerTimeout, PlanError
from tpfed.planning.fleet import DeviceSpec
from tpfed.planning.plan import Plan
from tpfed.planning.planner import plan as make_plan
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame, encode_payload
from tpfed.protocol.errors import ProtocolError
from tpfed.protocol.fastpath import (
    activation_frame_size,
    decode_partial,
    encode_activation,
    min_stage_bytes,
    partial_frame_size,
)
from tpfed.protocol.schema import (
    AUTH_TRAILER_SIZE,
    BATTERY_UNKNOWN,
    BROADCAST,
    COORDINATOR,
    CRC_SIZE,
    HEADER_SIZE,
    KEY_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    Flag,
    MsgType,
    PartialEncoding,
)
from tpfed.runtime.keys import ENV as KEY_ENV
from tpfed.runtime.peer_auth import PeerAuth
from tpfed.transport.base import LinkClosed
from tpfed.transport.udp import UdpLink
from tpfed.transport.udp_fleet import UdpFleet

T = TypeVar("T")
# replies kept when they come while another is awaited (they answer an earlier or later request)
_HELD_TYPES = frozenset({MsgType.ACK, MsgType.READY, MsgType.HELLO, MsgType.PROBE_REPLY})
_HELD_MAX = 64
_BOARD_CLASSES = frozenset({int(DeviceClass.ESP32), int(DeviceClass.ESP32S3),
                            int(DeviceClass.ESP32C3), int(DeviceClass.CORTEX_M_EMU)})
_HEADER = struct.Struct("<BBBBBBHHH")  # the frame header: magic, version, type, flags, src, dst, seq, session, length
_WEIGHTS_HEAD = struct.Struct("<HII32s")
_ACK_BODY = struct.Struct("<HB")
FRAME_OVERHEAD = HEADER_SIZE + AUTH_TRAILER_SIZE + CRC_SIZE  # a sealed frame's bytes beyond its payload
# payload bytes WEIGHTS and PROBE carry before their data, measured on the schema's own encoding
WEIGHTS_PREFIX = len(encode_payload(MsgType.WEIGHTS, {"shard_id": 0, "offset": 0, "total": 0,
                                                      "sha256": bytes(32), "data": b""}))
WEIGHTS_GRANULE = lib.TPFED_WEIGHTS_GRANULE
PROBE_PREFIX = len(encode_payload(MsgType.PROBE, {"nonce": 0, "t_send_us": 0, "pad": b""}))


async def all_of(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure cancels the others and is raised as itself (not as
    an exception group), so the CLI can print it as one line."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


class Link(Protocol):
    """A connection to one peer that carries whole frames."""

    name: str
    uri: str

    async def send(self, frame: bytes) -> None: ...

    async def recv(self, timeout: float | None = None) -> bytes: ...

    async def close(self) -> None: ...


@dataclass
class PeerConn:
    """A connected peer: its link, the id given to it and what it said in HELLO."""

    link: Link
    device_id: int
    hello: dict
    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0
    name: str = ""
    busy_ms: float = 0.0
    auth: PeerAuth | None = None  # the session's keys and counters, once the handshake is done
    held: list[tuple[Frame, float]] = field(default_factory=list)
    """Replies that came while another was awaited (READY before the ACK it follows, a late
    PROBE_REPLY): kept for the request they answer (:meth:`PeerLinks._expect_timed`)."""
    unreachable: bool = False  # a datagram to it came back: nothing listens there any more
    fleet: tuple | None = None  # (UdpFleet, index) when it is reached through one
    connect_s: float = 0.0  # handshake, HELLO and probe took this long

    @property
    def label(self) -> str:
        """How errors name the peer: its name and, when different, its address."""
        uri = getattr(self.link, "uri", "")
        return self.name if not uri or uri == self.name else f"{self.name} ({uri})"

    def spec(self) -> DeviceSpec:
        h = self.hello
        # the planner's coarse classes (thermal derating differs between them)
        classes = {DeviceClass.LAPTOP: "laptop", DeviceClass.PHONE: "phone",
                   DeviceClass.ESP32: "mcu", DeviceClass.ESP32S3: "mcu", DeviceClass.ESP32C3: "mcu",
                   DeviceClass.CORTEX_M_EMU: "mcu"}
        battery = h["battery_pct"] if h["battery_pct"] <= 100 else None
        temp = h["temperature_dc"] / 10 if h["temperature_dc"] != TEMPERATURE_UNKNOWN else None
        return DeviceSpec(
            name=self.name,
            memory_bytes=h["arena_kb"] * 1024,
            int8_macs=float(max(h["int8_macs"], 1)),
            latency_s=self.latency_s,
            bandwidth_Bps=max(self.bandwidth_Bps, 1.0),
            device_class=classes.get(h["device_class"], "desktop"),
            battery_pct=battery,
            temperature_c=temp,
        )


@dataclass
class GenerationStats:
    tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    wire_bytes: int = 0
    min_wire_bytes: int = 0
    per_peer_bytes: dict[str, int] = field(default_factory=dict)
    weight_bytes_pushed: int = 0
    weight_bytes_skipped: int = 0  # share bytes not pushed: the peer held them already
    recoveries: list[dict] = field(default_factory=list)
    joins: list[dict] = field(default_factory=list)  # devices planned in during the generation
    resends: int = 0  # ACTIVATIONs sent again because their PARTIAL was late

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def wire_bytes_per_token(self) -> float:
        return self.wire_bytes / self.tokens if self.tokens else 0.0

    @property
    def min_wire_bytes_per_token(self) -> float:
        return self.min_wire_bytes / self.tokens if self.tokens else 0.0


class PeerLinks:
    """The connection half of the coordinator, usable without a model: HELLO every peer and
    measure its link (``tpfed devices`` uses it alone)."""

    def __init__(self, links: Sequence[Link], *, key: bytes, deadline_s: float = 5.0,
                 session: int | None = None) -> None:
        if not links:
            raise PeerError("no peers to run on")
        if len(key) != KEY_SIZE:
            raise PeerError(f"a federation key is {KEY_SIZE} bytes, got {len(key)}")
        self.links = list(links)
        self.deadline_s = deadline_s
        self.key = key
        self.session = auth.new_session() if session is None else session
        self.peers: list[PeerConn] = []
        self.lost: list[PeerConn] = []
        self._opened: list[PeerConn] = []  # every peer a session was established with
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    @staticmethod
    async def _send(peer: PeerConn, data: bytes) -> None:
        """Send one frame to ``peer``, sealed for its session once the handshake is done."""
        if peer.auth is not None:
            data = peer.auth.seal(data)
        try:
            await peer.link.send(data)
        except LinkClosed as exc:
            raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None

    @staticmethod
    async def _recv(peer: PeerConn, timeout: float) -> bytes:
        """The next frame from ``peer``; a link that closed under us (a board reset or
        unplugged, a peer process gone) is reported with the peer's name and address."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = await peer.link.recv(max(deadline - time.monotonic(), 0.0))
            except LinkClosed as exc:
                raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None
            # after the handshake only frames sealed in the peer's session count; anything
            # else (injected, replayed, damaged) is dropped and counted, never answered
            if peer.auth is None or peer.auth.open(data):
                return data

    # -- connection ------------------------------------------------------------------------
    request_tries = 10
    """A request (HELLO, PROBE, ASSIGN, the handshake) is sent at most this many times, backing
    off from :meth:`_request_rto`; ``deadline_s`` is the ceiling over all of them."""

    def _request_rto(self, peer: PeerConn) -> float:
        """The first wait for a control request's answer: a few measured round trips (a loss
        costs milliseconds), at least 20 ms (jitter, a peer's own work), at most a quarter of
        the deadline; 50 ms before the link is measured."""
        base = 8 * peer.latency_s + 0.02 if peer.latency_s > 0 else 0.05
        return min(base, self.deadline_s / 4)

    async def _request(self, peer: PeerConn, frame: Frame, want: MsgType, what: str,
                       timeout: float | None = None,
                       match: Callable[[Frame], bool] | None = None) -> Frame:
        """Send ``frame`` and wait for its ``want`` answer, sending it again (sealed afresh, so
        the peer takes the repeat) with exponential backoff from :meth:`_request_rto`, at most
        :attr:`request_tries` times and never past ``timeout`` (the deadline). An ACK answer
        must name the request's sequence number; other replies are matched by ``match``. The
        requests sent this way are idempotent on the peer (HELLO, PROBE, ASSIGN before any
        WEIGHTS)."""
        data = encode_frame(frame)
        if want == MsgType.ACK:
            match = _acks(frame, match)
        limit = timeout or self.deadline_s
        deadline = time.monotonic() + limit
        wait = self._request_rto(peer)
        for _ in range(self.request_tries):
            await self._send(peer, data)
            left = deadline - time.monotonic()
            try:
                return await self._expect(peer, want, what, max(min(wait, left), 1e-3), match)
            except PeerTimeout:
                if time.monotonic() >= deadline:
                    break
            wait = min(2 * wait, limit / 4)
        raise PeerTimeout(f"peer {peer.label} did not answer {what} within {limit:.1f} s")

    async def _expect(self, peer: PeerConn, want: MsgType, what: str,
                      timeout: float | None = None,
                      match: Callable[[Frame], bool] | None = None) -> Frame:
        """The next ``want`` frame from ``peer`` that ``match`` accepts; an ERROR frame is
        raised as :class:`PeerRefused`, silence past the deadline as :class:`PeerTimeout`."""
        return (await self._expect_timed(peer, want, what, timeout, match))[0]

    async def _expect_timed(self, peer: PeerConn, want: MsgType, what: str,
                            timeout: float | None = None,
                            match: Callable[[Frame], bool] | None = None) -> tuple[Frame, float]:
        """:meth:`_expect`, with the ``perf_counter`` time the link handed the frame over
        (before it was decoded)."""
        for k, (held, at) in enumerate(peer.held):  # it may have come while we awaited another
            if held.type == want and (match is None or match(held)):
                del peer.held[k]
                return held, at
        deadline = time.monotonic() + (timeout or self.deadline_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"peer {peer.label} did not answer {what} "
                                  f"within {timeout or self.deadline_s:.1f} s")
            try:
                data = await self._recv(peer, left)
            except TimeoutError:
                continue
            arrived = time.perf_counter()
            try:
                reply = decode_frame(data)
            except ProtocolError:
                continue  # counted by the link; a malformed frame is dropped
            if reply.type == MsgType.ERROR:
                code = reply.payload["code"]
                name = error_name(code)
                raise PeerRefused(f"peer {peer.label} refused {what}: "
                                  f"{name}: {reply.payload['text']}", code)
            if reply.type == want and (match is None or match(reply)):
                return reply, arrived
            if reply.type in _HELD_TYPES:  # an answer to another request (or a late repeat)
                peer.held.append((reply, arrived))
                del peer.held[:-_HELD_MAX]

    async def connect(self) -> list[PeerConn]:
        """HELLO every peer (its device id is given in the HELLO's destination), then measure
        each link's latency and bandwidth with PROBE frames."""
        if len(self.links) > 254:
            raise PeerError(f"{len(self.links)} peers: the protocol addresses at most 254")
        self.peers = await all_of(self._hello(PeerConn(link=link, device_id=i + 1, hello={},
                                                       name=link.name))
                                  for i, link in enumerate(self.links))
        names = [p.name for p in self.peers]
        for i, p in enumerate(self.peers):
            if names.count(p.name) > 1:
                p.name = f"{p.name}#{i + 1}"
        # one peer at a time: concurrent probes would time each other's processing here
        for peer in self.peers:
            await self._probe(peer)
        return self.peers

    async def _hello(self, peer: PeerConn) -> PeerConn:
        """Give a board its key if it needs it, prove the key both ways, then HELLO: what the
        device is (its id is the HELLO's destination)."""
        if getattr(peer.link, "provision", False):
            await self._provision(peer)
        await self._handshake(peer)
        me = {"device_class": int(DeviceClass.DESKTOP), "name": "coordinator", "ram_kb": 0,
              "psram_kb": 0, "flash_kb": 0, "cpu_mhz": 0, "cores": 0, "features": 0,
              "int8_macs": 0, "battery_pct": BATTERY_UNKNOWN,
              "temperature_dc": TEMPERATURE_UNKNOWN, "transports": 0,
              "max_frame": 0xFFFF, "arena_kb": 0}
        reply = await self._request(peer, Frame(MsgType.HELLO, me, src=COORDINATOR,
                                                dst=peer.device_id, seq=self._next_seq(),
                                                session=self.session),
                                    MsgType.HELLO, "HELLO")
        peer.hello = dict(reply.payload)
        if not peer.name:
            peer.name = peer.hello["name"] or f"peer-{peer.device_id}"
        return peer

    async def close(self, bye: bool = True) -> None:
        """End every session with a sealed BYE (so the peers are free for the next coordinator
        at once, not after their idle timeout), then close the links."""
        for peer in self._opened:
            if bye and peer not in self.lost:  # best effort: a peer gone must not hide why
                with contextlib.suppress(OSError, ConnectionError, PeerError, ValueError):
                    await self._send(peer, encode_frame(Frame(MsgType.BYE, {"reason": 0},
                                                              dst=peer.device_id,
                                                              seq=self._next_seq(),
                                                              session=self.session)))
        for link in self.links:
            with contextlib.suppress(OSError, ConnectionError, PeerError):
                await link.close()

    async def _provision(self, peer: PeerConn, attempts: int = 8) -> None:
        """Give a freshly booted emulated board the federation key (one PROVISION frame, in
        clear on its own serial line, repeated until ACKed: bytes sent while its UART starts
        are lost)."""
        frame = encode_frame(Frame(MsgType.PROVISION, {"key": self.key}, seq=self._next_seq()))
        for _ in range(attempts):
            await self._send(peer, frame)
            try:
                await self._expect(peer, MsgType.ACK, "PROVISION", timeout=min(1.0, self.deadline_s),
                                   match=lambda f: f.payload["acked_type"] == MsgType.PROVISION)
                return
            except PeerTimeout:
                continue
        raise PeerTimeout(f"board {peer.label} did not take its federation key (PROVISION)")

    async def _handshake(self, peer: PeerConn) -> None:
        """Prove the federation key both ways with fresh nonces and derive the session key
        (DESIGN: Security): CHALLENGE -> RESPONSE (the peer's proof, checked here) -> CONFIRM
        (ours) -> the peer's sealed ACK. CHALLENGE and CONFIRM are repeated until answered
        (repeats are idempotent on the peer). A peer keeps one handshake pending: if another
        sender's CHALLENGE replaced ours, our CONFIRM goes unanswered, so the whole handshake
        starts over with fresh nonces until the deadline."""
        until = time.monotonic() + self.deadline_s
        while True:
            hs = auth.CoordinatorHandshake(self.key, peer.device_id, session_id=self.session)
            challenge = encode_frame(Frame(MsgType.AUTH, hs.challenge(), src=COORDINATOR,
                                           dst=peer.device_id, seq=self._next_seq(),
                                           session=self.session))
            reply = await self._request_raw(
                peer, challenge, MsgType.AUTH, "the key handshake", until=until,
                match=lambda f: f.payload.get("step") == auth.AuthStep.RESPONSE)
            try:
                confirm = hs.on_response(reply.payload)
            except auth.AuthError:
                raise PeerRefused(f"peer {peer.label} does not hold this federation key (check "
                                  f"--key-file or {KEY_ENV})", int(ErrorCode.BAD_STATE)) from None
            ks = auth.session_key(self.key, hs.nonce_c, hs.nonce_p, peer.device_id, self.session)
            peer.auth = PeerAuth(ks, self.session)
            confirm_frame = encode_frame(Frame(MsgType.AUTH, confirm, src=COORDINATOR,
                                               dst=peer.device_id, seq=self._next_seq(),
                                               session=self.session))
            try:
                await self._request_raw(peer, confirm_frame, MsgType.ACK, "the key handshake",
                                        until=until, tries=4,
                                        match=lambda f: f.payload["acked_type"] == MsgType.AUTH)
            except PeerRefused as exc:
                if exc.code == ErrorCode.BUSY:
                    raise PeerRefused(f"peer {peer.label} busy with another session",
                                      exc.code) from None
                raise
            except PeerTimeout:
                peer.auth = None
                if time.monotonic() >= until:
                    raise
                continue  # our pending handshake was replaced: start over
            self._opened.append(peer)
            return

    async def _request_raw(self, peer: PeerConn, data: bytes, want: MsgType, what: str,
                           match: Callable[[Frame], bool] | None = None,
                           until: float | None = None, tries: int | None = None) -> Frame:
        """Send ``data`` as it is (not sealed) and wait for a ``want`` answer, sending it again
        with backoff (at most ``tries`` times) until the deadline (or ``until``)."""
        deadline = time.monotonic() + self.deadline_s if until is None else until
        wait = self._request_rto(peer)
        for _ in range(tries or self.request_tries):
            try:
                await peer.link.send(data)
            except LinkClosed as exc:
                raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None
            left = deadline - time.monotonic()
            try:
                return await self._expect(peer, want, what, max(min(wait, left), 1e-3), match)
            except PeerTimeout:
                if time.monotonic() >= deadline:
                    break
            wait = min(2 * wait, self.deadline_s / 4)
        raise PeerTimeout(f"peer {peer.label} did not answer {what} within "
                          f"{self.deadline_s:.1f} s")

    async def _probe(self, peer: PeerConn, rounds: int = 9) -> None:
        """Latency from small probes (median one-way), bandwidth from a frame near the peer's
        maximum compared with a small one. The timer runs from the link's send call returning to
        the link handing the reply's bytes back: the coordinator's own encoding, sending and
        decoding are not the link's (:func:`tpfed.runtime.calibration.calibrate_coordinator` measures
        those)."""
        max_frame = max(peer.hello.get("max_frame", 256), 64)

        deadline = time.monotonic() + self.deadline_s  # for the whole measurement

        async def once(pad: int) -> float:
            """One round trip; a probe (or its reply) lost is sent again, afresh, with backoff
            (bounded tries), and the round trip is timed from the probe that was answered."""
            sent: dict[int, float] = {}
            wait = self._request_rto(peer)
            for _ in range(self.request_tries):
                nonce = self._next_seq()
                data = encode_frame(Frame(MsgType.PROBE, {"nonce": nonce, "pad": bytes(pad),
                                                          "t_send_us": time.monotonic_ns() // 1000},
                                          dst=peer.device_id, seq=self._next_seq()))
                await self._send(peer, data)
                sent[nonce] = time.perf_counter()
                left = deadline - time.monotonic()
                try:
                    reply, t1 = await self._expect_timed(
                        peer, MsgType.PROBE_REPLY, "PROBE", max(min(wait, left), 1e-3),
                        match=lambda f: f.payload["nonce"] in sent)
                    return t1 - sent[reply.payload["nonce"]]
                except PeerTimeout:
                    if time.monotonic() >= deadline:
                        break
                wait = min(2 * wait, self.deadline_s / 4)
            raise PeerTimeout(f"peer {peer.label} did not answer PROBE within "
                              f"{self.deadline_s:.1f} s")

        await once(0)  # the first round trip also warms caches on both sides
        small = sorted([await once(0) for _ in range(rounds)])[rounds // 2]
        big_pad = min(max_frame, 4096) - FRAME_OVERHEAD - PROBE_PREFIX
        big = sorted([await once(big_pad) for _ in range(3)])[1]
        peer.latency_s = small / 2
        extra = max(big - small, 1e-6)  # lost in the noise: at most 2 pads per microsecond
        peer.bandwidth_Bps = 2 * big_pad / extra  # the pad travels both ways


def _acks(frame: Frame, also: Callable[[Frame], bool] | None) -> Callable[[Frame], bool]:
    """Matches the ACK of ``frame`` (its sequence number and type), and ``also``."""
    seq, kind = frame.seq, int(frame.type)

    def match(f: Frame) -> bool:
        return (f.payload["acked_seq"] == seq and f.payload["acked_type"] == kind
                and (also is None or also(f)))

    return match


def error_name(code: int) -> str:
    """An ERROR frame's code as its name, or the number when it is not one of ours."""
    return ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)


def sealable(frame: bytes) -> bytearray:
    """``frame`` laid out as a sealed frame (AUTH flag, room for counter and tag before the
    CRC), for the C fleet to stamp once per peer in that peer's session."""
    body = len(frame) - CRC_SIZE
    out = bytearray(body + AUTH_TRAILER_SIZE + CRC_SIZE)
    out[:body] = memoryview(frame)[:body]
    out[3] |= int(Flag.AUTH)
    return out  # (the coordinator's frames carry its session already)


def _layers_of(dev) -> dict:
    return {layer: (tuple(s.kv_groups), tuple(s.mlp_ranges)) for layer, s in dev.layers.items()}


class Coordinator(PeerLinks, Int8Transformer):
    """Distributed int8 forward over connected peers (see the module docstring)."""

    def __init__(self, model: Q8Model, links: Sequence[Link], *, key: bytes,
                 deadline_s: float = 5.0, seq_len: int | None = None, session: int | None = None,
                 log_dir: str | None = None, chunk_bytes: int | None = None) -> None:
        Int8Transformer.__init__(self, model, DeviceShards(model, {}))
        if log_dir is not None:  # the replay log in a file there, not in memory
            self.history = ActivationLog(model.config, spill_dir=log_dir)
        PeerLinks.__init__(self, links, key=key, deadline_s=deadline_s, session=session)
        self.seq_len = min(seq_len or model.config.seq_len, model.config.seq_len)
        self.chunk_bytes = chunk_bytes
        self.plan: Plan | None = None
        self.stats = GenerationStats()
        self.weight_bytes_pushed = 0  # over the coordinator's life (stats: per generation)
        self.weight_bytes_skipped = 0  # the same, of shares the peers held already
        self.recoveries: list[dict] = []  # over the coordinator's life
        self.joins: list[dict] = []  # over the coordinator's life
        self.joining: list[PeerConn] = []  # connected, planned in at the next token boundary
        self._last_id = 0  # the last device id given to a device that joined
        self.leaving: set[str] = set()  # said they go: planned out at the next token boundary
        # per (layer, stage): the peers that hold part of it, in plan order
        self._owners: dict[tuple[int, int], list[PeerConn]] = {}
        # per (layer, stage), when every owner is a UDP peer of one socket: the C fast path
        self._fast: dict[tuple[int, int], tuple[UdpFleet, np.ndarray]] = {}
        self._sum = np.empty(model.config.dim, np.float32)
        self._rows = np.empty((0, model.config.dim), np.float32)
        self._got = np.zeros(0, np.uint32)
        self._chosen = np.zeros(0, np.int32)
        self._groups: dict[tuple[int, int], list[int]] = {}
        self._group_arrays: dict[tuple[int, int], np.ndarray] = {}

    # -- planning and weights ------------------------------------------------------------
    def make_plan(self, strategy: str = "round-robin", replicas: int = 1) -> Plan:
        specs = [p.spec() for p in self.peers]
        try:
            plan = make_plan(self.config, specs, strategy=strategy, seq_len=self.seq_len,
                             replicas=replicas)
        except PlanError as exc:
            raise PeerError(f"no plan for these peers: {exc}") from None
        self.use_plan(plan)
        return plan

    def use_plan(self, plan: Plan) -> None:
        """Take ``plan``: per stage, the devices holding part of it in plan order, grouped in
        replica sets (members hold identical shares, so any member's partial serves the set)."""
        by_name = {p.name: p for p in self.peers}
        self.plan = plan
        sets = getattr(plan, "replica_sets", None) or [[d.name] for d in plan.devices]
        devices = {d.name: d for d in plan.devices}
        self._owners = {}
        self._groups = {}
        for members in sets:
            live = [m for m in members if m in by_name]
            if not live:
                continue
            for m in live:
                by_name[m].busy_ms = devices[m].busy_ms
            for layer, share in sorted(devices[live[0]].layers.items()):
                for stage, held in ((Stage.ATTENTION, share.kv_groups), (Stage.MLP, share.mlp_ranges)):
                    if held:
                        owners = self._owners.setdefault((layer, stage), [])
                        groups = self._groups.setdefault((layer, stage), [])
                        gi = (groups[-1] + 1) if groups else 0
                        owners.extend(by_name[m] for m in live)
                        groups.extend([gi] * len(live))
        for layer in range(self.config.n_layers):
            for stage in (Stage.ATTENTION, Stage.MLP):
                if (layer, stage) not in self._owners:
                    raise PeerError(f"the plan leaves layer {layer} {stage.name} to nobody")
        self._group_arrays = {k: np.array(v, np.int32) for k, v in self._groups.items()}
        self._plan_fast_path()

    def _plan_fast_path(self) -> None:
        """Stages whose owners are all UDP peers of one socket, and whose ACTIVATION fits that
        socket's MTU, go through :class:`UdpFleet` (one C call to send, one to gather)."""
        by_endpoint: dict[int, list[PeerConn]] = {}
        local = [p for p in self.peers if hasattr(p.link, "in_process")]
        for p in self.peers:
            if isinstance(p.link, UdpLink):
                by_endpoint.setdefault(id(p.link.endpoint), []).append(p)
        if local and not by_endpoint:
            by_endpoint[0] = []  # the coordinator's own share alone: a fleet without a socket
        fleets = {}
        for key, peers in by_endpoint.items():
            ep = peers[0].link.endpoint if peers else None
            if ep is None or activation_frame_size(self.config.dim) + AUTH_TRAILER_SIZE <= ep.framer.mtu:
                members = peers + local  # the in-process peer belongs to every fleet
                fleet = fleets[key] = UdpFleet(
                    ep, [p.link for p in members],
                    [p.auth.c if p.auth is not None else None for p in members])
                fleet.set_spin(self.gather_spin_us)
                for i, p in enumerate(peers):
                    p.fleet = (fleet, i)
        self._fast = {}
        widest = 0
        dim = self.config.dim
        self._act_len = activation_frame_size(dim) + AUTH_TRAILER_SIZE
        self._part_len = partial_frame_size(dim) + AUTH_TRAILER_SIZE
        self._min_stage = min_stage_bytes(dim)
        for key, owners in self._owners.items():
            widest = max(widest, len(owners))
            links = [p.link for p in owners]
            remote = [link for link in links if isinstance(link, UdpLink)]
            if len(remote) + sum(hasattr(link, "in_process") for link in links) < len(links):
                continue  # a serial peer among the owners: the general path
            fleet = fleets.get(id(remote[0].endpoint) if remote else next(iter(fleets), None))
            if fleet is not None and fleet.covers(links):
                group_of = self._group_arrays[key]
                self._fast[key] = (fleet, fleet.indices(links), group_of, int(group_of[-1]) + 1,
                                   max(self._rto(p) for p in owners))
        self._rows = np.empty((widest, self.config.dim), np.float32)
        self._got = np.zeros(widest, np.uint32)
        self._chosen = np.full(widest, -1, np.int32)

    async def push_weights(self, progress: Callable[[str, int], None] | None = None) -> None:
        """ASSIGN every device its share, stream its layer shards in WEIGHTS chunks (each
        shard acknowledged after the peer verified its sha256) and wait for READY."""
        if self.plan is None:
            raise PeerError("push_weights before a plan")
        await all_of(self._push_device(dev, progress) for dev in self.plan.devices)

    share_memo_bytes = 256 << 20
    """Share bytes of one device kept in memory between hashing them (for ASSIGN) and pushing
    them; beyond it a share is serialized again when it is pushed."""

    async def _push_device(self, dev, progress: Callable[[str, int], None] | None = None) -> int:
        """ASSIGN one device its share of the plan, naming each layer share by its sha256; the
        peer answers (in the ACK) which it holds already (kept from an earlier assignment, run
        or session), and only the others are pushed; wait for READY. Returns the share bytes
        pushed (those skipped are counted in ``weight_bytes_skipped``)."""
        by_name = {p.name: p for p in self.peers}
        c = self.config
        need = max(activation_frame_size(c.dim), partial_frame_size(c.dim)) + AUTH_TRAILER_SIZE
        peer = by_name[dev.name]
        if peer.hello["max_frame"] < need:
            raise PeerError(f"peer {peer.label} takes frames of at most {peer.hello['max_frame']} "
                            f"bytes; this model's activations and partials need {need}")
        layers = sorted(dev.layers.items())
        blobs: dict[int, bytes] = {}
        digests: list[bytes] = []
        sizes: list[int] = []
        for layer, share in layers:
            blob = serialize_layer_share(self.model, layer, share.kv_groups, share.mlp_ranges)
            digests.append(hashlib.sha256(blob).digest())
            sizes.append(len(blob))
            if sum(map(len, blobs.values())) + len(blob) <= self.share_memo_bytes:
                blobs[layer] = blob
        entries = [{"layer": layer, "kv_groups": list(s.kv_groups),
                    "mlp_ranges": [{"start": a, "end": b} for a, b in s.mlp_ranges],
                    "sha256": digest}
                   for (layer, s), digest in zip(layers, digests, strict=True)]
        assign = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
                  "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": self.seq_len,
                  "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                  "flags": share_flags(self.model.params), "entries": entries}
        peer.held.clear()  # READY or ACKs of an earlier push are not answers to this one
        ack = await self._request(peer, Frame(MsgType.ASSIGN, assign, dst=peer.device_id,
                                              seq=self._next_seq(), session=self.session),
                                  MsgType.ACK, "ASSIGN")
        held = bytes(ack.payload.get("held", b""))  # bit i: entry i's share is held already

        def blob_of(i: int) -> bytes:
            layer, share = layers[i]
            blob = blobs.get(layer)
            return blob if blob is not None else serialize_layer_share(
                self.model, layer, share.kv_groups, share.mlp_ranges)

        max_chunk = self._max_chunk(peer)
        pushed = skipped = 0
        for i, (layer, _share) in enumerate(layers):
            if i // 8 < len(held) and (held[i // 8] >> (i % 8)) & 1:
                skipped += sizes[i]
                if progress is not None:
                    progress(peer.name, sizes[i])
                continue
            await self._push_shard(peer, layer, blob_of(i), max_chunk, progress, digest=digests[i])
            pushed += sizes[i]
        await self._await_ready(peer, layers[-1][0], blob_of(len(layers) - 1), max_chunk)
        self.stats.weight_bytes_pushed += pushed
        self.weight_bytes_pushed += pushed
        self.stats.weight_bytes_skipped += skipped
        self.weight_bytes_skipped += skipped
        return pushed

    push_window_bytes = 1 << 20
    """The most WEIGHTS bytes in flight to a desktop peer (it asks its kernel for an 8 MiB
    receive buffer; systems often grant less, and the window then shrinks on the losses)."""

    def _max_chunk(self, peer: PeerConn) -> int:
        """The WEIGHTS chunk size for ``peer``: what one frame it takes carries and, on a UDP
        link, what one datagram carries (a chunk fragmented is lost whole with any fragment),
        on the peer's 64-byte granules; ``chunk_bytes`` caps it when given."""
        room = peer.hello["max_frame"]
        mtu = getattr(getattr(getattr(peer.link, "endpoint", None), "framer", None), "mtu", None)
        if mtu:
            room = min(room, mtu)
        if self.chunk_bytes:
            room = min(room, self.chunk_bytes + FRAME_OVERHEAD + WEIGHTS_PREFIX)
        max_chunk = room - FRAME_OVERHEAD - WEIGHTS_PREFIX
        max_chunk -= max_chunk % WEIGHTS_GRANULE  # chunks start on the peer's granules
        if max_chunk <= 0:
            raise PeerError(f"peer {peer.label} takes frames of {peer.hello['max_frame']} bytes, "
                            "too small for WEIGHTS")
        return max_chunk

    def _push_window(self, peer: PeerConn, max_chunk: int) -> int:
        """Chunks in flight to ``peer`` at most: a board takes one while it stores the one
        before (its UART buffer holds about a frame); a desktop peer what its receive buffer
        holds (:attr:`push_window_bytes`) and, beyond eight chunks, no more than four of the
        link's measured bandwidth-delay products."""
        if peer.hello.get("device_class") in _BOARD_CLASSES:
            return 2
        bdp = 4 * peer.bandwidth_Bps * 2 * peer.latency_s
        return max(8, min(self.push_window_bytes, int(bdp)) // max_chunk)

    def _push_rto(self, peer: PeerConn, window: int, max_chunk: int) -> float:
        """When a chunk's ACK is late enough to send the chunk again: a few round trips plus
        the time the window ahead of it takes on the measured link, at least 20 ms."""
        drain = window * max_chunk / max(peer.bandwidth_Bps, 1e6)
        return min(8 * peer.latency_s + 2 * drain + 0.02, self.deadline_s / 4)

    def _weights_frame(self, peer: PeerConn, layer: int, blob: bytes, digest: bytes, off: int,
                       n: int, seq: int, flags: int) -> bytes:
        """One WEIGHTS chunk, sealed for ``peer``: laid out in place (header, payload, room for
        counter and tag, CRC) and stamped in C, with no intermediate copies of the data."""
        if peer.auth is None:
            return encode_frame(Frame(MsgType.WEIGHTS, {"shard_id": layer, "offset": off,
                                                        "total": len(blob), "sha256": digest,
                                                        "data": blob[off:off + n]},
                                      dst=peer.device_id, seq=seq, session=self.session,
                                      flags=flags))
        plen = WEIGHTS_PREFIX + n
        buf = bytearray(HEADER_SIZE + plen + AUTH_TRAILER_SIZE + CRC_SIZE)
        _HEADER.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, int(MsgType.WEIGHTS), flags | int(Flag.AUTH),
                          COORDINATOR, peer.device_id, seq, peer.auth.session, plen)
        _WEIGHTS_HEAD.pack_into(buf, HEADER_SIZE, layer, off, len(blob), digest)
        buf[HEADER_SIZE + WEIGHTS_PREFIX:HEADER_SIZE + plen] = memoryview(blob)[off:off + n]
        if lib.tpfed_auth_session_stamp(peer.auth.c, ffi.from_buffer(buf), len(buf)) != lib.TPFED_OK:
            raise PeerError(f"cannot seal WEIGHTS for peer {peer.label}")
        peer.auth.counts.sealed += 1
        return bytes(buf)

    async def _push_shard(self, peer: PeerConn, layer: int, blob: bytes, max_chunk: int,
                          progress: Callable[[str, int], None] | None, attempts: int = 3,
                          digest: bytes | None = None) -> None:
        """Push one layer share in WEIGHTS chunks with a sliding window and selective
        acknowledgement: every chunk asks for an ACK of its sequence number, a chunk whose ACK
        is late is sent again alone (backing off, at most :attr:`max_tries` times), and the
        window halves on such a loss and grows again as ACKs come. Once every chunk is
        acknowledged the peer holds the share and has verified its sha256 (a mismatch comes
        back as an ERROR in place of the last ACK). A share the peer refuses as damaged is
        sent again from the start, up to ``attempts`` times. ``digest``: the blob's sha256,
        when known already."""
        if digest is None:
            digest = hashlib.sha256(blob).digest()
        for attempt in range(attempts):
            try:
                await self._push_chunks(peer, layer, blob, digest, max_chunk, progress if attempt == 0 else None)
                return
            except PeerRefused as exc:
                if exc.code not in (ErrorCode.SHARD_HASH_MISMATCH, ErrorCode.BAD_PAYLOAD,
                                    ErrorCode.BAD_CRC) or attempt == attempts - 1:
                    raise
                await self._drain(peer)

    async def _push_chunks(self, peer: PeerConn, layer: int, blob: bytes, digest: bytes,
                           max_chunk: int, progress: Callable[[str, int], None] | None) -> None:
        total = len(blob)
        offsets = list(range(0, total, max_chunk)) or [0]
        n_chunks = len(offsets)
        max_window = self._push_window(peer, max_chunk)
        window = max_window
        grow = 0
        rto = self._push_rto(peer, max_window, max_chunk)
        acked = bytearray(n_chunks)
        tries = [0] * n_chunks
        due: dict[int, float] = {}  # chunk -> when to send it again, for chunks in flight
        by_seq: dict[int, int] = {}  # seq -> chunk, for every copy in flight
        next_new = 0
        left = n_chunks
        last_news = time.monotonic()
        what = f"the shard of layer {layer}"

        async def send(i: int) -> None:
            off = offsets[i]
            n = min(max_chunk, total - off)
            flags = int(Flag.ACK_REQUESTED) | (int(Flag.LAST) if off + n >= total else 0)
            seq = self._next_seq()
            by_seq[seq] = i
            frame = self._weights_frame(peer, layer, blob, digest, off, n, seq, flags)
            try:
                await peer.link.send(frame)
            except LinkClosed as exc:
                raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None
            tries[i] += 1
            due[i] = time.monotonic() + min(rto * 2 ** (tries[i] - 1), self.deadline_s / 4)
            if progress is not None and tries[i] == 1:
                progress(peer.name, n)

        while left:
            while next_new < n_chunks and len(due) < window:
                await send(next_new)
                next_new += 1
            now = time.monotonic()
            late = [i for i, t in due.items() if t <= now]
            if late:
                for i in late:
                    if tries[i] >= self.max_tries or now - last_news >= self.deadline_s:
                        raise PeerTimeout(f"peer {peer.label} did not acknowledge {what} "
                                          f"(chunk at {offsets[i]} of {total} bytes, {tries[i]} "
                                          f"tries, nothing for {now - last_news:.1f} s)")
                    await send(i)
                window = max(window // 2, min(8, max_window))  # a loss: ease off
                grow = 0
                continue
            wait = min(due.values()) - now if due else rto
            try:
                data = await self._recv(peer, max(wait, 0.0))
            except TimeoutError:
                continue
            if len(data) >= HEADER_SIZE + 3 and data[2] == MsgType.ACK:
                acked_seq, acked_type = _ACK_BODY.unpack_from(data, HEADER_SIZE)
                i = by_seq.pop(acked_seq, None) if acked_type == MsgType.WEIGHTS else None
                if i is None or acked[i]:
                    continue  # an answer to a copy already acknowledged, or to another request
                acked[i] = 1
                left -= 1
                due.pop(i, None)
                last_news = time.monotonic()
                grow += 1
                if grow >= window and window < max_window:
                    window += 1
                    grow = 0
                continue
            try:
                reply = decode_frame(data)
            except ProtocolError:
                continue
            if reply.type == MsgType.ERROR:
                code = reply.payload["code"]
                name = error_name(code)
                raise PeerRefused(f"peer {peer.label} refused {what}: {name}: "
                                  f"{reply.payload['text']}", code)
            if reply.type in _HELD_TYPES:  # READY after the share that completes the set
                peer.held.append((reply, time.perf_counter()))
                del peer.held[:-_HELD_MAX]

    async def _await_ready(self, peer: PeerConn, layer: int, blob: bytes, max_chunk: int) -> None:
        """READY, which follows the ACK of the share that completed the assignment. If it was
        lost, the last chunk of the last share is sent again (the peer answers a repeat of a
        share's end with its ACK and READY again), with backoff and bounded tries."""
        digest = hashlib.sha256(blob).digest()
        off = ((len(blob) - 1) // max_chunk) * max_chunk if blob else 0
        wait = self._request_rto(peer)
        deadline = time.monotonic() + self.deadline_s
        for _ in range(self.request_tries):
            left = deadline - time.monotonic()
            try:
                await self._expect(peer, MsgType.READY, "READY", max(min(wait, left), 1e-3))
                return
            except PeerTimeout:
                if time.monotonic() >= deadline:
                    break
            frame = self._weights_frame(peer, layer, blob, digest, off, len(blob) - off,
                                        self._next_seq(), int(Flag.ACK_REQUESTED | Flag.LAST))
            try:
                await peer.link.send(frame)
            except LinkClosed as exc:
                raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None
            wait = min(2 * wait, self.deadline_s / 4)
        raise PeerTimeout(f"peer {peer.label} did not answer READY within {self.deadline_s:.1f} s")

    async def _drain(self, peer: PeerConn, quiet_s: float = 0.1) -> None:
        """Drop what the peer still sends about an abandoned attempt (one ERROR per chunk after
        a lost one, say) until it has been quiet for ``quiet_s``."""
        while True:
            try:
                await self._recv(peer, quiet_s)
            except TimeoutError:
                return

    # -- generation ----------------------------------------------------------------------
    async def partials_remote(self, layer: int, stage: Stage, x: Q8Tensor, pos: int) -> np.ndarray:
        """The stage's summed partial: the activation goes once to every owner, the first
        partial of each replica set is taken, and the sets' partials are added in plan order
        (so the sum does not depend on who answered first)."""
        key = (layer, stage)
        seq = self._next_seq()
        fast = self._fast.get(key)
        t_start = time.monotonic()
        if fast is not None:  # the whole stage in one C call: build, seal, send, gather, sum
            fleet, idx, group_of, n_groups, rto = fast
            n = len(idx)
            rows, got, chosen = self._rows[:n], self._got[:n], self._chosen[:n_groups]
            have = fleet.stage(idx, group_of, n_groups, self.session, seq, layer, int(stage), pos,
                               x._pqs, x._pd, self.config.dim, rows, got, chosen, rto, self._sum)
            if have == n_groups:
                self.stats.wire_bytes += n * self._act_len + n_groups * self._part_len
                self.stats.min_wire_bytes += n_groups * self._min_stage
                return self._sum
            for i in np.flatnonzero(got[:n] == 0).tolist():
                if fleet.unreachable(idx[i]):
                    self._owners[key][i].unreachable = True
        owners = self._owners[key]
        group_of = self._group_arrays[key]
        n_groups = int(group_of[-1]) + 1
        n = len(owners)
        rows, got, chosen = self._rows[:n], self._got[:n], self._chosen[:n_groups]
        frame = encode_activation(layer, int(stage), pos, x.qs, x.d, dst=BROADCAST, seq=seq,
                                  session=self.session)
        if fast is None:
            got[:] = 0
            await self._gather_hooked(owners, group_of, n_groups, frame, layer, stage, pos,
                                      rows, got)
        # Sets with no partial yet (late, lost datagrams, an ERROR) go through the general
        # path, member by member: resends with backoff, errors reported, the deadline applies.
        chosen[:] = -1
        for i in range(n):
            if got[i] and chosen[group_of[i]] < 0:
                chosen[group_of[i]] = i
        for g in np.flatnonzero(chosen < 0).tolist():
            chosen[g] = await self._gather_group(owners, group_of, g, frame, layer, stage, pos,
                                                 rows, got, t_start)
        out = self._sum
        lib.tpfed_sum_rows_f32(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", rows),
                               ffi.from_buffer("int[]", chosen), n_groups, out.shape[0])
        self.stats.wire_bytes += n * (len(frame) + AUTH_TRAILER_SIZE) + int(got.sum())
        self.stats.min_wire_bytes += n_groups * self._min_stage
        return out

    async def _gather_hooked(self, owners: list[PeerConn], group_of: np.ndarray, n_groups: int,
                             frame: bytes, layer: int, stage: Stage, pos: int, rows: np.ndarray,
                             got: np.ndarray) -> None:
        """Send ``frame`` to every owner and take their partials in link hooks as they arrive
        (no queue or task switch per frame) until every set has one or the first resend is
        due."""
        done = asyncio.get_running_loop().create_future()
        served = np.zeros(n_groups, bool)
        for i, p in enumerate(owners):
            p.link.on_frame = self._collector(i, int(group_of[i]), served, rows, got, done,
                                              layer, stage, pos, p.auth)
        try:
            for p in owners:
                await self._send(p, frame)
            try:
                async with asyncio.timeout(max(self._rto(p) for p in owners)):
                    await done
            except TimeoutError:
                pass
        finally:
            for p in owners:
                p.link.on_frame = None

    async def _gather_group(self, owners: list[PeerConn], group_of: np.ndarray, g: int,
                            frame: bytes, layer: int, stage: Stage, pos: int, rows: np.ndarray,
                            got: np.ndarray, t_start: float) -> int:
        """A partial for set ``g`` from its members in turn; a member found lost while another
        remains is dropped from the fleet (a replica costs no push and no replay). Returns the
        row index of the partial taken."""
        members = [i for i in range(len(owners)) if group_of[i] == g]
        for k, i in enumerate(members):
            peer = owners[i]
            try:
                part, size = await self._gather(peer, layer, stage, pos, frame, t_start)
            except PeerLost:
                if k == len(members) - 1:
                    raise
                self._drop_replica(peer)
                continue
            rows[i] = part
            got[i] = size
            return i
        raise AssertionError("a replica set without members")

    def _drop_replica(self, peer: PeerConn) -> None:
        """``peer`` is gone but every unit it held lives on in its replica set."""
        if peer in self.peers:
            self.peers.remove(peer)
            self.lost.append(peer)
            record = {"device": peer.name, "position": -1, "seconds": 0.0, "bytes_moved": 0,
                      "replayed_frames": 0, "devices_left": len(self.peers), "replica": True}
            self.stats.recoveries.append(record)
            self.recoveries.append(record)
            if self.on_recovery is not None:
                self.on_recovery(record)
        peer.link.on_frame = None
        if self.plan is not None:
            self.use_plan(self.plan)

    def _collector(self, i: int, g: int, served: np.ndarray, rows: np.ndarray, got: np.ndarray,
                   done: asyncio.Future, layer: int, stage: Stage, pos: int,
                   peer_auth: PeerAuth | None) -> Callable[[bytes], bool]:
        """A link hook that takes this stage's PARTIAL from owner ``i`` (of set ``g``) as it
        arrives and completes ``done`` when every set has one or an owner sent an ERROR
        (queued, unopened, for the general path, which checks and reports it)."""
        session = self.session

        def hook(data: bytes) -> bool:
            kind = data[2] if len(data) > 2 else -1
            if kind != MsgType.PARTIAL:
                if kind == MsgType.ERROR and not done.done():
                    done.set_result(None)
                return False
            if peer_auth is not None and not peer_auth.open(data):
                return True  # not sealed in this peer's session: dropped (counted)
            try:
                p = decode_partial(data)
            except ProtocolError:
                return True  # malformed: dropped (the link counted the bytes)
            if (p.layer, p.stage, p.pos, p.session) != (layer, stage, pos, session):
                return True  # a stale answer to an earlier, resent activation
            if not got[i] and not served[g]:
                rows[i] = p.values if p.encoding == PartialEncoding.F32 else p.to_f32()
                got[i] = len(data)
                served[g] = True
                if served.all() and not done.done():
                    done.set_result(None)
            return True

        return hook

    max_tries = 8
    gather_spin_us = lib.TPFED_UDP_FLEET_SPIN_US
    """How long a stage's gather looks again for partials before sleeping (see udp_fleet.c)."""
    """An ACTIVATION is sent at most this many times (backing off from :meth:`_rto`); a peer
    silent through all of them is lost even before the deadline."""

    def _rto(self, peer: PeerConn) -> float:
        """When to send an ACTIVATION again if its PARTIAL has not come: a few times what the
        round trip and the device's stage should take (measured link, planned compute), so a
        lost datagram costs milliseconds; doubled on every resend, at most a quarter of the
        deadline."""
        n_stages = max(2 * self.config.n_layers, 1)
        expected = 2 * peer.latency_s + peer.busy_ms / 1000 / n_stages
        return min(max(4 * expected, 0.002), self.deadline_s / 4)

    async def _gather(self, peer: PeerConn, layer: int, stage: Stage, pos: int,
                      frame: bytes, t_start: float | None = None) -> tuple[np.ndarray, int]:
        """The PARTIAL of ``peer`` for (layer, stage, pos), the ACTIVATION ``frame`` having
        been sent at ``t_start`` (monotonic; default now). It is sent again with backoff while
        the answer is late (a datagram may be lost; recomputing is idempotent), and the peer is
        declared lost at the deadline. Returns the partial and the frame's size."""
        t0 = time.monotonic() if t_start is None else t_start
        if peer.unreachable:
            raise PeerLost(f"peer {peer.label} went away: its address answers that nothing "
                           f"listens there", peer, time.monotonic() - t0)
        t_end = t0 + self.deadline_s
        rto = self._rto(peer)
        resend_at = t0 + rto
        tries = 1
        while True:
            now = time.monotonic()
            if now >= t_end or (tries > self.max_tries and now >= resend_at):
                why = (f"within {self.deadline_s:.1f} s" if now >= t_end
                       else f"to {tries} tries in {now - t0:.2f} s")
                raise PeerLost(f"peer {peer.label} stopped answering: no PARTIAL for layer "
                               f"{layer} {stage.name} at position {pos} {why}", peer, now - t0)
            try:
                data = await self._recv(peer, max(min(t_end, resend_at) - now, 0.0))
            except TimeoutError:
                now = time.monotonic()
                if peer.fleet is not None and peer.fleet[0].unreachable(peer.fleet[1], check=True):
                    raise PeerLost(f"peer {peer.label} went away: its address answers that "
                                   f"nothing listens there", peer, now - t0) from None
                if now >= resend_at and now < t_end and tries <= self.max_tries:
                    await self._send(peer, frame)
                    tries += 1
                    self.stats.wire_bytes += len(frame)
                    self.stats.resends += 1
                    rto = min(2 * rto, self.deadline_s / 4)
                    resend_at = now + rto
                continue
            if len(data) > 2 and data[2] == MsgType.PARTIAL:
                try:
                    p = decode_partial(data)
                except ProtocolError:
                    continue
                if p.layer == layer and p.stage == stage and p.pos == pos and p.session == self.session:
                    # F32 (what desktop peers and boards send) is used in place, no copy
                    return (p.values if p.encoding == PartialEncoding.F32 else p.to_f32()), len(data)
                continue  # a stale answer to a resent activation
            try:
                reply = decode_frame(data)
            except ProtocolError:
                continue
            if reply.type == MsgType.ERROR:
                code = reply.payload["code"]
                name = error_name(code)
                text = (f"peer {peer.label} failed layer {layer} {stage.name} at position "
                        f"{pos}: {name}: {reply.payload['text']}")
                if code in (ErrorCode.BAD_STATE, ErrorCode.NOT_ASSIGNED, ErrorCode.BAD_SESSION):
                    raise PeerLost(text + " (it no longer holds its share: was it reset or "
                                   "restarted?)", peer)
                raise PeerError(text)

    async def forward_async(self, token: int, pos: int) -> np.ndarray:
        """Logits for ``token`` at ``pos``: :meth:`Int8Transformer.forward` with the partials
        computed by the peers."""
        if not 0 <= pos < self.seq_len:
            raise PeerError(f"position {pos} outside the planned context ({self.seq_len})")
        # The C fast path gathers without the event loop: let the loop run once per token so
        # other tasks (streaming, status, a second request) are served while generating.
        await asyncio.sleep(0)
        if self.joining or self.leaving:  # a token boundary: devices come and go here
            await self.membership(pos)
        stages = self.forward_stages(token, pos)
        partial = None
        try:
            while True:
                layer, stage, xq = stages.send(partial)
                while True:
                    try:
                        partial = await self.partials_remote(layer, stage, xq, pos)
                        break
                    except PeerLost as lost:
                        await self.recover(lost, layer, stage, pos)
        except StopIteration as done:
            return done.value

    async def encode_async(self, tokens, token_types=None) -> np.ndarray:
        """An encoder's (non-causal) hidden states (n, dim) for the sequence ``tokens``:
        :meth:`Int8Transformer.forward_stages` over the whole sequence, row by row. Per layer,
        every row's k/v goes first (Stage.KV: every owner of the layer's attention, replicas
        too, appends it and answers an empty PARTIAL), then each row's ATTENTION (a query over
        all the rows appended) and MLP are summed as for a decoder. A lost peer ends it."""
        if self.config.causal:
            raise PeerError(f"{self.config.arch} is a decoder: use forward_async")
        n = len(tokens)
        if not 0 < n <= self.seq_len:
            raise PeerError(f"{n} tokens; the planned context is 1..{self.seq_len}")
        await asyncio.sleep(0)
        stages = self.forward_stages(list(tokens), 0, token_types)
        partial = None
        try:
            while True:
                layer, stage, xq = stages.send(partial)
                rows = [Q8Tensor(xq.qs[r], xq.d[r]) for r in range(n)]
                if stage == Stage.ATTENTION:
                    owners = self._owners[(layer, stage)]
                    for r, x in enumerate(rows):
                        frame = encode_activation(layer, int(Stage.KV), r, x.qs, x.d, dst=BROADCAST,
                                                  seq=self._next_seq(), session=self.session)
                        for p in owners:
                            await self._send(p, frame)
                        await all_of(self._gather(p, layer, Stage.KV, r, frame) for p in owners)
                        self.stats.wire_bytes += len(owners) * len(frame)
                partial = np.empty((n, self.config.dim), np.float32)
                for r, x in enumerate(rows):
                    partial[r] = await self.partials_remote(layer, stage, x, r)
        except StopIteration as done:
            return done.value

    # -- recovery ------------------------------------------------------------------------
    async def recover(self, lost: PeerLost, layer: int, stage: Stage, pos: int) -> None:
        """A device is gone while (layer, stage) of position ``pos`` was in flight: re-plan its
        units onto the survivors (minimal movement), push the shares of every device whose
        assignment changed, rebuild their KV caches by replaying the attention activations
        logged for this sequence, and return so the stage is redone. The text is the same as
        without the loss: every split sums to the same partials. Raises the loss (with why the
        survivors cannot go on) when they cannot hold the model."""
        from tpfed.planning.planner import replan

        t0 = time.perf_counter()
        gone: PeerConn = lost.peer  # type: ignore[assignment]
        if gone not in self.peers or self.plan is None:
            raise lost
        self.peers.remove(gone)
        self.lost.append(gone)
        gone.link.on_frame = None
        with contextlib.suppress(Exception):
            await gone.link.close()
        if not self.peers:
            raise PeerError(f"{lost}; no device is left to take its share")
        old = self.plan
        try:
            new = replan(old, [p.spec() for p in self.peers])
        except PlanError as exc:
            raise PeerError(f"{lost}; the {len(self.peers)} devices left cannot hold the model: "
                            f"{exc}") from None
        changed = [d for d in new.devices
                   if d.name not in {o.name for o in old.devices}
                   or _layers_of(old.device(d.name)) != _layers_of(d)]
        self.use_plan(new)
        pushed = sum(await all_of(self._push_device(d) for d in changed))
        replayed = await self._replay(changed, layer, stage, pos)
        record = {"device": gone.name, "position": pos, "layer": layer, "stage": stage.name,
                  "seconds": round(time.perf_counter() - t0 + lost.waited_s, 4),
                  "detect_seconds": round(lost.waited_s, 4), "bytes_moved": pushed,
                  "replayed_frames": replayed, "devices_left": len(self.peers)}
        self.stats.recoveries.append(record)
        self.recoveries.append(record)
        if self.on_recovery is not None:
            self.on_recovery(record)

    async def _replay(self, devices, layer: int, stage: Stage, pos: int) -> int:
        """Rebuild the KV caches of ``devices`` (freshly assigned, so empty): every attention
        activation of this sequence goes again to each of them, position by position; the
        partials are not used. At ``pos`` itself only the layers already past their attention
        stage are replayed (the interrupted stage is redone by the caller). Returns the number
        of activations replayed."""
        by_name = {p.name: p for p in self.peers}
        count = 0

        async def one(dev) -> int:
            peer = by_name[dev.name]
            n = 0
            for lay in sorted(ln for ln, s in dev.layers.items() if s.kv_groups):
                done_here = lay < layer or (lay == layer and stage == Stage.MLP)
                end = pos + 1 if done_here else pos
                if end <= 0:
                    continue
                acts = self.history.activations(lay, Stage.ATTENTION, end)
                for p in range(end):
                    frame = encode_activation(lay, int(Stage.ATTENTION), p, acts.qs[p], acts.d[p],
                                              dst=peer.device_id, seq=self._next_seq(),
                                              session=self.session)
                    await self._send(peer, frame)
                    await self._gather(peer, lay, Stage.ATTENTION, p, frame)
                    n += 1
            return n

        for n in await all_of(one(d) for d in devices):
            count += n
        return count

    on_recovery: Callable[[dict], None] | None = None

    on_join: Callable[[dict], None] | None = None

    # -- joins ---------------------------------------------------------------------------
    def next_device_id(self) -> int:
        """A protocol address no peer of this coordinator has had (connected, joining, lost)."""
        used = [p.device_id for p in (*self.peers, *self.joining, *self.lost)]
        nxt = max(used + [len(self.links), self._last_id]) + 1
        if nxt > 254:
            raise PeerError("no device id left: the protocol addresses at most 254 peers")
        self._last_id = nxt
        return nxt

    def unique_name(self, name: str, device_id: int) -> str:
        """``name``, or ``name#id`` when a device (here, joining or lost) already has it."""
        taken = {p.name for p in (*self.peers, *self.joining, *self.lost)}
        return name if name not in taken else f"{name}#{device_id}"

    async def introduce(self, link: Link, device_id: int | None = None) -> PeerConn:
        """A device that became available: the key handshake, HELLO and the link probe, as
        :meth:`connect` does for the first peers. Touches only ``link`` (so it may run while
        tokens are generated, even on another thread's loop); :meth:`admit` then queues it."""
        t0 = time.perf_counter()
        did = self.next_device_id() if device_id is None else device_id
        peer = PeerConn(link=link, device_id=did, hello={}, name=link.name)
        await self._hello(peer)
        await self._probe(peer)
        peer.connect_s = time.perf_counter() - t0
        return peer

    def admit(self, peer: PeerConn) -> PeerConn:
        """Queue a connected peer: it is planned in at the next token boundary
        (:meth:`membership`), or at once by :meth:`join_pending`."""
        peer.name = self.unique_name(peer.name, peer.device_id)
        self.joining.append(peer)
        if peer.link not in self.links:
            self.links.append(peer.link)  # closed (after a BYE) with the others
        return peer

    async def add_peer(self, link: Link) -> PeerConn:
        """:meth:`introduce` then :meth:`admit` (on this loop)."""
        return self.admit(await self.introduce(link))

    def leave(self, name: str) -> bool:
        """Plan device ``name`` out at the next token boundary (it said it goes: a bus
        goodbye or last will), without waiting for its deadline. False if it is not here."""
        for p in list(self.joining):
            if p.name == name:
                self.joining.remove(p)
                return True
        if any(p.name == name for p in self.peers):
            self.leaving.add(name)
            return True
        return False

    async def membership(self, pos: int) -> None:
        """At the token boundary before position ``pos``: devices that said they go are
        planned out (as if lost, without waiting for them), devices connected since are
        planned in (:meth:`join_pending`)."""
        leaving, self.leaving = self.leaving, set()
        for name in sorted(leaving):
            peer = next((p for p in self.peers if p.name == name), None)
            if peer is None or self.plan is None:
                continue
            t0 = time.perf_counter()
            before = self.weight_bytes_pushed
            self.peers.remove(peer)
            self.lost.append(peer)
            peer.link.on_frame = None
            if not self.peers:
                raise PeerError(f"peer {peer.label} left; no device is left to take its share")
            try:
                replayed = (await self._rebalance(pos))[1]
            except PlanError as exc:
                raise PeerError(f"peer {peer.label} left; the {len(self.peers)} devices left "
                                f"cannot hold the model: {exc}") from None
            record = {"device": peer.name, "position": pos, "seconds": round(time.perf_counter() - t0, 4),
                      "detect_seconds": 0.0, "bytes_moved": self.weight_bytes_pushed - before,
                      "replayed_frames": replayed, "devices_left": len(self.peers), "left": True}
            self.stats.recoveries.append(record)
            self.recoveries.append(record)
            if self.on_recovery is not None:
                self.on_recovery(record)
        if self.joining:
            await self.join_pending(pos)

    async def _rebalance(self, pos: int) -> tuple[set[str], int]:
        """Re-plan the current plan over ``self.peers`` with minimal movement, push the shares
        of every device whose assignment changed and replay their KV caches (positions
        ``< pos``). A device lost on the way (silent, refusing its share) is planned out and
        the re-plan made again from there. Returns the devices rebuilt and the activations
        replayed; :class:`PlanError` when the first re-plan finds no plan (nothing changed)."""
        from tpfed.planning.planner import replan

        assert self.plan is not None
        base = self.plan
        dirty: set[str] = set()  # devices whose shares and caches must be rebuilt
        replayed = 0
        while True:
            try:
                new = replan(base, [p.spec() for p in self.peers])
            except PlanError as exc:
                if not dirty and base is self.plan:
                    raise
                raise PeerError(f"no plan after a loss: {exc}") from None
            old_devs = {d.name: d for d in base.devices}
            dirty |= {d.name for d in new.devices
                      if d.name not in old_devs or _layers_of(old_devs[d.name]) != _layers_of(d)}
            dirty &= {d.name for d in new.devices}
            self.use_plan(new)
            changed = [d for d in new.devices if d.name in dirty]
            try:
                await all_of(self._rebuild_push(d) for d in changed)
                replayed += await self._replay(changed, 0, Stage.ATTENTION, pos)
                return dirty, replayed
            except PeerLost as lost:  # gone while being planned in (or a holder it relieved)
                gone = lost.peer
                if gone not in self.peers:
                    raise
                self._forget(gone, lost, pos)
                if not self.peers:
                    raise PeerError(f"{lost}; no device is left to take its share") from None
                base = self.plan

    async def join_pending(self, pos: int | None = None) -> list[dict]:
        """Plan the queued devices in with minimal movement (:func:`planning.planner.replan`:
        a newcomer takes units only where that shortens the token, or fills a replica set
        short of members), push the shares of every device whose assignment changed and
        rebuild their KV caches by replaying the attention inputs of positions ``< pos``
        (default: every position the log holds). Call it between tokens. A device lost on
        the way is planned out again like any loss. Returns the join records."""
        joining, self.joining = self.joining, []
        if not joining:
            return []
        self.peers.extend(joining)
        if self.plan is None:  # not planned yet: they are simply more peers
            return []
        pos = self.history.length if pos is None else pos
        t0 = time.perf_counter()
        before = self.weight_bytes_pushed
        try:
            dirty, replayed = await self._rebalance(pos)
        except PlanError as exc:
            for p in joining:  # the fleet goes on as it was; the newcomers stay out
                self.peers.remove(p)
                self.lost.append(p)
                record = {"device": p.name, "position": pos, "seconds": 0.0, "bytes_moved": 0,
                          "error": f"not planned in: {exc}"}
                self.joins.append(record)
                self.stats.joins.append(record)
            return []
        planned = {d.name for d in self.plan.devices}
        records = []
        for p in joining:
            if p not in self.peers:
                continue
            share = self.plan.device(p.name) if p.name in planned else None
            record = {"device": p.name, "position": pos,
                      "seconds": round(time.perf_counter() - t0, 4),
                      "connect_seconds": round(p.connect_s, 4),
                      "bytes_moved": self.weight_bytes_pushed - before,
                      "kv_groups": share.kv_units if share else 0,
                      "mlp_columns": share.mlp_columns if share else 0,
                      "devices_changed": sorted(dirty), "replayed_frames": replayed,
                      "devices": len(self.peers)}
            if share is None:
                record["why_not"] = dict(self.plan.excluded).get(p.name, "the planner gave it no units")
            records.append(record)
            self.joins.append(record)
            self.stats.joins.append(record)
            if self.on_join is not None:
                self.on_join(record)
        return records

    async def _rebuild_push(self, dev) -> int:
        """:meth:`_push_device`, a device that does not take its share (silent, or refusing
        it) being reported as lost, so the caller plans it out like any loss."""
        try:
            return await self._push_device(dev)
        except (PeerTimeout, PeerRefused) as exc:
            peer = next((p for p in self.peers if p.name == dev.name), None)
            if peer is None:
                raise
            raise PeerLost(str(exc), peer) from None

    def _forget(self, gone: PeerConn, lost: PeerLost, pos: int) -> None:
        """``gone`` is lost while devices were being planned in or out: drop it (the caller
        re-plans) and record the loss."""
        self.peers.remove(gone)
        self.lost.append(gone)
        gone.link.on_frame = None
        record = {"device": gone.name, "position": pos, "seconds": round(lost.waited_s, 4),
                  "detect_seconds": round(lost.waited_s, 4), "bytes_moved": 0,
                  "replayed_frames": 0, "devices_left": len(self.peers), "during_rebalance": True}
        self.stats.recoveries.append(record)
        self.recoveries.append(record)
        if self.on_recovery is not None:
            self.on_recovery(record)
