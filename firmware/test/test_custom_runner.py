"""PlatformIO custom test runner (test_framework = custom): firmware unit tests under QEMU.

`pio test -e lm3s6965evb` builds the test firmware (test/<suite>/ + the port + lib/tpfed),
then this runner boots it in QEMU (or, with `--test-port`, talks to a real board on that
serial port), sends kernel requests over the UART and checks each answer bit for bit against
the host's CFFI build of the same C sources (tpfed.compute._native). Each check is one test case.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time

import numpy as np
from cobs import cobs
from platformio.public import TestCase, TestRunnerBase, TestStatus

OP_INFO, OP_QUANTIZE, OP_MATMUL, OP_SWIGLU, OP_ATTENTION = 0x01, 0x02, 0x03, 0x04, 0x05
OP_ROPE, OP_RMSNORM, OP_SOFTMAX, OP_SHA256, OP_DEQUANTIZE, OP_BAD = 0x06, 0x07, 0x08, 0x09, 0x0A, 0xEE
OP_MATH = 0x0B  # the portable exp/log/sincos of tpfed_math.h the kernels are built on

# stories260K shapes (dim 64, hidden 172, head 8, 2 query heads per KV head) and odd ones.
MATMUL_SHAPES = [(64, 64), (32, 64), (172, 64), (64, 172), (64, 16), (7, 33), (1, 31), (3, 100)]
VECTOR_LENGTHS = [1, 16, 31, 32, 33, 64, 172, 300]


class KernelLink:
    """Request/response over a COBS-framed byte stream."""

    def __init__(self, ser) -> None:
        self.ser = ser
        self.buf = bytearray()

    def call(self, op: int, payload: bytes, timeout: float = 10.0) -> bytes:
        # A leading delimiter ends whatever partial segment line noise left in the decoder.
        self.ser.write(b"\x00" + cobs.encode(bytes([op]) + payload) + b"\x00")
        deadline = time.monotonic() + timeout
        while b"\x00" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to op 0x{op:02x} within {timeout} s")
            self.buf += self.ser.read(max(1, self.ser.in_waiting))
        frame, _, rest = bytes(self.buf).partition(b"\x00")
        self.buf = bytearray(rest)
        reply = cobs.decode(frame)
        if op == OP_BAD and reply == bytes([OP_BAD]):
            return b""
        if not reply or reply[0] != op:
            raise AssertionError(f"op 0x{op:02x}: board answered {reply[:1].hex() or 'nothing'}")
        return reply[1:]


def differs(what: str, got: bytes, want: bytes) -> str:
    """Failure message for float32 results: how many values differ and by how many ULP."""
    if len(got) != len(want):
        return f"{what}: {len(got)} bytes from the board, {len(want)} expected"
    g = np.frombuffer(got, np.int32).astype(np.int64)
    w = np.frombuffer(want, np.int32).astype(np.int64)
    bad = g != w
    return f"{what}: {int(bad.sum())} of {len(g)} values differ, by up to {int(np.abs(g - w).max())} ULP"


class Host:
    """The host's CFFI build of the kernels."""

    def __init__(self) -> None:
        from tpfed.compute._native import ffi, lib

        self.ffi, self.lib = ffi, lib

    def p(self, ctype: str, a: np.ndarray):
        return self.ffi.cast(ctype, self.ffi.from_buffer(a))

    def quantize(self, x: np.ndarray) -> bytes:
        n = len(x)
        qs, d = np.empty(n, np.int8), np.empty((n + 31) // 32, np.uint16)
        self.lib.quantize_q8_0(self.p("int8_t *", qs), self.p("uint16_t *", d), self.p("float *", x), n)
        return qs.tobytes() + d.tobytes()

    def matmul(self, wqs, wd, xqs, xd, rows, cols) -> bytes:
        out = np.empty(rows, np.float32)
        self.lib.matmul_q8_0_f32(self.p("float *", out), self.p("int8_t *", wqs), self.p("uint16_t *", wd),
                                 self.p("int8_t *", xqs), self.p("uint16_t *", xd), rows, cols)
        return out.tobytes()


class CustomTestRunner(TestRunnerBase):
    def stage_testing(self):
        if self.options.without_testing:
            return None
        import serial

        from tpfed.runtime.emulator import BoardSpec, EmulatedBoard

        env = self.test_suite.env_name
        port = self.get_test_port()
        board = None
        try:
            if port:
                ser = serial.serial_for_url(port, baudrate=self.get_test_speed() or 115200, timeout=2)
                time.sleep(2.0)  # a real board resets when the port opens
                ser.reset_input_buffer()
            else:
                build_dir = self.project_config.get("platformio", "build_dir")
                elf = os.path.join(build_dir, env, "firmware.elf")
                board = EmulatedBoard(BoardSpec(firmware=elf, name=f"{env}-test")).start()
                ser = board.open_serial()
            self.run_cases(KernelLink(ser), Host())
            ser.close()
        except Exception as exc:  # the whole suite errors out, with the reason
            self.test_suite.add_case(TestCase(name=f"{env}:kernels", status=TestStatus.ERRORED,
                                              message=f"{type(exc).__name__}: {exc}", exception=exc))
        finally:
            if board is not None:
                crashed = board.returncode
                board.stop()
                if crashed is not None:
                    self.test_suite.add_case(TestCase(
                        name=f"{env}:board-alive", status=TestStatus.FAILED,
                        message=f"QEMU exited with {crashed} (the firmware faulted)"))
        self.test_suite.on_finish()
        return None

    # -- the cases ---------------------------------------------------------------------------
    def check(self, name: str, fn) -> None:
        t0 = time.monotonic()
        error = None
        try:
            msg = fn()
            status = TestStatus.PASSED
        except AssertionError as exc:
            status, msg = TestStatus.FAILED, str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as this case's error
            status, msg, error = TestStatus.ERRORED, f"{type(exc).__name__}: {exc}", exc
        case = TestCase(name=name, status=status, message=msg or None, exception=error,
                        duration=time.monotonic() - t0)
        self.test_suite.add_case(case)
        print(f"{self.test_suite.env_name}:{name} {status.name}{': ' + msg if msg else ''}")

    def run_cases(self, link: KernelLink, host: Host) -> None:
        rng = np.random.default_rng(1234)

        def info():
            reply = link.call(OP_INFO, b"")
            hz = struct.unpack_from("<I", reply)[0]
            return f"cpu {hz} Hz, kernels variant {reply[4:].decode()}"

        self.check("info", info)

        def bad_request():
            link.call(OP_BAD, b"")  # unknown op: answered with OP_BAD
            link.ser.write(cobs.encode(bytes([OP_MATMUL, 1])) + b"\x00")
            link.ser.write(b"\x13\x37garbage\x00\x00\xff" * 20)
            link.buf.clear()
            time.sleep(0.2)
            link.ser.reset_input_buffer()
            assert link.call(OP_INFO, b""), "board did not answer after malformed requests"

        def quantize():
            for n in VECTOR_LENGTHS:
                for scale in (1e-3, 1.0, 300.0):
                    x = (rng.standard_normal(n) * scale).astype(np.float32)
                    if n > 3:
                        x[:3] = [0.0, -0.0, x[3] * 2]
                    got = link.call(OP_QUANTIZE, struct.pack("<H", n) + x.tobytes())
                    assert got == host.quantize(x), f"quantize n={n} scale={scale} differs"

        def dequantize():
            for n in VECTOR_LENGTHS:
                q = host.quantize(rng.standard_normal(n).astype(np.float32))
                got = link.call(OP_DEQUANTIZE, struct.pack("<H", n) + q)
                qs = np.frombuffer(q[:n], np.int8).copy()
                d = np.frombuffer(q[n:], np.uint16).copy()
                want = np.empty(n, np.float32)
                host.lib.dequantize_q8_0(host.p("float *", want), host.p("int8_t *", qs),
                                         host.p("uint16_t *", d), n)
                assert got == want.tobytes(), f"dequantize n={n} differs"

        def matmul():
            for rows, cols in MATMUL_SHAPES:
                nb = (cols + 31) // 32
                w = host.quantize((rng.standard_normal(rows * cols) * 0.1).astype(np.float32))
                wqs = np.empty((rows, cols), np.int8)
                wd = np.empty((rows, nb), np.uint16)
                for r in range(rows):  # row-wise quantisation, as the model's weights are
                    row = host.quantize((rng.standard_normal(cols) * 0.1).astype(np.float32))
                    wqs[r] = np.frombuffer(row[:cols], np.int8)
                    wd[r] = np.frombuffer(row[cols:], np.uint16)
                del w
                xq = host.quantize(rng.standard_normal(cols).astype(np.float32))
                xqs = np.frombuffer(xq[:cols], np.int8).copy()
                xd = np.frombuffer(xq[cols:], np.uint16).copy()
                req = struct.pack("<HH", rows, cols) + wqs.tobytes() + wd.tobytes() + xqs.tobytes() + xd.tobytes()
                got = link.call(OP_MATMUL, req)
                assert got == host.matmul(wqs, wd, xqs, xd, rows, cols), f"matmul {rows}x{cols} differs"

        def math():
            def f32(bits) -> np.ndarray:
                return np.asarray(bits, np.uint32).view(np.float32)

            specials = f32([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x33000000,
                            0x3F800000, 0xBF800000, 0x42B17217, 0x42B17218, 0xC2CFF1B4,
                            0xC2CFF1B5, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                            0x7FC00000, 0x7F812345, 0xFFC01234])
            near_pio2 = (np.arange(1, 200) * 163 * np.pi / 2).astype(np.float32)
            inputs = {
                0: [specials, (rng.standard_normal(500) * 40).astype(np.float32),
                    rng.uniform(-104, -87, 500).astype(np.float32)],
                1: [specials, rng.integers(1, 0x7F800000, 500, dtype=np.uint32).view(np.float32),
                    rng.uniform(0.5, 2, 500).astype(np.float32)],
                2: [specials, near_pio2, rng.uniform(-65536, 65536, 250).astype(np.float32),
                    rng.integers(0, 0xFF800000, 250, dtype=np.uint32).view(np.float32)],
            }
            funcs = {0: host.lib.exp_f32_n, 1: host.lib.log_f32_n}
            for fn, arrays in inputs.items():
                for x in arrays:
                    x = np.ascontiguousarray(x, np.float32)
                    got = link.call(OP_MATH, struct.pack("<BH", fn, len(x)) + x.tobytes())
                    if fn == 2:
                        s, c = np.empty_like(x), np.empty_like(x)
                        host.lib.sincos_f32_n(host.p("float *", s), host.p("float *", c),
                                              host.p("float *", x), len(x))
                        want = s.tobytes() + c.tobytes()
                    else:
                        y = np.empty_like(x)
                        funcs[fn](host.p("float *", y), host.p("float *", x), len(x))
                        want = y.tobytes()
                    name = ("exp_f32", "log_f32", "sincos_f32")[fn]
                    assert got == want, differs(f"{name} n={len(x)}", got, want)

        def swiglu():
            for n in VECTOR_LENGTHS:
                for scale in (4, 40):  # 40: exp(-g) overflows to inf and underflows
                    g = (rng.standard_normal(n) * scale).astype(np.float32)
                    u = rng.standard_normal(n).astype(np.float32)
                    got = link.call(OP_SWIGLU, struct.pack("<H", n) + g.tobytes() + u.tobytes())
                    want = g.copy()
                    host.lib.swiglu_f32(host.p("float *", want), host.p("float *", g), host.p("float *", u), n)
                    assert got == want.tobytes(), differs(f"swiglu n={n} scale={scale}", got, want.tobytes())

        def softmax():
            for n in VECTOR_LENGTHS:
                for scale in (5, 40):  # 40: exp of large negative arguments, subnormal results
                    x = (rng.standard_normal(n) * scale).astype(np.float32)
                    got = link.call(OP_SOFTMAX, struct.pack("<H", n) + x.tobytes())
                    want = x.copy()
                    host.lib.softmax_f32(host.p("float *", want), n)
                    assert got == want.tobytes(), differs(f"softmax n={n} scale={scale}", got, want.tobytes())

        def attention():
            for n_q, hs, pos in ((2, 8, 0), (2, 8, 5), (2, 8, 63), (1, 16, 20), (4, 8, 100)):
                q = rng.standard_normal(n_q * hs).astype(np.float32)
                k = rng.standard_normal((pos + 1) * hs).astype(np.float32)
                v = rng.standard_normal((pos + 1) * hs).astype(np.float32)
                got = link.call(OP_ATTENTION, struct.pack("<HHH", n_q, hs, pos) + q.tobytes() + k.tobytes() + v.tobytes())
                want = np.empty(n_q * hs, np.float32)
                scratch = np.empty(pos + 1, np.float32)
                host.lib.attention_f32(host.p("float *", want), host.p("float *", q), host.p("float *", k),
                                       host.p("float *", v), n_q, hs, pos, hs, host.p("float *", scratch))
                assert got == want.tobytes(), differs(f"attention n_q={n_q} hs={hs} pos={pos}", got, want.tobytes())

        def rope():
            for n, hs, pos, theta in ((64, 8, 0, 1e4), (64, 8, 1, 1e4), (32, 8, 511, 1e4),
                                      (16, 16, 77, 1e4), (64, 64, 4097, 5e5), (16, 8, 65535, 1e4)):
                x = rng.standard_normal(n).astype(np.float32)
                got = link.call(OP_ROPE, struct.pack("<HHHf", n, hs, pos, theta) + x.tobytes())
                want = x.copy()
                host.lib.rope_f32(host.p("float *", want), n, hs, pos, theta)
                assert got == want.tobytes(), differs(f"rope n={n} hs={hs} pos={pos}", got, want.tobytes())

        def rmsnorm():
            for n in VECTOR_LENGTHS:
                x = (rng.standard_normal(n) * 3).astype(np.float32)
                w = rng.standard_normal(n).astype(np.float32)
                got = link.call(OP_RMSNORM, struct.pack("<Hf", n, 1e-5) + x.tobytes() + w.tobytes())
                want = np.empty(n, np.float32)
                host.lib.rmsnorm_f32(host.p("float *", want), host.p("float *", x), host.p("float *", w), n, 1e-5)
                assert got == want.tobytes(), differs(f"rmsnorm n={n}", got, want.tobytes())

        def sha256():
            for n in (0, 1, 55, 56, 64, 65, 1000, 9000):
                data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                got = link.call(OP_SHA256, data)
                assert got == hashlib.sha256(data).digest(), f"sha256 of {n} bytes differs"

        for name, fn in (("quantize", quantize), ("dequantize", dequantize), ("matmul", matmul),
                         ("math", math), ("swiglu", swiglu), ("softmax", softmax), ("attention", attention),
                         ("rope", rope), ("rmsnorm", rmsnorm), ("sha256", sha256),
                         ("bad_request", bad_request)):
            self.check(name, fn)
