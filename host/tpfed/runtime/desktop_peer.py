"""The desktop peer: the protocol state machine around :class:`tpfed.compute.share.DeviceShards`.

:class:`DesktopPeer` is transport-free: :meth:`DesktopPeer.handle` takes one received frame
and returns the frames to send back, so the same object serves UDP (``tpfed peer``), tests and
any other transport. States: a fresh peer answers HELLO with its capabilities; ASSIGN sets the
session, its device id and the share it will hold; WEIGHTS chunks build one shard per layer,
each verified against its sha256 before it is parsed; when every assigned layer is in, the peer
sends READY and answers ACTIVATION with PARTIAL.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from tpfed.compute import kernels
from tpfed.compute.kernels import Q8Tensor
from tpfed.compute.share import DeviceShards, LayerShare, ShardError, ShareSet, parse_layer_share
from tpfed.model.config import ModelConfig
from tpfed.protocol.codec import Frame, assemble, check_frame, decode_frame, encode_frame
from tpfed.protocol.errors import ProtocolError
from tpfed.protocol.fastpath import (
    activation_frame_size,
    decode_activation,
    encode_partial,
    partial_frame_size,
)
from tpfed.protocol.schema import (
    BATTERY_UNKNOWN,
    BROADCAST,
    HEADER_SIZE,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    Feature,
    MsgType,
    Stage,
    TransportKind,
)

MAX_FRAME = 0xFFFF  # the largest frame a desktop peer takes (u16 field in HELLO)


def available_memory_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure_int8_macs(rows: int = 512, cols: int = 1024, min_seconds: float = 0.05) -> int:
    """int8 multiply-accumulates per second of this machine's matmul kernel (one thread),
    measured on a matrix that fits in cache, as a peer's compute figure for planning."""
    rng = np.random.default_rng(0)
    w = kernels.quantize_q8_0(rng.standard_normal((rows, cols), dtype=np.float32))
    x = kernels.quantize_q8_0(rng.standard_normal(cols, dtype=np.float32))
    out = np.empty(rows, np.float32)
    kernels.matmul_q8_0_f32(w, x, out=out)  # warm up
    best = float("inf")
    spent, reps = 0.0, 0
    while spent < min_seconds or reps < 5:
        t0 = time.perf_counter()
        kernels.matmul_q8_0_f32(w, x, out=out)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        reps += 1
    return int(rows * cols / best)


