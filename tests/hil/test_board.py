"""Hardware-in-the-loop tests of the firmware: emulated boards by default (lm3s6965evb for the
protocol tests, which also run on a real board with ``--board-port PORT``; musca-b1 for real
stories260K shards), and both emulated boards for the build, unit-test and HELLO checks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, encode_frame
from tpfed.protocol.framing import StreamFramer
from tpfed.protocol.schema import (
    AUTH_TRAILER_SIZE,
    COORDINATOR,
    CRC_SIZE,
    HEADER_SIZE,
    ByeReason,
    DeviceClass,
    ErrorCode,
    MsgType,
    TransportKind,
)

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"


def _pio(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    subprocess.run([sys.executable, str(REPO / "tools" / "pio_offline.py")], check=True,
                   capture_output=True)
    return subprocess.run([sys.executable, "-m", "platformio", *args, "-d", str(FIRMWARE)],
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


@pytest.mark.parametrize("env", ["lm3s6965evb", "musca-b1"])
def test_firmware_builds_with_platformio(env):
    from tpfed.runtime.emulator import board_type

    proc = _pio("run", "-e", env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    elf = FIRMWARE / ".pio" / "build" / env / "firmware.elf"
    size = subprocess.run(["arm-none-eabi-size", "-A", "-d", str(elf)], capture_output=True,
                          text=True, check=True).stdout
    sections = {line.split()[0]: int(line.split()[1]) for line in size.splitlines()
                if line.startswith(".") and len(line.split()) >= 2}
    ram = sections.get(".data", 0) + sections.get(".bss", 0) + sections.get(".stack", 0)
    profile = board_type(env).profile
    assert ram <= profile.ram_bytes
    assert sections[".text"] + sections.get(".data", 0) <= profile.flash_bytes


@pytest.mark.slow
@pytest.mark.parametrize("env", ["lm3s6965evb", "musca-b1"])
def test_firmware_unit_tests_pass_under_qemu(env):
    """`pio test`: the board's kernel results over UART equal the host CFFI build's, bit for bit."""
    proc = _pio("test", "-e", env)
    out = proc.stdout + proc.stderr
    failed = [line for line in out.splitlines() if "FAILED" in line or "ERRORED" in line]
    assert proc.returncode == 0, "\n".join(failed) or out[-3000:]


# What each emulated board announces: (name, ram_kb, flash_kb, psram_kb, cpu_mhz, cores).
EMULATED_HELLO = {
    "lm3s6965evb": ("lm3s6965evb", 64, 256, 0, 12, 1),
    "musca-b1": ("musca-b1", 512, 8192, 0, 40, 1),
}


def test_emulated_boards_boot_and_answer_hello(emulated_board):
    """Each emulated board boots its own firmware and describes itself as its profile says."""
    from tpfed.runtime.emulator import board_type

    reply = emulated_board.hello(device_id=4)
    assert reply.type == MsgType.HELLO and reply.src == 4 and reply.dst == COORDINATOR
    h = reply.payload
    env = emulated_board.env
    name, ram_kb, flash_kb, psram_kb, cpu_mhz, cores = EMULATED_HELLO[env]
    assert (h["name"], h["ram_kb"], h["flash_kb"], h["psram_kb"], h["cpu_mhz"], h["cores"]) == \
        (name, ram_kb, flash_kb, psram_kb, cpu_mhz, cores)
    assert h["device_class"] == DeviceClass.CORTEX_M_EMU and h["features"] == 0
    profile = board_type(env).profile
    assert h["ram_kb"] * 1024 == profile.ram_bytes
    # The profile's usable memory is what the planner counts on before HELLO: never more than
    # the arena the board announces.
    assert profile.usable_bytes <= h["arena_kb"] * 1024 < profile.ram_bytes
    assert 10_000 <= h["int8_macs"] <= 10**11, h["int8_macs"]
    assert emulated_board.board.alive(), emulated_board.board.output()


def test_emulated_boards_default_to_musca_b1(firmware_elf_of, link_to):
    """`EmulatedBoards(n)` (what `--peers emu:N` starts) runs musca-b1 boards, each its own QEMU."""
    from tpfed.runtime.emulator import EmulatedBoards

    elf = firmware_elf_of("musca-b1")
    with EmulatedBoards(2, firmware=elf) as boards:
        assert len({b.port for b in boards}) == 2 and len({b.pid for b in boards}) == 2
        names = [link_to(b).hello(device_id=i).payload["name"] for i, b in enumerate(boards, start=1)]
        assert names == ["musca-b1", "musca-b1"]
        pids = [b.pid for b in boards]
    assert all(not _running(pid) for pid in pids), "QEMU left running after the context closed"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_unknown_emulated_board_is_refused():
    from tpfed.runtime.emulator import EmulatedBoards, EmulatorError

    with pytest.raises(EmulatorError, match="not an emulated board; known: lm3s6965evb, musca-b1"):
        EmulatedBoards(1, env="esp32dev")


def test_hello_reports_sane_capabilities(board):
    reply = board.hello(device_id=3)
    assert reply.type == MsgType.HELLO
    assert reply.src == 3 and reply.dst == COORDINATOR
    h = reply.payload
    if board.board is not None:  # emulated: exact figures of lm3s6965evb
        assert h["device_class"] == DeviceClass.CORTEX_M_EMU
        assert h["name"] == "lm3s6965evb"
        assert (h["ram_kb"], h["flash_kb"], h["psram_kb"], h["cpu_mhz"]) == (64, 256, 0, 12)
        assert h["cores"] == 1 and h["features"] == 0
        assert 16 <= h["arena_kb"] < 64
    assert h["transports"] & TransportKind.SERIAL
    assert h["max_frame"] >= 256
    assert 10_000 <= h["int8_macs"] <= 10**11, h["int8_macs"]
    assert h["arena_kb"] * 1024 <= h["ram_kb"] * 1024 + h["psram_kb"] * 1024


def test_heartbeat_and_probe(board):
    board.hello(device_id=2)
    hb = board.request(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=2))
    assert hb.type == MsgType.HEARTBEAT and hb.payload["uptime_ms"] > 0
    probe = {"nonce": 77, "t_send_us": 123456789, "pad": bytes(range(256)) * 3}
    reply = board.request(Frame(MsgType.PROBE, probe, dst=2, seq=4242))
    assert reply.type == MsgType.PROBE_REPLY and reply.seq == 4242
    assert reply.payload["pad"] == probe["pad"] and reply.payload["nonce"] == 77


# ----------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def q8_model(stories260k_dir):
    from tpfed.compute.int8_forward import Q8Model

    return Q8Model.load(stories260k_dir / "stories260K.bin")


def _assign(model, entries, seq_len=64, session=1, device_id=1):
    c = model.config
    payload = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
               "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": seq_len,
               "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
               "entries": [{"layer": layer, "kv_groups": list(g),
                            "mlp_ranges": [{"start": a, "end": b} for a, b in r]}
                           for layer, (g, r) in sorted(entries.items())]}
    return Frame(MsgType.ASSIGN, payload, dst=device_id, session=session)


def _push(board, layer, blob, digest, session=1, device_id=1, chunk=896):  # 14 granules of 64
    for off in range(0, len(blob), chunk):
        board.send(Frame(MsgType.WEIGHTS, {"shard_id": layer, "offset": off, "total": len(blob),
                                           "sha256": digest, "data": blob[off:off + chunk]},
                         dst=device_id, session=session))


def test_corrupted_shard_is_refused(board, q8_model):
    from tpfed.compute.share import serialize_layer_share

    board.hello(device_id=1)
    assert board.request(_assign(q8_model, {0: ((1,), ())})).type == MsgType.ACK
    blob = serialize_layer_share(q8_model, 0, (1,), ())
    digest = hashlib.sha256(blob).digest()
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40
    _push(board, 0, bytes(bad), digest)
    reply = board.recv()
    assert reply.type == MsgType.ERROR
    assert reply.payload["code"] == ErrorCode.SHARD_HASH_MISMATCH, reply.payload
    assert "layer 0" in reply.payload["text"]
    # The intact shard is then taken: ACK, and READY since it is the only one.
    _push(board, 0, blob, digest)
    got = [board.recv(), board.recv()]
    assert [f.type for f in got] == [MsgType.ACK, MsgType.READY], got
    assert got[1].payload["shard_bytes"] == len(blob)


def test_shard_consistent_hash_but_wrong_content_is_refused(board, q8_model):
    from tpfed.compute.share import serialize_layer_share

    board.hello(device_id=1)
    assert board.request(_assign(q8_model, {2: ((), ((0, 32),))})).type == MsgType.ACK
    blob = bytearray(serialize_layer_share(q8_model, 2, (), ((0, 32),)))
    blob[8] = 3  # claims to be layer 3; the hash is computed over the lie
    _push(board, 2, bytes(blob), hashlib.sha256(blob).digest())
    reply = board.recv()
    assert reply.type == MsgType.ERROR and reply.payload["code"] == ErrorCode.BAD_PAYLOAD
    assert "does not hold what ASSIGN said" in reply.payload["text"]


def test_assignment_larger_than_the_arena_is_refused(board, q8_model):
    hello = board.hello(device_id=1).payload
    c = q8_model.config
    everything = {layer: (tuple(range(c.n_kv_heads)), ((0, c.hidden_dim),)) for layer in range(c.n_layers)}
    reply = board.request(_assign(q8_model, everything, seq_len=512))
    assert reply.type == MsgType.ERROR and reply.payload["code"] == ErrorCode.OUT_OF_MEMORY
    assert "arena" in reply.payload["text"] and hello["arena_kb"] < 64


def _partials(board, model, entries, steps, seq_len=64):
    """Push ``entries``, run ``steps`` (layer, stage, pos, x) and return board and host partials."""
    from tpfed.protocol.schema import Stage

    from tpfed.compute.kernels import Q8Tensor, quantize_q8_0
    from tpfed.compute.share import DeviceShards, serialize_layer_share

    board.hello(device_id=1)
    assert board.request(_assign(model, entries, seq_len=seq_len)).type == MsgType.ACK
    for layer, (g, r) in sorted(entries.items()):
        blob = serialize_layer_share(model, layer, g, r)
        _push(board, layer, blob, hashlib.sha256(blob).digest())
    frames = board.drain(quiet=2.0)
    assert [f.type for f in frames] == [MsgType.ACK] * len(entries) + [MsgType.READY], frames

    host = DeviceShards(_with_seq_len(model, seq_len), entries)
    got, want = [], []
    for layer, stage, pos, xf in steps:
        x: Q8Tensor = quantize_q8_0(xf)
        payload = {"layer": layer, "stage": int(stage), "pos": pos, "n": len(xf),
                   "scales": x.d.tolist(), "qs": x.qs.tolist()}
        reply = board.request(Frame(MsgType.ACTIVATION, payload, dst=1, session=1))
        assert reply.type == MsgType.PARTIAL, reply.payload
        got.append(np.asarray(reply.payload["data"], np.float32))
        part = host.attention(layer, x, pos) if stage == Stage.ATTENTION else host.mlp(layer, x)
        want.append(part.copy())
    return got, want


def _with_seq_len(model, seq_len):
    from dataclasses import replace

    class View:
        config = replace(model.config, seq_len=seq_len)
        params = getattr(model, "params", None)
        attention_unit = staticmethod(model.attention_unit)
        mlp_unit = staticmethod(model.mlp_unit)

    return View()


def _steps(config, rng, n=6):
    from tpfed.protocol.schema import Stage

    steps = []
    for pos in range(n):
        steps.append((0, Stage.ATTENTION, pos, rng.standard_normal(config.dim).astype(np.float32)))
        steps.append((0, Stage.MLP, pos, rng.standard_normal(config.dim).astype(np.float32)))
    return steps


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_partials_follow_the_host_computation(board, q8_model):
    """The board computes what host/tpfed/shard.py computes (to float rounding)."""
    entries = {0: ((0, 2), ((32, 96), (160, 172)))}
    got, want = _partials(board, q8_model, entries, _steps(q8_model.config, np.random.default_rng(5)))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_partials_are_bit_identical_to_the_host(board, q8_model):
    """Same kernels, same order of operations: the partials must match bit for bit."""
    entries = {0: ((1, 3), ((0, 64),))}
    got, want = _partials(board, q8_model, entries, _steps(q8_model.config, np.random.default_rng(9)))
    worst = max(_ulps(g, w) for g, w in zip(got, want, strict=True))
    assert worst == 0, f"board partials differ from the host's by up to {worst} ULP"


# One board's quarter of stories260K as `--peers emu:4` hands it out: every layer, one of the 4
# KV groups, the larger quarter of the 172 hidden columns (ranges start on 32-column blocks:
# 32 + the last 12 = 44), and a KV cache for 256 positions.
QUARTER_SEQ_LEN = 256
QUARTER = {layer: ((3,), ((128, 172),)) for layer in range(5)}


def test_musca_b1_takes_a_stories260k_quarter_share(musca_board, q8_model):
    """A musca-b1 stores a real quarter share with its KV cache and answers every layer with
    the host's partials, bit for bit."""
    from tpfed.protocol.schema import Stage

    from tpfed.compute.kernels import quantize_q8_0
    from tpfed.compute.share import DeviceShards, kv_cache_nbytes, serialize_layer_share

    board = musca_board
    hello = board.hello(device_id=1).payload
    assert board.request(_assign(q8_model, QUARTER, seq_len=QUARTER_SEQ_LEN)).type == MsgType.ACK
    blobs = {layer: serialize_layer_share(q8_model, layer, g, r) for layer, (g, r) in QUARTER.items()}
    for layer, blob in blobs.items():
        _push(board, layer, blob, hashlib.sha256(blob).digest())
    frames = board.drain(quiet=2.0)
    assert [f.type for f in frames] == [MsgType.ACK] * len(QUARTER) + [MsgType.READY], frames
    ready = frames[-1].payload
    weights = sum(len(b) for b in blobs.values())
    kv = len(QUARTER) * kv_cache_nbytes(q8_model.config, 1, QUARTER_SEQ_LEN)
    assert ready["shard_bytes"] == weights
    # Weights and KV cache, plus frame and compute buffers of a few KiB; room left over.
    assert weights + kv <= ready["arena_used"] <= weights + kv + 16 * 1024, ready
    assert ready["arena_free"] > 0 and hello["arena_kb"] * 1024 >= weights + kv

    host = DeviceShards(_with_seq_len(q8_model, QUARTER_SEQ_LEN), QUARTER)
    rng = np.random.default_rng(260)
    # Positions 0-2 in every layer, then the last position: attention over the whole cache.
    for pos in (0, 1, 2, QUARTER_SEQ_LEN - 1):
        for layer in range(len(QUARTER)):
            for stage in (Stage.ATTENTION, Stage.MLP):
                xf = rng.standard_normal(q8_model.config.dim).astype(np.float32)
                x = quantize_q8_0(xf)
                payload = {"layer": layer, "stage": int(stage), "pos": pos, "n": len(xf),
                           "scales": x.d.tolist(), "qs": x.qs.tolist()}
                reply = board.request(Frame(MsgType.ACTIVATION, payload, dst=1, session=1))
                assert reply.type == MsgType.PARTIAL, reply.payload
                got = np.asarray(reply.payload["data"], np.float32)
                want = host.attention(layer, x, pos) if stage == Stage.ATTENTION else host.mlp(layer, x)
                assert got.shape == want.shape
                worst = _ulps(got, want)
                assert worst == 0, f"layer {layer} {stage.name} pos {pos}: {worst} ULP off the host"
    assert board.board.alive(), board.board.output()


