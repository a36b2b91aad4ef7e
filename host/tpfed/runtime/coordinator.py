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
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from tpfed.compute._native import ffi, lib
from tpfed.compute.int8_forward import Int8Transformer, Q8Model, Stage
from tpfed.compute.kernels import Q8Tensor
from tpfed.compute.share import DeviceShards, serialize_layer_share
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
    recoveries: list[dict] = field(default_factory=list)
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
    async def _request(self, peer: PeerConn, frame: Frame, want: MsgType, what: str,
                       timeout: float | None = None, retry_s: float | None = None) -> Frame:
        """Send ``frame`` and wait for a ``want`` answer; with ``retry_s`` the frame is sent
        again at that interval until the deadline (for requests that are safe to repeat)."""
        data = encode_frame(frame)
        await self._send(peer, data)
        if retry_s is None:
            return await self._expect(peer, want, what, timeout)
        deadline = time.monotonic() + (timeout or self.deadline_s)
        while True:
            left = deadline - time.monotonic()
            try:
                return await self._expect(peer, want, what, max(min(retry_s, left), 1e-3))
            except PeerTimeout:
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"peer {peer.label} did not answer {what} within "
                                      f"{timeout or self.deadline_s:.1f} s") from None
            await self._send(peer, data)

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
                name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
                raise PeerRefused(f"peer {peer.label} refused {what}: "
                                  f"{name}: {reply.payload['text']}", code)
            if reply.type == want and (match is None or match(reply)):
                return reply, arrived

    async def connect(self) -> list[PeerConn]:
        """HELLO every peer (its device id is given in the HELLO's destination), then measure
        each link's latency and bandwidth with PROBE frames."""
        async def hello(i: int, link: Link) -> PeerConn:
            peer = PeerConn(link=link, device_id=i + 1, hello={}, name=link.name)
            if getattr(link, "provision", False):
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
                                        MsgType.HELLO, "HELLO", retry_s=0.5)
            peer.hello = dict(reply.payload)
            if not peer.name:
                peer.name = peer.hello["name"] or f"peer-{peer.device_id}"
            return peer

        if len(self.links) > 254:
            raise PeerError(f"{len(self.links)} peers: the protocol addresses at most 254")
        self.peers = await all_of(hello(i, link) for i, link in enumerate(self.links))
        names = [p.name for p in self.peers]
        for i, p in enumerate(self.peers):
            if names.count(p.name) > 1:
                p.name = f"{p.name}#{i + 1}"
        # one peer at a time: concurrent probes would time each other's processing here
        for peer in self.peers:
            await self._probe(peer)
        return self.peers

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
        (repeats are idempotent on the peer)."""
        hs = auth.CoordinatorHandshake(self.key, peer.device_id, session_id=self.session)
        challenge = encode_frame(Frame(MsgType.AUTH, hs.challenge(), src=COORDINATOR,
                                       dst=peer.device_id, seq=self._next_seq(),
                                       session=self.session))
        reply = await self._request_raw(peer, challenge, MsgType.AUTH, "the key handshake",
                                        match=lambda f: f.payload.get("step") == auth.AuthStep.RESPONSE)
        try:
            confirm = hs.on_response(reply.payload)
        except auth.AuthError:
            raise PeerRefused(f"peer {peer.label} does not hold this federation key (check "
                              f"--key-file or {KEY_ENV})", int(ErrorCode.BAD_STATE)) from None
        ks = auth.session_key(self.key, hs.nonce_c, hs.nonce_p, peer.device_id, self.session)
        peer.auth = PeerAuth(ks, self.session)
        self._opened.append(peer)
        confirm_frame = encode_frame(Frame(MsgType.AUTH, confirm, src=COORDINATOR,
                                           dst=peer.device_id, seq=self._next_seq(),
                                           session=self.session))
        try:
            await self._request_raw(peer, confirm_frame, MsgType.ACK, "the key handshake",
                                    match=lambda f: f.payload["acked_type"] == MsgType.AUTH)
        except PeerRefused as exc:
            if exc.code == ErrorCode.BUSY:
                raise PeerRefused(f"peer {peer.label} busy with another session", exc.code) from None
            raise

    async def _request_raw(self, peer: PeerConn, data: bytes, want: MsgType, what: str,
                           match: Callable[[Frame], bool] | None = None) -> Frame:
        """Send ``data`` as it is (not sealed) and wait for a ``want`` answer, sending it again
        with backoff until the deadline."""
        deadline = time.monotonic() + self.deadline_s
        wait = 0.05
        while True:
            try:
                await peer.link.send(data)
            except LinkClosed as exc:
                raise PeerLost(f"peer {peer.label} went away: {exc}", peer) from None
            left = deadline - time.monotonic()
            try:
                return await self._expect(peer, want, what, max(min(wait, left), 1e-3), match)
            except PeerTimeout:
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"peer {peer.label} did not answer {what} within "
                                      f"{self.deadline_s:.1f} s") from None
                wait = min(2 * wait, 0.5)

    async def _probe(self, peer: PeerConn, rounds: int = 9) -> None:
        """Latency from small probes (median one-way), bandwidth from a frame near the peer's
        maximum compared with a small one. The timer runs from the link's send call returning to
        the link handing the reply's bytes back: the coordinator's own encoding, sending and
        decoding are not the link's (:func:`tpfed.runtime.calibration.calibrate_coordinator` measures
        those)."""
        max_frame = max(peer.hello.get("max_frame", 256), 64)

        async def once(pad: int) -> float:
            nonce = self._next_seq()
            data = encode_frame(Frame(MsgType.PROBE, {"nonce": nonce, "pad": bytes(pad),
                                                      "t_send_us": time.monotonic_ns() // 1000},
                                      dst=peer.device_id, seq=self._next_seq()))
            await self._send(peer, data)
            t0 = time.perf_counter()
            _, t1 = await self._expect_timed(peer, MsgType.PROBE_REPLY, "PROBE",
                                             match=lambda f: f.payload["nonce"] == nonce)
            return t1 - t0

        await once(0)  # the first round trip also warms caches on both sides
        small = sorted([await once(0) for _ in range(rounds)])[rounds // 2]
        big_pad = min(max_frame, 4096) - FRAME_OVERHEAD - PROBE_PREFIX
        big = sorted([await once(big_pad) for _ in range(3)])[1]
        peer.latency_s = small / 2
        extra = max(big - small, 1e-6)  # lost in the noise: at most 2 pads per microsecond
        peer.bandwidth_Bps = 2 * big_pad / extra  # the pad travels both ways


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
                 chunk_bytes: int = 8192) -> None:
        Int8Transformer.__init__(self, model, DeviceShards(model, {}))
        PeerLinks.__init__(self, links, key=key, deadline_s=deadline_s, session=session)
        self.seq_len = min(seq_len or model.config.seq_len, model.config.seq_len)
        self.chunk_bytes = chunk_bytes
        self.plan: Plan | None = None
        self.stats = GenerationStats()
        self.weight_bytes_pushed = 0  # over the coordinator's life (stats: per generation)
        self.recoveries: list[dict] = []  # over the coordinator's life
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
        for p in self.peers:
            if isinstance(p.link, UdpLink):
                by_endpoint.setdefault(id(p.link.endpoint), []).append(p)
        fleets = {}
        for peers in by_endpoint.values():
            ep = peers[0].link.endpoint
            if activation_frame_size(self.config.dim) + AUTH_TRAILER_SIZE <= ep.framer.mtu:
                fleets[id(ep)] = UdpFleet(ep, [p.link for p in peers],
                                          [p.auth.c if p.auth is not None else None for p in peers])
        self._fast = {}
        widest = 0
        for key, owners in self._owners.items():
            widest = max(widest, len(owners))
            links = [p.link for p in owners]
            if not all(isinstance(link, UdpLink) for link in links):
                continue
            fleet = fleets.get(id(links[0].endpoint))
            if fleet is not None and fleet.covers(links):
                self._fast[key] = (fleet, fleet.indices(links))
        self._rows = np.empty((widest, self.config.dim), np.float32)
        self._got = np.zeros(widest, np.uint32)
        self._chosen = np.full(widest, -1, np.int32)

    async def push_weights(self, progress: Callable[[str, int], None] | None = None) -> None:
        """ASSIGN every device its share, stream its layer shards in WEIGHTS chunks (each
        shard acknowledged after the peer verified its sha256) and wait for READY."""
        if self.plan is None:
            raise PeerError("push_weights before a plan")
        await all_of(self._push_device(dev, progress) for dev in self.plan.devices)

    async def _push_device(self, dev, progress: Callable[[str, int], None] | None = None) -> int:
        """ASSIGN one device its share of the plan, push its layer shares, wait for READY.
        Returns the share bytes pushed."""
        by_name = {p.name: p for p in self.peers}
        c = self.config
        need = max(activation_frame_size(c.dim), partial_frame_size(c.dim)) + AUTH_TRAILER_SIZE
        peer = by_name[dev.name]
        if peer.hello["max_frame"] < need:
            raise PeerError(f"peer {peer.label} takes frames of at most {peer.hello['max_frame']} "
                            f"bytes; this model's activations and partials need {need}")
        entries = [{"layer": layer, "kv_groups": list(s.kv_groups),
                    "mlp_ranges": [{"start": a, "end": b} for a, b in s.mlp_ranges]}
                   for layer, s in sorted(dev.layers.items())]
        assign = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
                  "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": self.seq_len,
                  "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "entries": entries}
        await self._request(peer, Frame(MsgType.ASSIGN, assign, dst=peer.device_id,
                                        seq=self._next_seq(), session=self.session),
                            MsgType.ACK, "ASSIGN")
        max_chunk = min(self.chunk_bytes, peer.hello["max_frame"] - FRAME_OVERHEAD - WEIGHTS_PREFIX)
        max_chunk -= max_chunk % WEIGHTS_GRANULE  # chunks start on the peer's granules
        if max_chunk <= 0:
            raise PeerError(f"peer {peer.label} takes frames of {peer.hello['max_frame']} bytes, "
                            "too small for WEIGHTS")
        layers = sorted(dev.layers.items())
        pushed = 0
        for i, (layer, share) in enumerate(layers):
            blob = serialize_layer_share(self.model, layer, share.kv_groups, share.mlp_ranges)
            await self._push_shard(peer, layer, blob, max_chunk, progress)
            pushed += len(blob)
            if i == len(layers) - 1:
                await self._expect(peer, MsgType.READY, "READY")
        self.stats.weight_bytes_pushed += pushed
        self.weight_bytes_pushed += pushed
        return pushed

    async def _push_shard(self, peer: PeerConn, layer: int, blob: bytes, max_chunk: int,
                          progress: Callable[[str, int], None] | None, attempts: int = 3) -> None:
        """Stream one layer share in WEIGHTS chunks until the peer acknowledges it. A share
        damaged on the way (the peer reports a hash mismatch or a missing chunk) or not
        acknowledged in time is sent again from the start, up to ``attempts`` times."""
        digest = hashlib.sha256(blob).digest()
        for attempt in range(attempts):
            for off in range(0, len(blob), max_chunk):
                last = off + max_chunk >= len(blob)
                frame = Frame(MsgType.WEIGHTS, {"shard_id": layer, "offset": off,
                                                "total": len(blob), "sha256": digest,
                                                "data": blob[off:off + max_chunk]},
                              dst=peer.device_id, seq=self._next_seq(), session=self.session,
                              flags=int(Flag.LAST | Flag.ACK_REQUESTED) if last else 0)
                await self._send(peer, encode_frame(frame))
                if progress is not None:
                    progress(peer.name, min(max_chunk, len(blob) - off))
            try:
                await self._expect(peer, MsgType.ACK, f"the shard of layer {layer}",
                                   match=lambda f: f.payload["acked_type"] == MsgType.WEIGHTS)
                return
            except (PeerTimeout, PeerRefused) as exc:
                retryable = isinstance(exc, PeerTimeout) or exc.code in (
                    ErrorCode.SHARD_HASH_MISMATCH, ErrorCode.BAD_PAYLOAD, ErrorCode.BAD_CRC)
                if not retryable or attempt == attempts - 1:
                    raise
                await self._drain(peer)

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
        owners = self._owners[key]
        group_of = self._group_arrays[key]
        n_groups = int(group_of[-1]) + 1
        seq = self._next_seq()
        frame = encode_activation(layer, int(stage), pos, x.qs, x.d, dst=BROADCAST, seq=seq,
                                  session=self.session)
        n = len(owners)
        rows, got = self._rows[:n], self._got[:n]
        got[:] = 0
        t_start = time.monotonic()
        fast = self._fast.get(key)
        if fast is not None:  # one sendmmsg, one gather in C
            fleet, idx = fast
            fleet.send_all(sealable(frame), idx)
            fleet.gather(idx, group_of, n_groups, self.session, seq, layer, int(stage), pos,
                         rows, got, max(self._rto(p) for p in owners))
        else:
            await self._gather_hooked(owners, group_of, n_groups, frame, layer, stage, pos,
                                      rows, got)
        # Sets with no partial yet (late, lost datagrams, an ERROR) go through the general
        # path, member by member: resends with backoff, errors reported, the deadline applies.
        chosen = self._chosen[:n_groups]
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
        self.stats.wire_bytes += n * len(frame) + int(got.sum())
        self.stats.min_wire_bytes += n_groups * min_stage_bytes(self.config.dim)
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
                name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
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

