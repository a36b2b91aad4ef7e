"""HIL fixtures: a framed link to one board, emulated in QEMU unless --board-port is given."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.framing import StreamFramer
from tpfed.protocol.schema import COORDINATOR, MsgType

COORDINATOR_HELLO = {
    "device_class": 0, "name": "coordinator", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
    "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
    "temperature_dc": -32768, "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0,
}


@dataclass
class BoardLink:
    """Frames to and from one board over its (emulated) UART."""

    ser: object
    board: object | None = None  # tpfed.emulator.EmulatedBoard when emulated
    framer: StreamFramer = field(default_factory=StreamFramer)
    pending: list[bytes] = field(default_factory=list)
    seq: int = 0

    def send_raw(self, data: bytes) -> None:
        self.ser.write(data)

    def send(self, frame: Frame) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        frame.seq = frame.seq or self.seq
        self.ser.write(b"\x00" + StreamFramer.encode(encode_frame(frame)))
        return frame.seq

    def recv(self, timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while not self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no frame from the board within {timeout} s")
            chunk = self.ser.read(max(1, self.ser.in_waiting))
            self.pending += self.framer.feed(chunk)
        return decode_frame(self.pending.pop(0))

    def request(self, frame: Frame, timeout: float = 5.0) -> Frame:
        self.send(frame)
        return self.recv(timeout)

    def hello(self, device_id: int = 1) -> Frame:
        return self.request(Frame(MsgType.HELLO, dict(COORDINATOR_HELLO), src=COORDINATOR, dst=device_id))

    def drain(self, quiet: float = 0.3) -> list[Frame]:
        """Frames that arrive until the link has been quiet for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.recv(quiet))
            except TimeoutError:
                return out


@pytest.fixture(scope="session")
def firmware_elf():
    from tpfed.emulator import EmulatorError, firmware_path

    try:
        return firmware_path("lm3s6965evb", build=True)
    except EmulatorError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def board(board_ports, firmware_elf) -> Iterator[BoardLink]:
    """A fresh emulated board per test, or the first real board given with --board-port."""
    import serial

    if board_ports:
        ser = serial.serial_for_url(board_ports[0], baudrate=921600, timeout=0.05)
        time.sleep(2.0)  # boards reset when the port opens
        ser.reset_input_buffer()
        yield BoardLink(ser)
        ser.close()
        return
    from tpfed.emulator import BoardSpec, EmulatedBoard

    with EmulatedBoard(BoardSpec(firmware=firmware_elf, name="hil")) as emu:
        ser = emu.open_serial(timeout=0.05)
        link = BoardLink(ser, board=emu)
        yield link
        ser.close()