def _geometry_assign(dim, session=1, device_id=1):
    """An ASSIGN of a one-head model of width ``dim`` with nothing to hold."""
    payload = {"dim": dim, "hidden_dim": 32, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1,
               "seq_len": 8, "norm_eps": 1e-5, "rope_theta": 10000.0, "entries": []}
    return Frame(MsgType.ASSIGN, payload, dst=device_id, session=session)


def test_assign_whose_frames_do_not_fit_the_board_is_refused(board):
    """A PARTIAL is 8 + 4*dim bytes of payload (and every frame has the AUTH trailer): the widest
    model whose frames still fit is taken, one value wider is refused up front rather than never
    answered."""
    max_frame = board.hello(device_id=1).payload["max_frame"]
    overhead = HEADER_SIZE + AUTH_TRAILER_SIZE + CRC_SIZE
    widest = (max_frame - overhead - 8) // 4
    assert board.request(_geometry_assign(widest)).type == MsgType.ACK
    reply = board.request(_geometry_assign(widest + 1))
    assert reply.type == MsgType.ERROR and reply.payload["code"] == ErrorCode.UNSUPPORTED
    need = overhead + 8 + 4 * (widest + 1)
    assert reply.payload["text"] == \
        f"dim {widest + 1} needs frames of {need} bytes, this board takes {max_frame}"


