"""The peer core (firmware/lib/tpfed/src/peer.c) from Python, through ``tpfed.compute._native``.

Every device runs the same C state machine; this module sets one up on the host: its device
info and config, and its arena (an anonymous ``mmap``: pages are committed only when the core
touches them, so offering all free memory costs nothing up front). :class:`MemPeer` drives it
frame by frame with replies collected in memory (``firmware/ports/host/mem_peer.c``): the unit
and parity tests use it, and so can the coordinator for a share held by its own CPU.
``tpfed peer`` serves the same core on UDP (:mod:`tpfed.runtime.desktop_peer`).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from tpfed.compute._native import ffi, lib
from tpfed.errors import TpfedError

MAX_FRAME = lib.TPFED_PEER_MAX_FRAME_LIMIT  # the largest frame a desktop peer takes and sends


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


def arena_min_bytes(max_frame: int = MAX_FRAME) -> int:
    """The smallest arena a core with this max_frame starts with (it holds nothing then)."""
    return int(lib.tpfed_peer_arena_min(max_frame))


@dataclass
class DeviceInfo:
    """``tpfed_device_info``: what HELLO announces about the device (name = ``board``)."""

    board: str
    port: str = "host"
    cpu_hz: int = 0
    ram_bytes: int = field(default_factory=total_memory_bytes)
    psram_bytes: int = 0
    flash_bytes: int = 0
    link_baud: int = 0
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    has_fpu: bool = True
    has_simd: bool = field(default_factory=lambda: ffi.string(lib.tpfed_kernels_variant()) != b"ref")


@dataclass
class PeerConfig:
    """``tpfed_peer_config`` without the HAL and info (a desktop peer's defaults)."""

    device_class: int = lib.TPFED_DEV_DESKTOP
    transports: int = lib.TPFED_TRANSPORT_UDP
    max_frame: int = MAX_FRAME
    max_groups: int = 255
    max_ranges: int = 255
    int8_macs: int = 0  # 0: the core measures its matmul kernel at start-up (about 0.1 s)
    key: bytes | None = None  # the federation key; without one the core answers nothing
    provision: bool = False  # while keyless, take one PROVISION frame (boards do; hosts don't)


def _clamp32(v: int) -> int:
    return max(0, min(int(v), 0xFFFFFFFF))


class PeerCore:
    """One C peer core in an arena of ``arena_bytes`` behind ``hal`` (a ``tpfed_hal *`` whose
    owner outlives this object). Not thread-safe."""

    def __init__(self, hal: object, info: DeviceInfo, arena_bytes: int,
                 config: PeerConfig | None = None, keepalive: object = None) -> None:
        config = config or PeerConfig()
        need = arena_min_bytes(config.max_frame)
        if need == 0:
            raise TpfedError(f"max_frame {config.max_frame} is outside "
                             f"{lib.TPFED_PEER_MIN_FRAME}..{lib.TPFED_PEER_MAX_FRAME_LIMIT}")
        if arena_bytes < need:
            raise TpfedError(f"a peer needs at least {need} bytes ({need / 2**20:.2f} MiB) of "
                             f"memory, {arena_bytes} offered")
        self._keepalive = keepalive
        self._name = ffi.new("char[]", info.board.encode()[:64])
        self._port = ffi.new("char[]", info.port.encode())
        self._info = ffi.new("tpfed_device_info *", {
            "board": self._name, "port": self._port, "cpu_hz": _clamp32(info.cpu_hz),
            "ram_bytes": max(0, min(int(info.ram_bytes), 2**64 - 1)), "psram_bytes": _clamp32(info.psram_bytes),
            "flash_bytes": _clamp32(info.flash_bytes), "link_baud": _clamp32(info.link_baud),
            "cores": max(0, min(info.cores, 255)), "has_fpu": int(info.has_fpu),
            "has_simd": int(info.has_simd)})
        if config.key is not None and len(config.key) != lib.TPFED_KEY_SIZE:
            raise TpfedError(f"a federation key is {lib.TPFED_KEY_SIZE} bytes, got {len(config.key)}")
        key = ffi.new("uint8_t[]", config.key) if config.key is not None else ffi.NULL
        self._cfg = ffi.new("tpfed_peer_config *", {
            "hal": hal, "info": self._info, "device_class": config.device_class,
            "transports": config.transports, "max_frame": config.max_frame,
            "max_groups": config.max_groups, "max_ranges": config.max_ranges,
            "int8_macs": config.int8_macs, "key": key, "provision": int(config.provision)})
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            self._arena_map = mmap.mmap(-1, arena_bytes, flags=flags)
        except (OSError, OverflowError, ValueError) as exc:
            raise TpfedError(f"cannot map {arena_bytes} bytes of memory for the peer: {exc}") from None
        self._arena = ffi.from_buffer("uint8_t[]", self._arena_map)
        self.ptr = lib.tpfed_peer_init(self._arena, arena_bytes, self._cfg)
        if key != ffi.NULL:
            lib.tpfed_wipe(key, len(config.key))  # the core keeps its own HMAC states of it
        if self.ptr == ffi.NULL:
            raise TpfedError("the peer core refused its configuration")
        self.config = config
        self.info = info

    # -- what the core reports ------------------------------------------------------------
    @property
    def state(self) -> int:
        return int(lib.tpfed_peer_state(self.ptr))

    @property
    def ready(self) -> bool:
        return self.state == lib.TPFED_PEER_READY

    @property
    def session(self) -> int:
        return int(lib.tpfed_peer_session(self.ptr))

    @property
    def device_id(self) -> int:
        return int(lib.tpfed_peer_device_id(self.ptr))

    @property
    def int8_macs(self) -> int:
        return int(lib.tpfed_peer_int8_macs(self.ptr))

    @property
    def arena_size(self) -> int:
        return int(lib.tpfed_peer_arena_size(self.ptr))

    @property
    def arena_used(self) -> int:
        return int(lib.tpfed_peer_arena_used(self.ptr))

    @property
    def layers_assigned(self) -> int:
        return int(lib.tpfed_peer_layers_assigned(self.ptr))

    @property
    def layers_held(self) -> int:
        return int(lib.tpfed_peer_layers_held(self.ptr))

    @property
    def shares_kept(self) -> int:
        """Complete shares in the arena, of the assignment or kept since it ended."""
        return int(lib.tpfed_peer_shares_kept(self.ptr))

    def stats(self) -> dict[str, int]:
        s = lib.tpfed_peer_get_stats(self.ptr)
        return {k: int(getattr(s, k)) for k in ("frames_in", "frames_out", "dropped",
                                                  "errors_sent", "activations", "auth_dropped",
                                                  "replayed", "sessions", "busy")}


_RECORD = struct.Struct("<I")


class MemPeer(PeerCore):
    """A peer core whose replies are collected in memory: ``handle(frame)`` returns them.

    ``outbox_bytes`` bounds what one frame's replies may take (a frame answered with more is
    cut short and counted in ``overflow``). ``manual_clock`` makes the core's clock
    ``now_ms`` (set it as needed); the start-up MAC/s measurement needs a running clock, so
    give ``config.int8_macs`` then."""

    def __init__(self, info: DeviceInfo, arena_bytes: int, config: PeerConfig | None = None,
                 outbox_bytes: int = 4 * (MAX_FRAME + 4), manual_clock: bool = False) -> None:
        config = config or PeerConfig()
        if manual_clock and not config.int8_macs:
            raise ValueError("a manual clock needs config.int8_macs (the core cannot time itself)")
        self._outbox = ffi.new("uint8_t[]", outbox_bytes)
        self._mem = ffi.new("tpfed_mem_peer *")
        lib.tpfed_mem_peer_init(self._mem, self._outbox, outbox_bytes)
        self._mem.manual_clock = int(manual_clock)
        super().__init__(ffi.addressof(self._mem, "hal"), info, arena_bytes, config)

    @property
    def mem_ptr(self) -> object:
        """The ``tpfed_mem_peer *`` whose outbox collects this core's replies."""
        return self._mem

    @property
    def now_ms(self) -> int:
        return int(self._mem.now_ms)

    @now_ms.setter
    def now_ms(self, value: int) -> None:
        self._mem.now_ms = value & 0xFFFFFFFF

    @property
    def overflow(self) -> int:
        return int(self._mem.overflow)

    def handle(self, frame: bytes) -> list[bytes]:
        """Hand one received frame to the core; return the frames it sent back."""
        lib.tpfed_mem_peer_handle(self._mem, self.ptr, ffi.from_buffer(frame), len(frame))
        out = ffi.buffer(self._outbox, self._mem.used)[:]
        frames, at = [], 0
        while at < len(out):
            (n,) = _RECORD.unpack_from(out, at)
            frames.append(out[at + 4:at + 4 + n])
            at += 4 + n
        return frames


__all__ = ["MAX_FRAME", "DeviceInfo", "MemPeer", "PeerConfig", "PeerCore", "arena_min_bytes",
           "available_memory_bytes", "total_memory_bytes"]
