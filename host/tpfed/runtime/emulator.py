"""Emulated boards: the tpfed firmware running in QEMU, one process per board.

Each board is a ``qemu-system-arm`` process running the PlatformIO build of the firmware
(``firmware/.pio/build/<env>/firmware.elf``). Its UART is a TCP chardev on a free loopback
port in server mode with ``wait=on``: the board starts executing when the first client
connects to :attr:`EmulatedBoard.url` (``socket://127.0.0.1:PORT``, which pyserial's
``serial_for_url`` opens like a serial port). A board that faults resets, and QEMU runs with
``-no-reboot``, so a crash ends the process and shows in :attr:`EmulatedBoard.returncode`.

Boards are stopped reliably: :class:`EmulatedBoards` is a context manager, every QEMU is also
stopped at interpreter exit, and on Linux each QEMU gets SIGKILL from the kernel if the Python
process that started it dies (``PR_SET_PDEATHSIG``), so a failing or killed test leaves no
orphan QEMU behind.

Firmware sources: a source checkout builds in ``firmware/`` (into ``firmware/.pio``); an
installed package carries the same sources as ``tpfed/firmware`` and builds them into a
writable folder under ``~/.cache/tpfed/firmware-build`` (``$TPFED_FIRMWARE_BUILD`` overrides
it), so ``pip install .`` alone runs emulated boards. PlatformIO's ``tool-scons`` package is
prepared from the ``scons`` Python package first (:mod:`tpfed.runtime.pio_offline`): no
registry is needed.

Which boards can be emulated, and everything about them (QEMU machine, PlatformIO env and so
the firmware path, memory figures), comes from their board profiles in ``boards/``
(:data:`EMULATED_PROFILES`): ``musca-b1`` (Cortex-M33, 512 KiB SRAM; the default, big enough
for a quarter of stories260K with its KV cache) and ``lm3s6965evb`` (Cortex-M3, 64 KiB SRAM).
A profile names its QEMU machine with ``qemu_machine`` (default: the profile's name).

Keys: the firmware built without ``TPFED_KEY_HEX`` starts with no federation key and drops every
frame until it takes one PROVISION frame on its UART. :func:`provision` (or
:meth:`EmulatedBoard.provision`) sends it over an open serial link and waits for the board's ACK.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tpfed.errors import TpfedError
from tpfed.planning.profiles import BoardProfile
from tpfed.runtime.process import die_with_parent

REPO = Path(__file__).resolve().parents[3]
FIRMWARE_DIR = REPO / "firmware"
"""The firmware of a source checkout (see :func:`firmware_dir` for an installed package)."""
PACKAGED_FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"

EMULATED_PROFILES: tuple[str, ...] = ("musca-b1", "lm3s6965evb")
"""Board profiles (``boards/<name>.yaml``) of the boards QEMU emulates."""
DEFAULT_ENV = "musca-b1"

_READY_MARK = b"waiting for connection"
_live: weakref.WeakSet[EmulatedBoard] = weakref.WeakSet()


class EmulatorError(TpfedError):
    """An emulated board cannot be built, started or reached; the message says why."""


@dataclass(frozen=True)
class EmulatedBoardType:
    """One kind of emulated board, as its board profile describes it."""

    profile: BoardProfile
    env: str  # PlatformIO env that builds its firmware
    machine: str  # qemu-system-arm -machine

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def firmware(self) -> Path:
        """Where ``pio run -e env`` puts the firmware ELF."""
        return build_dir(self.env) / "firmware.elf"

    @property
    def ram_bytes(self) -> int:
        return self.profile.ram_bytes

    @property
    def usable_bytes(self) -> int:
        """Arena the firmware gives the peer for weights and KV cache."""
        return self.profile.usable_bytes


@cache
def emulated_board_types() -> dict[str, EmulatedBoardType]:
    """PlatformIO env -> board type, for every profile in :data:`EMULATED_PROFILES`."""
    from importlib import resources

    import yaml

    from tpfed.planning.profiles import load_profile

    types: dict[str, EmulatedBoardType] = {}
    for name in EMULATED_PROFILES:
        profile = load_profile(name)
        if not profile.platformio_env:
            raise EmulatorError(f"board profile {name!r} names no platformio_env to build its firmware with")
        doc = yaml.safe_load((resources.files("tpfed.boards") / f"{name}.yaml").read_text())
        machine = doc.get("qemu_machine", name)
        if not isinstance(machine, str) or not machine:
            raise EmulatorError(f"board profile {name!r}: qemu_machine must be a QEMU machine name")
        types[profile.platformio_env] = EmulatedBoardType(profile, profile.platformio_env, machine)
    return types


def board_type(env: str = DEFAULT_ENV) -> EmulatedBoardType:
    """The emulated board built by PlatformIO env ``env`` (raises :class:`EmulatorError`)."""
    types = emulated_board_types()
    try:
        return types[env]
    except KeyError:
        raise EmulatorError(f"PlatformIO env {env!r} is not an emulated board; known: "
                            f"{', '.join(sorted(types))}") from None


def machine_of(firmware: str | Path) -> str:
    """The QEMU machine of a firmware ELF built in firmware/.pio/build/<env>/."""
    env = Path(firmware).parent.name
    types = emulated_board_types()
    if env not in types:
        raise EmulatorError(f"cannot tell which board {firmware} is for (its folder {env!r} is not an "
                            f"emulated board's env: {', '.join(sorted(types))}); give BoardSpec.machine")
    return types[env].machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (QEMU binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_binary() -> str:
    exe = shutil.which("qemu-system-arm")
    if not exe:
        raise EmulatorError(
            "qemu-system-arm is not installed (Debian/Ubuntu: apt-get install qemu-system-arm)"
        )
    return exe


def firmware_dir() -> Path:
    """The PlatformIO project of the firmware: ``firmware/`` of a source checkout, else the
    copy an installed package carries (``tpfed/firmware``)."""
    for d in (FIRMWARE_DIR, PACKAGED_FIRMWARE_DIR):
        if (d / "platformio.ini").is_file():
            return d
    raise EmulatorError(f"no firmware sources: neither {FIRMWARE_DIR} (a source checkout) nor "
                        f"{PACKAGED_FIRMWARE_DIR} (an installed package) holds platformio.ini; "
                        "reinstall tpfed (pip install .)")


def workspace_dir() -> Path | None:
    """Where PlatformIO builds (its ``.pio`` folder): None for a source checkout (the default,
    ``firmware/.pio``); for an installed package a writable cache folder of this install."""
    fw = firmware_dir()
    if fw == FIRMWARE_DIR:
        return None
    import hashlib

    from tpfed import __version__

    root = os.environ.get("TPFED_FIRMWARE_BUILD")
    if root:
        base = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(cache) / "tpfed" / "firmware-build"
    tag = hashlib.sha256(str(fw).encode()).hexdigest()[:10]
    return base / f"{__version__}-{tag}"


def build_dir(env: str = DEFAULT_ENV) -> Path:
    ws = workspace_dir()
    return (ws if ws is not None else firmware_dir() / ".pio") / "build" / env


def pio_env() -> dict[str, str]:
    """The environment to run PlatformIO in: the build goes to :func:`workspace_dir`."""
    env = dict(os.environ)
    ws = workspace_dir()
    if ws is not None:
        ws.mkdir(parents=True, exist_ok=True)
        env["PLATFORMIO_WORKSPACE_DIR"] = str(ws)
    return env


def build_firmware(env: str = DEFAULT_ENV, *, quiet: bool = True) -> Path:
    """Build ``env`` with PlatformIO (``pio run -e env`` in the firmware project) and return its
    ELF. PlatformIO's ``tool-scons`` is prepared offline first."""
    board_type(env)
    fw = firmware_dir()
    if not shutil.which("arm-none-eabi-gcc"):
        raise EmulatorError(
            "arm-none-eabi-gcc is not installed (Debian/Ubuntu: apt-get install "
            "gcc-arm-none-eabi libnewlib-arm-none-eabi)"
        )
    from tpfed.runtime.pio_offline import OfflineSetupError, ensure

    try:  # PlatformIO gets SCons without its registry
        ensure(fw / "platformio.ini")
    except (OfflineSetupError, OSError) as exc:
        raise EmulatorError(f"preparing PlatformIO offline failed: {exc}") from None
    cmd = [sys.executable, "-m", "platformio", "run", "-e", env, "-d", str(fw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pio_env())
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        hint = ""
        if "tool-scons" in tail or "Could not" in tail or "HTTPClient" in tail:
            hint = " (offline? run `python -m tpfed.runtime.pio_offline` first)"
        raise EmulatorError(f"building firmware env {env} failed{hint}:\n{tail}")
    elf = build_dir(env) / "firmware.elf"
    if not elf.is_file():
        raise EmulatorError(f"PlatformIO reported success but {elf} does not exist")
    return elf


def firmware_path(env: str = DEFAULT_ENV, *, build: bool | None = None) -> Path:
    """The firmware ELF of ``env``. ``build=True`` always runs PlatformIO (incremental),
    ``False`` only uses an existing build, ``None`` builds when PlatformIO is installed and
    otherwise falls back to an existing build."""
    elf = board_type(env).firmware
    if build is None:
        build = shutil.which("pio") is not None or _has_module("platformio")
    if build:
        return build_firmware(env)
    if not elf.is_file():
        raise EmulatorError(f"no firmware at {elf}; build it with `pio run -e {env}` in {firmware_dir()}")
    return elf


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class BoardSpec:
    """One board to start: its firmware ELF, the QEMU machine (None: the machine of the env
    whose build folder holds the ELF) and a name for messages."""

    firmware: Path
    machine: str | None = None
    name: str = "emu0"

    def qemu_machine(self) -> str:
        return self.machine if self.machine is not None else machine_of(self.firmware)


class EmulatedBoard:
    """One QEMU board. ``start()`` returns once QEMU listens on :attr:`url`; the guest starts
    running when a client connects there (``open_serial()`` or any pyserial user)."""

    def __init__(self, spec: BoardSpec) -> None:
        self.spec = spec
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = bytearray()
        self._log_lock = threading.Lock()
        self._drain: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EmulatedBoard:
        if self._proc is not None:
            raise EmulatorError(f"{self.spec.name} is already started")
        if not Path(self.spec.firmware).is_file():
            raise EmulatorError(f"firmware {self.spec.firmware} does not exist")
        qemu = qemu_binary()
        machine = self.spec.qemu_machine()
        last = ""
        for _ in range(5):  # the free port may be taken between choosing and binding it
            port = free_port()
            cmd = [
                qemu, "-machine", machine, "-nographic", "-monitor", "none",
                "-no-reboot", "-kernel", str(self.spec.firmware),
                "-chardev",
                f"socket,id=uart0,host=127.0.0.1,port={port},server=on,wait=on,nodelay=on",
                "-serial", "chardev:uart0",
            ]
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
            line = self._await_listening(proc, timeout)
            if line is None:
                self._proc, self.port = proc, port
                _live.add(self)
                self._drain = threading.Thread(target=self._drain_output, name=f"{self.spec.name}-qemu-log",
                                               daemon=True)
                self._drain.start()
                return self
            last = line
            if "Address already in use" not in line:
                break
        raise EmulatorError(f"QEMU for {self.spec.name} did not start: {last.strip()}")

    def _await_listening(self, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
        """None once QEMU says it listens; otherwise its output (and the process is gone)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        out = bytearray()
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = b""
            if chunk:
                out += chunk
                if _READY_MARK in out:
                    os.set_blocking(fd, True)
                    with self._log_lock:
                        self._log += out
                    return None
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.005)
        _kill(proc)
        return out.decode(errors="replace") or f"no output within {timeout:.0f} s"

    def _drain_output(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                return
            with self._log_lock:
                self._log += chunk
                del self._log[:-65536]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill(proc)
        if self._drain is not None:
            self._drain.join(timeout=2)
            self._drain = None
        _live.discard(self)

    def __enter__(self) -> EmulatedBoard:
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise EmulatorError(f"{self.spec.name} is not started")
        return f"socket://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """None while QEMU runs; its exit status once it ended (a guest crash ends it)."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """What QEMU printed (its own messages; the UART goes to the socket)."""
        with self._log_lock:
            return self._log.decode(errors="replace")

    def provision(self, ser, key: bytes, **kwargs) -> None:
        """:func:`provision` over ``ser`` (a link from :meth:`open_serial`), with this board's
        name in the error."""
        try:
            provision(ser, key, **kwargs)
        except EmulatorError as exc:
            raise EmulatorError(f"{self.spec.name}: {exc}; QEMU said: {self.output().strip()[-300:]}") from None

    def open_serial(self, timeout: float = 2.0, connect_timeout: float = 5.0):
        """Connect to the board's UART with pyserial (starts the guest)."""
        import serial

        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                return serial.serial_for_url(self.url, timeout=timeout)
            except (serial.SerialException, OSError) as exc:
                if time.monotonic() > deadline or not self.alive():
                    raise EmulatorError(f"cannot connect to {self.spec.name} at {self.url}: {exc}; "
                                        f"QEMU said: {self.output().strip()[-300:]}") from exc
                time.sleep(0.02)


def provision(ser, key: bytes, *, attempts: int = 5, timeout: float = 2.0) -> None:
    """Give a freshly booted board its federation key over an open serial link (pyserial-like:
    ``write``, ``read``, ``in_waiting``): one PROVISION frame, repeated until the board ACKs it
    (bytes that reach an emulated board's UART before its FIFO is on are lost; a repeat of the
    same key is ACKed again). Frames other than that ACK are discarded. Raises EmulatorError if
    the board never answers (it holds another key, or is not running this firmware)."""
    from tpfed.protocol.codec import Frame, decode_frame, encode_frame
    from tpfed.protocol.errors import ProtocolError
    from tpfed.protocol.framing import StreamFramer
    from tpfed.protocol.schema import KEY_SIZE, MsgType

    if len(key) != KEY_SIZE:
        raise EmulatorError(f"a federation key is {KEY_SIZE} bytes, got {len(key)}")
    framer = StreamFramer()
    for attempt in range(1, attempts + 1):
        frame = encode_frame(Frame(MsgType.PROVISION, {"key": bytes(key)}, seq=attempt))
        ser.write(b"\x00" + StreamFramer.encode(frame))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = ser.read(max(1, getattr(ser, "in_waiting", 0) or 1))
            for raw in framer.feed(chunk):
                try:
                    f = decode_frame(raw)
                except ProtocolError:
                    continue
                if f.type == MsgType.ACK and f.payload.get("acked_type") == MsgType.PROVISION:
                    return
    raise EmulatorError(f"the board did not take its key after {attempts} PROVISION frames "
                        "(it may hold another key: only an unkeyed build takes PROVISION)")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()


class EmulatedBoards:
    """N emulated boards of one kind (``env``: ``musca-b1`` by default, or ``lm3s6965evb``)
    as a context manager::

        with EmulatedBoards(2) as boards:
            for b in boards:
                ser = b.open_serial()
    """

    def __init__(self, count: int, env: str = DEFAULT_ENV, firmware: Path | None = None,
                 *, build: bool | None = None) -> None:
        if count < 1:
            raise EmulatorError(f"need at least one emulated board, got {count}")
        self.board_type = board_type(env)
        self.count = count
        self.env = env
        self.firmware = firmware
        self.build = build
        self.boards: list[EmulatedBoard] = []

    def start(self) -> list[EmulatedBoard]:
        fw = self.firmware or firmware_path(self.env, build=self.build)
        try:
            for i in range(self.count):
                spec = BoardSpec(firmware=fw, machine=self.board_type.machine, name=f"emu{i}")
                self.boards.append(EmulatedBoard(spec).start())
        except BaseException:
            self.stop()
            raise
        return self.boards

    def stop(self) -> None:
        for b in self.boards:
            b.stop()
        self.boards.clear()

    def __enter__(self) -> list[EmulatedBoard]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self):
        return iter(self.boards)


@atexit.register
def _stop_all() -> None:
    for b in list(_live):
        b.stop()


__all__ = [
    "DEFAULT_ENV",
    "EMULATED_PROFILES",
    "BoardSpec",
    "EmulatedBoard",
    "EmulatedBoardType",
    "EmulatedBoards",
    "EmulatorError",
    "board_type",
    "build_firmware",
    "emulated_board_types",
    "firmware_dir",
    "firmware_path",
    "free_port",
    "machine_of",
    "provision",
    "qemu_binary",
]