def test_bye_of_another_session_leaves_the_board_serving(board, q8_model):
    """BYE ends only the session it names: one of another session (sealed with the right key)
    is dropped, the board keeps its share and answers; a BYE of its own session then ends the
    session, and nothing more is answered in it."""
    from tpfed.protocol.schema import Stage

    entries = {0: ((1,), ((0, 32),))}
    x = np.random.default_rng(11).standard_normal(q8_model.config.dim).astype(np.float32)
    got, want = _partials(board, q8_model, entries, [(0, Stage.MLP, 0, x)])
    board.send_sealed_as(Frame(MsgType.BYE, {"reason": int(ByeReason.NORMAL)}, dst=1), session=2)
    assert board.drain(quiet=0.5) == []
    got2, _ = _activation(board, q8_model, Stage.MLP, x)
    assert got2.type == MsgType.PARTIAL, got2.payload
    assert _ulps(np.asarray(got2.payload["data"], np.float32), want[0]) == 0
    assert _ulps(got[0], want[0]) == 0
    board.send(Frame(MsgType.BYE, {"reason": int(ByeReason.NORMAL)}, dst=1, session=1))
    with pytest.raises(TimeoutError):
        _activation(board, q8_model, Stage.MLP, x, timeout=1.0)
    # A new handshake (the old session is over, so no BUSY) serves again, from scratch.
    board.handshake(device_id=1, session=3)
    reply, _ = _activation(board, q8_model, Stage.MLP, x, session=3)
    assert reply.type == MsgType.ERROR and reply.payload["code"] == ErrorCode.BAD_STATE


