"""HIL fixtures: a framed link to one board, emulated in QEMU unless --board-port is given.

``board`` is an emulated lm3s6965evb (or the real board given with --board-port),
``musca_board`` an emulated musca-b1, and ``emulated_board`` runs a test once on each emulated
board kind (``link.env`` says which).

Keys: every link has a federation key. Emulated boards (built without TPFED_KEY_HEX) get a fresh
random one by PROVISION at the first ``hello``; a real board given with --board-port uses the
key file in $TPFED_BOARD_KEY_FILE (a board flashed with ``tpfed flash --key-file``) or, without
it, is provisioned like an emulated one. ``hello`` then runs the AUTH handshake (session 1) and
every later frame is sealed both ways (``BoardLink.session``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.framing import StreamFramer
from tpfed.protocol.schema import COORDINATOR, MsgType

SESSION = 1  # the session number the links' handshakes choose (the tests' frames name it)

COORDINATOR_HELLO = {
    "device_class": 0, "name": "coordinator", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
    "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
    "temperature_dc": -32768, "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0,
}


@dataclass
class BoardLink:
    """Frames to and from one board over its (emulated) UART."""

    ser: object
    board: object | None = None  # tpfed.runtime.emulator.EmulatedBoard when emulated
    env: str | None = None  # PlatformIO env of the emulated board
    framer: StreamFramer = field(default_factory=StreamFramer)
    pending: list[bytes] = field(default_factory=list)
    seq: int = 0
    key: bytes = field(default_factory=auth.new_key)
    provisioned: bool = False  # the board holds key (PROVISION taken, or a keyed build)
    session: auth.AuthSession | None = None  # after the handshake: seals and opens frames

    def send_raw(self, data: bytes) -> None:
        self.ser.write(data)

    def send(self, frame: Frame) -> int:
        """Send frame, sealed with the session (its session number filled in) once there is one;
        handshake and PROVISION frames go unsealed."""
        self.seq = (self.seq + 1) & 0xFFFF
        frame.seq = frame.seq or self.seq
        sealed = self.session is not None and frame.type not in (MsgType.AUTH, MsgType.PROVISION)
        if sealed and frame.session == 0:
            frame.session = self.session.session
        data = encode_frame(frame)
        if sealed:
            data = self.session.seal(data)
        self.ser.write(b"\x00" + StreamFramer.encode(data))
        return frame.seq

    def send_sealed_as(self, frame: Frame, session: int) -> None:
        """frame sealed with this link's key and next counter, but naming another session."""
        self.seq = (self.seq + 1) & 0xFFFF
        frame.seq, frame.session = frame.seq or self.seq, session
        self.session.tx_counter += 1
        data = self.session.key.seal(encode_frame(frame), self.session.tx_counter)
        self.ser.write(b"\x00" + StreamFramer.encode(data))

    def recv(self, timeout: float = 5.0) -> Frame:
        """The next frame; sealed ones must open with the session (else BadTag/Replayed)."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no frame from the board within {timeout} s")
            chunk = self.ser.read(max(1, self.ser.in_waiting))
            self.pending += self.framer.feed(chunk)
        raw = self.pending.pop(0)
        if auth.is_sealed(raw) and self.session is not None:
            self.session.open(raw)
        return decode_frame(raw)

    def request(self, frame: Frame, timeout: float = 5.0) -> Frame:
        self.send(frame)
        return self.recv(timeout)

    def provision(self) -> None:
        from tpfed.runtime.emulator import provision

        if not self.provisioned:
            provision(self.ser, self.key)
            self.provisioned = True

    def handshake(self, device_id: int = 1, key: bytes | None = None, session: int = SESSION,
                  timeout: float = 4.0) -> auth.AuthSession:
        """CHALLENGE, RESPONSE (proof checked), CONFIRM, the board's sealed ACK: the session."""
        hs = auth.CoordinatorHandshake(key or self.key, device_id, session_id=session)
        self.send(Frame(MsgType.AUTH, hs.challenge(), dst=device_id, session=session))
        resp = self.recv(timeout)
        assert resp.type == MsgType.AUTH and resp.src == device_id, resp
        confirm = hs.on_response(resp.payload)
        self.send(Frame(MsgType.AUTH, confirm, dst=device_id, session=session))
        self.session = hs.session
        ack = self.recv(timeout)
        assert ack.type == MsgType.ACK and ack.payload["acked_type"] == MsgType.AUTH, ack
        return hs.session

    def hello(self, device_id: int = 1, attempts: int = 3, timeout: float = 4.0) -> Frame:
        """HELLO, after provisioning and the handshake the first time (PROVISION is repeated
        until ACKed: bytes that reach an emulated board's UART before its firmware has enabled
        the PL011 FIFO are lost; the coordinator retries the same way)."""
        if self.session is None:
            self.provision()
            self.handshake(device_id)
        return self.request(Frame(MsgType.HELLO, dict(COORDINATOR_HELLO), src=COORDINATOR, dst=device_id),
                            timeout)

    def drain(self, quiet: float = 0.3) -> list[Frame]:
        """Frames that arrive until the link has been quiet for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.recv(quiet))
            except TimeoutError:
                return out


EMULATED_ENVS = ("musca-b1", "lm3s6965evb")


@pytest.fixture(scope="session")
def firmware_elf_of() -> Callable[[str], Path]:
    """The firmware ELF of an emulated board's PlatformIO env, built once per session."""
    from tpfed.runtime.emulator import EmulatorError, firmware_path

    built: dict[str, Path] = {}

    def get(env: str) -> Path:
        if env not in built:
            try:
                built[env] = firmware_path(env, build=True)
            except EmulatorError as exc:
                pytest.fail(str(exc))
        return built[env]

    return get


