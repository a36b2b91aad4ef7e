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
from tpfed.errors import PeerError, PeerRefused, PeerTimeout
from tpfed.planning.fleet import DeviceSpec
from tpfed.planning.plan import Plan
from tpfed.planning.planner import plan as make_plan
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
    BATTERY_UNKNOWN,
    BROADCAST,
    COORDINATOR,
    CRC_SIZE,
    HEADER_SIZE,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    Flag,
    MsgType,
    PartialEncoding,
)
from tpfed.transport.base import LinkClosed
from tpfed.transport.udp import UdpLink
from tpfed.transport.udp_fleet import UdpFleet

T = TypeVar("T")
FRAME_OVERHEAD = HEADER_SIZE + CRC_SIZE
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

    def __init__(self, links: Sequence[Link], *, deadline_s: float = 5.0, session: int = 1) -> None:
        if not links:
            raise PeerError("no peers to run on")
        self.links = list(links)
        self.deadline_s = deadline_s
        self.session = session
        self.peers: list[PeerConn] = []
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    @staticmethod
    async def _send(peer: PeerConn, data: bytes) -> None:
        try:
            await peer.link.send(data)
        except LinkClosed as exc:
            raise PeerError(f"peer {peer.label} went away: {exc}") from None

    @staticmethod
    async def _recv(peer: PeerConn, timeout: float) -> bytes:
        """The next frame from ``peer``; a link that closed under us (a board reset or
        unplugged, a peer process gone) is reported with the peer's name and address."""
        try:
            return await peer.link.recv(timeout)
        except LinkClosed as exc:
            raise PeerError(f"peer {peer.label} went away: {exc}") from None

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
            me = {"device_class": int(DeviceClass.DESKTOP), "name": "coordinator", "ram_kb": 0,
                  "psram_kb": 0, "flash_kb": 0, "cpu_mhz": 0, "cores": 0, "features": 0,
                  "int8_macs": 0, "battery_pct": BATTERY_UNKNOWN,
                  "temperature_dc": TEMPERATURE_UNKNOWN, "transports": 0,
                  "max_frame": 0xFFFF, "arena_kb": 0}
            reply = await self._request(peer, Frame(MsgType.HELLO, me, src=COORDINATOR,
                                                    dst=peer.device_id, seq=self._next_seq()),
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


class Coordinator(PeerLinks, Int8Transformer):
    """Distributed int8 forward over connected peers (see the module docstring)."""

    def __init__(self, model: Q8Model, links: Sequence[Link], *, deadline_s: float = 5.0,
                 seq_len: int | None = None, session: int = 1,
                 chunk_bytes: int = 8192) -> None:
        Int8Transformer.__init__(self, model, DeviceShards(model, {}))
        PeerLinks.__init__(self, links, deadline_s=deadline_s, session=session)
        self.seq_len = min(seq_len or model.config.seq_len, model.config.seq_len)
        self.chunk_bytes = chunk_bytes
        self.plan: Plan | None = None
        self.stats = GenerationStats()
        # per (layer, stage): the peers that hold part of it, in plan order
        self._owners: dict[tuple[int, int], list[PeerConn]] = {}
        # per (layer, stage), when every owner is a UDP peer of one socket: the C fast path
        self._fast: dict[tuple[int, int], tuple[UdpFleet, np.ndarray]] = {}
        self._sum = np.empty(model.config.dim, np.float32)
        self._rows = np.empty((0, model.config.dim), np.float32)
        self._got = np.zeros(0, np.uint32)

    # -- planning and weights ------------------------------------------------------------
    def make_plan(self, strategy: str = "round-robin") -> Plan:
        specs = [p.spec() for p in self.peers]
        plan = make_plan(self.config, specs, strategy=strategy, seq_len=self.seq_len)
        self.use_plan(plan)
        return plan

    def use_plan(self, plan: Plan) -> None:
        by_name = {p.name: p for p in self.peers}
        self.plan = plan
        self._owners = {}
        for dev in plan.devices:
            peer = by_name[dev.name]
            peer.busy_ms = dev.busy_ms
            for layer, share in sorted(dev.layers.items()):
                if share.kv_groups:
                    self._owners.setdefault((layer, Stage.ATTENTION), []).append(peer)
                if share.mlp_ranges:
                    self._owners.setdefault((layer, Stage.MLP), []).append(peer)
        for layer in range(self.config.n_layers):
            for stage in (Stage.ATTENTION, Stage.MLP):
                if (layer, stage) not in self._owners:
                    raise PeerError(f"the plan leaves layer {layer} {stage.name} to nobody")
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
            if activation_frame_size(self.config.dim) <= ep.framer.mtu:
                fleets[id(ep)] = UdpFleet(ep, [p.link for p in peers])
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

    async def push_weights(self, progress: Callable[[str, int], None] | None = None) -> None:
        """ASSIGN every device its share, stream its layer shards in WEIGHTS chunks (each
        shard acknowledged after the peer verified its sha256) and wait for READY."""
        if self.plan is None:
            raise PeerError("push_weights before a plan")
        by_name = {p.name: p for p in self.peers}
        c = self.config

        need = max(activation_frame_size(c.dim), partial_frame_size(c.dim))

        async def push(dev) -> None:
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
            for i, (layer, share) in enumerate(layers):
                blob = serialize_layer_share(self.model, layer, share.kv_groups, share.mlp_ranges)
                await self._push_shard(peer, layer, blob, max_chunk, progress)
                if i == len(layers) - 1:
                    await self._expect(peer, MsgType.READY, "READY")

        await all_of(push(dev) for dev in self.plan.devices)

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
        owners = self._owners[(layer, stage)]
        seq = self._next_seq()
        frame = encode_activation(layer, int(stage), pos, x.qs, x.d, dst=BROADCAST, seq=seq,
                                  session=self.session)
        fast = self._fast.get((layer, stage))
        if fast is not None:
            return await self._partials_fleet(fast, owners, frame, seq, layer, stage, pos)
        n = len(owners)
        got: list[tuple[np.ndarray, int] | None] = [None] * n
        done = asyncio.get_running_loop().create_future()
        for i, p in enumerate(owners):
            p.link.on_frame = self._collector(i, got, done, layer, stage, pos)
        try:
            for p in owners:
                await self._send(p, frame)
            try:
                async with asyncio.timeout(self.deadline_s / 4):
                    await done
            except TimeoutError:
                pass
        finally:
            for p in owners:
                p.link.on_frame = None
        # Whoever did not answer in time (or answered with an ERROR) goes through the general
        # path: the activation is sent again, errors are reported, the deadline applies.
        out = self._sum
        received = 0
        for i, p in enumerate(owners):
            part, size = got[i] or await self._gather(p, layer, stage, pos, frame)
            # summed in plan order, so the sum does not depend on who answered first
            if i == 0:
                out[:] = part
            else:
                out += part
            received += size
        n = len(owners)
        self.stats.wire_bytes += n * len(frame) + received
        self.stats.min_wire_bytes += n * min_stage_bytes(self.config.dim)
        return out

    async def _partials_fleet(self, fast: tuple[UdpFleet, np.ndarray], owners: list[PeerConn],
                              frame: bytes, seq: int, layer: int, stage: Stage,
                              pos: int) -> np.ndarray:
        """The stage through C: one ``sendmmsg``, one blocking gather; owners that did not
        answer in time (or answered otherwise) go through :meth:`_gather`, which resends,
        reports errors and applies the deadline."""
        fleet, idx = fast
        n = len(owners)
        rows, got = self._rows[:n], self._got[:n]
        got[:] = 0
        fleet.send_all(frame, idx)
        have = fleet.gather(idx, self.session, seq, layer, int(stage), pos, rows, got,
                            self.deadline_s / 4)
        received = int(got.sum())
        if have < n:
            for i, p in enumerate(owners):
                if not got[i]:
                    part, size = await self._gather(p, layer, stage, pos, frame)
                    rows[i] = part
                    received += size
        out = self._sum
        lib.tpfed_sum_rows_f32(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", rows),
                               n, out.shape[0])  # in plan order, whoever answered first
        self.stats.wire_bytes += n * len(frame) + received
        self.stats.min_wire_bytes += n * min_stage_bytes(self.config.dim)
        return out

    def _collector(self, i: int, got: list, done: asyncio.Future, layer: int, stage: Stage,
                   pos: int) -> Callable[[bytes], bool]:
        """A link hook that takes this stage's PARTIAL from owner ``i`` as it arrives (no queue
        or task switch per frame) and completes ``done`` when every owner has answered or one
        sent an ERROR (queued for the general path, which reports it)."""
        session = self.session

        def hook(data: bytes) -> bool:
            kind = data[2] if len(data) > 2 else -1
            if kind != MsgType.PARTIAL:
                if kind == MsgType.ERROR and not done.done():
                    done.set_result(None)
                return False
            try:
                p = decode_partial(data)
            except ProtocolError:
                return True  # malformed: dropped (the link counted the bytes)
            if (p.layer, p.stage, p.pos, p.session) != (layer, stage, pos, session):
                return True  # a stale answer to an earlier, resent activation
            if got[i] is None:
                values = p.values if p.encoding == PartialEncoding.F32 else p.to_f32()
                got[i] = (values, len(data))
                if all(g is not None for g in got) and not done.done():
                    done.set_result(None)
            return True

        return hook

    async def _gather(self, peer: PeerConn, layer: int, stage: Stage, pos: int,
                      frame: bytes) -> tuple[np.ndarray, int]:
        """The PARTIAL of ``peer`` for (layer, stage, pos). The activation is sent once more
        if the answer is late (a datagram may be lost; recomputing is idempotent), and the peer
        is declared lost at the deadline. Returns the partial and the frame's size."""
        t_end = time.monotonic() + self.deadline_s
        resend_at = time.monotonic() + self.deadline_s / 4
        while True:
            now = time.monotonic()
            if now >= t_end:
                raise PeerTimeout(f"peer {peer.label} stopped answering: no PARTIAL "
                                f"for layer {layer} {stage.name} at position {pos} within "
                                f"{self.deadline_s:.1f} s")
            try:
                data = await self._recv(peer, min(t_end, resend_at if resend_at > now else t_end) - now)
            except TimeoutError:
                if resend_at and time.monotonic() >= resend_at:
                    await self._send(peer, frame)
                    self.stats.wire_bytes += len(frame)
                    resend_at = 0.0
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
                hint = ""
                if code in (ErrorCode.BAD_STATE, ErrorCode.NOT_ASSIGNED, ErrorCode.BAD_SESSION):
                    hint = " (it no longer holds its share: was it reset or restarted?)"
                raise PeerError(f"peer {peer.label} failed layer {layer} {stage.name} at position "
                                f"{pos}: {name}: {reply.payload['text']}{hint}")

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
                partial = await self.partials_remote(layer, stage, xq, pos)
        except StopIteration as done:
            return done.value

    async def close(self, bye: bool = True) -> None:
        for peer in self.peers:
            if bye:  # best effort: a peer already gone must not hide why the run ended
                with contextlib.suppress(OSError, ConnectionError, PeerError):
                    await peer.link.send(encode_frame(Frame(MsgType.BYE, {"reason": 0},
                                                            dst=peer.device_id,
                                                            seq=self._next_seq(),
                                                            session=self.session)))
        for link in self.links:
            with contextlib.suppress(OSError, ConnectionError, PeerError):
                await link.close()