def _activation(board, model, stage, xf, layer=0, pos=0, session=1, timeout=5.0):
    from tpfed.compute.kernels import quantize_q8_0

    x = quantize_q8_0(xf)
    payload = {"layer": layer, "stage": int(stage), "pos": pos, "n": len(xf),
               "scales": x.d.tolist(), "qs": x.qs.tolist()}
    return board.request(Frame(MsgType.ACTIVATION, payload, dst=1, session=session), timeout), x


def test_garbage_on_the_uart_never_crashes_the_board(board):
    from tpfed.protocol.codec import encode_frame
    from tpfed.protocol.framing import StreamFramer

    rng = np.random.default_rng(2024)
    before = board.hello(device_id=1)
    good = encode_frame(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=1))
    noise = [
        rng.integers(0, 256, 20000, dtype=np.uint8).tobytes(),                 # line noise
        b"\x00" * 500,                                                         # delimiters only
        StreamFramer.encode(good[:-1] + bytes([good[-1] ^ 1])),                # bad CRC
        StreamFramer.encode(good[:7]),                                         # truncated
        StreamFramer.encode(bytes([0xA7, 0x10, 0x03, 0, 0, 1, 0, 0, 0, 0, 0xFF, 0xFF])),  # length lie
        StreamFramer.encode(b"\xa7" + bytes(3000)),                            # over max_frame
        b"\xff" * 5000,                                                        # one endless segment
        StreamFramer.encode(bytes([0xA7, 0x20]) + bytes(20)),                  # other major version
    ]
    for blob in noise:
        board.send_raw(blob)
    board.send_raw(b"\x00")
    board.drain(quiet=0.5)  # answers to anything that happened to parse are fine
    after = board.hello(device_id=1)
    assert after.type == MsgType.HELLO
    if board.board is not None:
        assert board.board.alive(), board.board.output()
    hb = board.request(Frame(MsgType.HEARTBEAT, {"uptime_ms": 0, "load_pct": 0}, dst=1))
    assert hb.payload["uptime_ms"] > 0 and before.payload == after.payload