@dataclass
class Capabilities:
    """What a desktop peer announces in HELLO."""

    name: str
    int8_macs: int
    ram_bytes: int
    arena_bytes: int
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    device_class: DeviceClass = DeviceClass.DESKTOP

    @classmethod
    def measure(cls, name: str, memory_limit_bytes: int | None = None) -> Capabilities:
        arena = available_memory_bytes()
        if memory_limit_bytes is not None:
            arena = min(arena, memory_limit_bytes)
        return cls(name=name, int8_macs=measure_int8_macs(), ram_bytes=total_memory_bytes(),
                   arena_bytes=arena)

    def hello_payload(self) -> dict:
        simd = Feature.SIMD if kernels.variant() != "ref" else 0
        return {
            "device_class": int(self.device_class),
            "name": self.name[:64],
            "ram_kb": min(self.ram_bytes // 1024, 0xFFFFFFFF),
            "psram_kb": 0,
            "flash_kb": 0,
            "cpu_mhz": 0,
            "cores": min(self.cores, 255),
            "features": int(Feature.FPU | simd),
            "int8_macs": self.int8_macs,
            "battery_pct": BATTERY_UNKNOWN,
            "temperature_dc": TEMPERATURE_UNKNOWN,
            "transports": int(TransportKind.UDP),
            "max_frame": MAX_FRAME,
            "arena_kb": min(self.arena_bytes // 1024, 0xFFFFFFFF),
        }


@dataclass
class _Assembly:
    """A shard being received in WEIGHTS chunks."""

    total: int
    sha256: bytes
    buf: bytearray
    received: int = 0
    seen: set[int] = field(default_factory=set)


@dataclass
class PeerStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # malformed frames (bad CRC, truncated, ...): dropped and counted
    errors_sent: int = 0
    activations: int = 0


class DesktopPeer:
    """Protocol state machine of a desktop peer. Not thread-safe; one per endpoint."""

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.stats = PeerStats()
        self.device_id = BROADCAST  # learnt from the first frame addressed to us
        self.session = 0
        self.config: ModelConfig | None = None
        self.assignment: dict[int, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]] = {}
        self.shares: dict[int, LayerShare] = {}
        self.shard_bytes: dict[int, int] = {}
        self._digests: dict[int, bytes] = {}
        self.shards: DeviceShards | None = None
        self._assembly: dict[int, _Assembly] = {}
        self._seq = 0
        self._started = time.monotonic()

    # -- helpers ---------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _frame(self, to: int, msg: MsgType, payload: dict, flags: int = 0) -> bytes:
        self.stats.frames_out += 1
        return encode_frame(Frame(type=msg, payload=payload, src=self._src(), dst=to,
                                  seq=self._next_seq(), session=self.session, flags=flags))

    def _src(self) -> int:
        return self.device_id if self.device_id != BROADCAST else 0xFE

    def _error(self, to: int, code: ErrorCode, text: str) -> list[bytes]:
        self.stats.errors_sent += 1
        return [self._frame(to, MsgType.ERROR, {"code": int(code), "text": text[:255]})]

    @property
    def ready(self) -> bool:
        return self.shards is not None

    # -- entry point -----------------------------------------------------------------------
    def handle(self, data: bytes) -> list[bytes]:
        """Process one received frame; return the frames to send back to its sender. Never
        raises: a frame that cannot be served is answered with ERROR or dropped and counted."""
        self.stats.frames_in += 1
        try:
            return self._handle(data)
        except Exception:  # a peer keeps serving whatever one frame holds
            self.stats.dropped += 1
            return []

    def _handle(self, data: bytes) -> list[bytes]:
        try:
            if len(data) > 2 and data[2] == MsgType.ACTIVATION:
                return self._on_activation(data)
            if len(data) > 2 and data[2] == MsgType.PROBE:
                return self._on_probe_fast(data)
            frame = decode_frame(data)
        except ProtocolError:
            self.stats.dropped += 1
            return []
        if frame.dst not in (BROADCAST, self.device_id) and frame.type != MsgType.HELLO:
            self.stats.dropped += 1
            return []
        handler = {
            MsgType.HELLO: self._on_hello,
            MsgType.ASSIGN: self._on_assign,
            MsgType.WEIGHTS: self._on_weights,
            MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.PROBE: self._on_probe,
            MsgType.BYE: self._on_bye,
        }.get(MsgType(frame.type))
        if handler is None:
            return self._error(frame.src, ErrorCode.BAD_STATE,
                               f"a peer does not take {MsgType(frame.type).name} frames")
        return handler(frame)

    def _on_hello(self, frame: Frame) -> list[bytes]:
        if frame.dst != BROADCAST:
            self.device_id = frame.dst
        return [self._frame(frame.src, MsgType.HELLO, self.caps.hello_payload())]

    def _on_assign(self, frame: Frame) -> list[bytes]:
        p = frame.payload
        try:
            config = ModelConfig(dim=p["dim"], hidden_dim=p["hidden_dim"], n_layers=p["n_layers"],
                                 n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], vocab_size=1,
                                 seq_len=p["seq_len"], norm_eps=p["norm_eps"],
                                 rope_theta=p["rope_theta"])
        except ValueError as exc:
            return self._error(frame.src, ErrorCode.UNSUPPORTED, f"ASSIGN geometry: {exc}")
        need = max(activation_frame_size(config.dim), partial_frame_size(config.dim))
        if need > MAX_FRAME:
            return self._error(frame.src, ErrorCode.UNSUPPORTED,
                               f"dim {config.dim} needs frames of {need} bytes, this peer takes {MAX_FRAME}")
        assignment = {}
        for e in p["entries"]:
            if not 0 <= e["layer"] < config.n_layers or e["layer"] in assignment:
                return self._error(frame.src, ErrorCode.BAD_PAYLOAD,
                                   f"ASSIGN names layer {e['layer']} twice or out of range")
            assignment[e["layer"]] = (tuple(e["kv_groups"]),
                                      tuple((r["start"], r["end"]) for r in e["mlp_ranges"]))
        self.device_id = frame.dst
        self.session = frame.session
        self.config = config
        self.assignment = assignment
        self.shares.clear()
        self.shard_bytes.clear()
        self._digests.clear()
        self._assembly.clear()
        self.shards = None
        return [self._frame(frame.src, MsgType.ACK, {"acked_seq": frame.seq,
                                                      "acked_type": int(MsgType.ASSIGN)})]

    def _on_weights(self, frame: Frame) -> list[bytes]:
        if self.config is None or frame.session != self.session:
            return self._error(frame.src, ErrorCode.BAD_STATE, "WEIGHTS before ASSIGN of this session")
        p = frame.payload
        layer, total, off, chunk = p["shard_id"], p["total"], p["offset"], p["data"]
        if layer not in self.assignment:
            return self._error(frame.src, ErrorCode.NOT_ASSIGNED, f"layer {layer} was not assigned")
        if total > self.caps.arena_bytes:
            return self._error(frame.src, ErrorCode.OUT_OF_MEMORY,
                               f"shard of layer {layer} ({total} bytes) exceeds the arena "
                               f"({self.caps.arena_bytes} bytes)")
        done = self.shares.get(layer)
        if done is not None and self._digests.get(layer) == bytes(p["sha256"]):
            return []  # a late duplicate of a chunk of a shard already complete
        asm = self._assembly.get(layer)
        if asm is None or asm.total != total or asm.sha256 != p["sha256"]:
            asm = self._assembly[layer] = _Assembly(total=total, sha256=bytes(p["sha256"]),
                                                    buf=bytearray(total))
        if off + len(chunk) > total:
            return self._error(frame.src, ErrorCode.BAD_PAYLOAD,
                               f"WEIGHTS chunk {off}+{len(chunk)} beyond shard size {total}")
        if off not in asm.seen:
            asm.buf[off:off + len(chunk)] = chunk
            asm.seen.add(off)
            asm.received += len(chunk)
        if asm.received < total:
            return []
        del self._assembly[layer]
        digest = hashlib.sha256(asm.buf).digest()
        if digest != asm.sha256:
            return self._error(frame.src, ErrorCode.SHARD_HASH_MISMATCH,
                               f"shard of layer {layer} refused: sha256 {digest.hex()[:16]}... "
                               f"!= announced {asm.sha256.hex()[:16]}...")
        try:
            share = parse_layer_share(bytes(asm.buf), self.config)
        except ShardError as exc:
            return self._error(frame.src, ErrorCode.BAD_PAYLOAD, f"shard of layer {layer}: {exc}")
        groups, ranges = self.assignment[layer]
        if share.layer != layer or share.groups != groups or share.ranges != ranges:
            return self._error(frame.src, ErrorCode.BAD_PAYLOAD,
                               f"shard of layer {layer} does not hold what ASSIGN said")
        self.shares[layer] = share
        self.shard_bytes[layer] = total
        self._digests[layer] = asm.sha256
        out = [self._frame(frame.src, MsgType.ACK, {"acked_seq": frame.seq,
                                                     "acked_type": int(MsgType.WEIGHTS)})]
        if len(self.shares) == len(self.assignment):
            self.shards = DeviceShards(ShareSet(self.config, self.shares.values()), self.assignment)
            used = self.shards.nbytes()
            out.append(self._frame(frame.src, MsgType.READY, {
                "shard_bytes": min(sum(self.shard_bytes.values()), 0xFFFFFFFF),
                "arena_used": min(used, 0xFFFFFFFF),
                "arena_free": min(max(self.caps.arena_bytes - used, 0), 0xFFFFFFFF),
            }))
        return out

    def _on_activation(self, data: bytes) -> list[bytes]:
        a = decode_activation(data)
        if a.dst not in (BROADCAST, self.device_id):
            self.stats.dropped += 1
            return []
        if self.shards is None or a.session != self.session:
            return self._error(a.src, ErrorCode.BAD_STATE if self.shards is None else ErrorCode.BAD_SESSION,
                               f"ACTIVATION for session {a.session} while "
                               f"{'not ready' if self.shards is None else f'in session {self.session}'}")
        if a.stage not in (Stage.ATTENTION, Stage.MLP):
            return self._error(a.src, ErrorCode.BAD_PAYLOAD, f"ACTIVATION for unknown stage {a.stage}")
        x = Q8Tensor(a.qs, a.scales)
        try:
            if a.stage == Stage.ATTENTION:
                part = self.shards.attention(a.layer, x, a.pos)
            else:
                part = self.shards.mlp(a.layer, x)
        except (ShardError, ValueError) as exc:
            return self._error(a.src, ErrorCode.BAD_PAYLOAD, str(exc))
        if part is None:
            return self._error(a.src, ErrorCode.NOT_ASSIGNED,
                               f"nothing of layer {a.layer} stage {Stage(a.stage).name} is held here")
        self.stats.activations += 1
        self.stats.frames_out += 1
        return [encode_partial(a.layer, a.stage, a.pos, part, dst=a.src, seq=a.seq,
                               session=self.session, src=self._src())]

    def _on_heartbeat(self, frame: Frame) -> list[bytes]:
        uptime = int((time.monotonic() - self._started) * 1000) & 0xFFFFFFFF
        return [self._frame(frame.src, MsgType.HEARTBEAT, {"uptime_ms": uptime, "load_pct": 0})]

    def _on_probe(self, frame: Frame) -> list[bytes]:
        self.stats.frames_out += 1
        reply = Frame(type=MsgType.PROBE_REPLY, payload=dict(frame.payload), src=self._src(),
                      dst=frame.src, seq=frame.seq, session=frame.session)
        return [encode_frame(reply)]

    def _on_probe_fast(self, data: bytes) -> list[bytes]:
        """PROBE echoed without decoding its payload (a PROBE's payload is echoed unchanged),
        so a probe times the link and this peer's frame turnaround, not the payload codec."""
        h = check_frame(data)
        if h.dst not in (BROADCAST, self.device_id):
            self.stats.dropped += 1
            return []
        self.stats.frames_out += 1
        payload = memoryview(data)[HEADER_SIZE:HEADER_SIZE + h.length]
        return [assemble((int(MsgType.PROBE_REPLY), 0, self._src(), h.src, h.seq, h.session,
                          h.version), payload)]

    def _on_bye(self, frame: Frame) -> list[bytes]:
        if frame.session != self.session:  # only the coordinator of this session ends it
            self.stats.dropped += 1
            return []
        self.shards = None
        self.shares.clear()
        self._assembly.clear()
        self.assignment = {}
        self.config = None
        return []


__all__ = ["Capabilities", "DesktopPeer", "MAX_FRAME", "measure_int8_macs"]