@pytest.fixture(scope="session")
def firmware_elf(firmware_elf_of) -> Path:
    return firmware_elf_of("lm3s6965evb")


@contextlib.contextmanager
def emulated_link(env: str, elf: Path, name: str = "hil") -> Iterator[BoardLink]:
    """A fresh QEMU board of ``env`` running ``elf``, with a framed link to its UART."""
    from tpfed.runtime.emulator import BoardSpec, EmulatedBoard, board_type

    spec = BoardSpec(firmware=elf, machine=board_type(env).machine, name=f"{name}-{env}")
    with EmulatedBoard(spec) as emu:
        ser = emu.open_serial(timeout=0.05)
        try:
            yield BoardLink(ser, board=emu, env=env)
        finally:
            ser.close()


@pytest.fixture
def board(board_ports, firmware_elf) -> Iterator[BoardLink]:
    """A fresh emulated lm3s6965evb per test, or the first real board given with --board-port."""
    import serial

    if board_ports:
        ser = serial.serial_for_url(board_ports[0], baudrate=921600, timeout=0.05)
        time.sleep(2.0)  # boards reset when the port opens
        ser.reset_input_buffer()
        key_file = os.environ.get("TPFED_BOARD_KEY_FILE")
        if key_file:
            yield BoardLink(ser, key=auth.read_key_file(key_file), provisioned=True)
        else:
            yield BoardLink(ser)
        ser.close()
        return
    with emulated_link("lm3s6965evb", firmware_elf) as link:
        yield link


@pytest.fixture
def musca_board(firmware_elf_of) -> Iterator[BoardLink]:
    """A fresh emulated musca-b1 per test."""
    with emulated_link("musca-b1", firmware_elf_of("musca-b1")) as link:
        yield link


@pytest.fixture
def link_to() -> Iterator[Callable[[object], BoardLink]]:
    """Opens a framed link to a started tpfed.runtime.emulator.EmulatedBoard; closed after the test."""
    opened: list[BoardLink] = []

    def open_link(emu) -> BoardLink:
        link = BoardLink(emu.open_serial(timeout=0.05), board=emu)
        opened.append(link)
        return link

    yield open_link
    for link in opened:
        link.ser.close()


@pytest.fixture(params=EMULATED_ENVS)
def emulated_board(request, firmware_elf_of) -> Iterator[BoardLink]:
    """A fresh emulated board of each kind in turn."""
    env = request.param
    with emulated_link(env, firmware_elf_of(env)) as link:
        yield link