# ----------------------------------------------------------------------------- authentication


COORDINATOR_HELLO = {  # what tests/hil/conftest.py's links send
    "device_class": 0, "name": "coordinator", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
    "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
    "temperature_dc": -32768, "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0,
}


def _unsealed(frame: Frame) -> bytes:
    return b"\x00" + StreamFramer.encode(encode_frame(frame))


def test_unkeyed_board_answers_nothing_until_provisioned(board):
    """A board built without a key drops everything (a handshake included) until PROVISION;
    then it takes no other key, and the handshake with its key works."""
    if board.board is None:
        pytest.skip("a real board may have been flashed with a key")
    from tpfed.runtime.emulator import EmulatorError, provision

    hs = auth.CoordinatorHandshake(board.key, 1, session_id=1)
    for _ in range(3):  # the first bytes may be lost before the UART FIFO is on
        board.send(Frame(MsgType.AUTH, hs.challenge(), dst=1, session=1))
        assert board.drain(quiet=0.7) == []
    board.provision()
    with pytest.raises(EmulatorError, match="did not take its key"):
        provision(board.ser, auth.new_key(), attempts=1, timeout=0.7)
    assert board.hello(device_id=1).type == MsgType.HELLO


def _raw_reply(board, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while not board.pending:
        assert time.monotonic() < deadline, "no frame from the board"
        board.pending += board.framer.feed(board.ser.read(max(1, board.ser.in_waiting)))
    return board.pending.pop(0)


def test_board_drops_unauthenticated_replayed_and_wrongly_keyed_frames(board):
    """Unsealed frames, replays of sealed ones and a handshake with another key get no answer
    at all; a second coordinator with the key gets BUSY in one line."""
    from tpfed.protocol.codec import decode_frame

    board.hello(device_id=1)
    heartbeat = {"uptime_ms": 0, "load_pct": 0}
    board.send_raw(_unsealed(Frame(MsgType.HELLO, dict(COORDINATOR_HELLO), dst=1, session=1)))
    board.send_raw(_unsealed(Frame(MsgType.HEARTBEAT, heartbeat, dst=1, session=1)))
    assert board.drain(quiet=0.7) == []
    # A sealed HEARTBEAT is answered; the very same bytes again are not.
    sealed = board.session.seal(encode_frame(Frame(MsgType.HEARTBEAT, heartbeat, dst=1, seq=77, session=1)))
    board.send_raw(b"\x00" + StreamFramer.encode(sealed))
    assert board.recv().type == MsgType.HEARTBEAT
    board.send_raw(b"\x00" + StreamFramer.encode(sealed))
    assert board.drain(quiet=0.7) == []
    # Another key: its RESPONSE does not verify for that key, and a CONFIRM gets no answer.
    other = auth.CoordinatorHandshake(auth.new_key(), 1, session_id=9)
    resp = board.request(Frame(MsgType.AUTH, other.challenge(), dst=1, session=9))
    assert resp.type == MsgType.AUTH
    with pytest.raises(auth.AuthError):
        other.on_response(resp.payload)
    board.send(Frame(MsgType.AUTH, auth.confirm(bytes(32)), dst=1, session=9))
    assert board.drain(quiet=0.7) == []
    # A second coordinator with the key while this session is live: ERROR BUSY, sealed with its
    # own new session key; the first session still answers.
    second = auth.CoordinatorHandshake(board.key, 1, session_id=10)
    resp = board.request(Frame(MsgType.AUTH, second.challenge(), dst=1, session=10))
    board.send(Frame(MsgType.AUTH, second.on_response(resp.payload), dst=1, session=10))
    raw = _raw_reply(board)
    second.session.open(raw)
    busy = decode_frame(raw)
    assert busy.type == MsgType.ERROR and busy.payload["code"] == ErrorCode.BUSY
    assert busy.payload["text"] == "peer busy with another session"
    assert board.request(Frame(MsgType.HEARTBEAT, heartbeat, dst=1)).type == MsgType.HEARTBEAT
    if board.board is not None:
        assert board.board.alive(), board.board.output()
