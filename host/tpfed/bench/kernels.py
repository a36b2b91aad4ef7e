"""Kernel benchmark: the int8 (Q8_0) matrix-vector product against numpy's float32 one, and the
machine's memory bandwidth, all measured in one run so the figures are comparable.

- int8 gemv: :func:`tpfed.compute.kernels.matmul_q8_0_f32` on a (rows, cols) Q8_0 matrix; the bytes it
  reads per call are the int8 weights, their fp16 scales and the Q8_0 input vector.
- numpy f32 gemv: ``W @ x`` with float32 W and x (numpy's BLAS, multithreaded as configured).
- memory bandwidth: ``np.copyto`` between two buffers of ``copy_bytes`` each (much larger than
  the last-level cache, so this is DRAM); counts the bytes read plus the bytes written
  (2 x copy_bytes) per copy. It does not count write-allocate traffic, which large copies avoid
  with streaming stores. One thread (numpy copies on one). Note that the gemv's weights may fit
  in the last-level cache (17 MiB for 4096 x 4096; the f32 matrix is 64 MiB), in which case the
  gemv streams them from cache, not DRAM, across repeats.

Every time is the median of ``repeat`` calls after warm-up calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from tpfed.compute import kernels

COPY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KernelBench:
    rows: int
    cols: int
    variant: str
    threads: int
    repeat: int
    int8_gemv_ms: float
    int8_gemv_1thread_ms: float
    numpy_f32_gemv_ms: float
    speedup_vs_numpy_f32: float
    int8_gemv_gbps: float
    memory_bandwidth_gbps: float
    int8_bytes_per_gemv: int
    f32_bytes_per_gemv: int
    copy_bytes: int
    max_rel_error: float

    @property
    def bandwidth_fraction(self) -> float:
        return self.int8_gemv_gbps / self.memory_bandwidth_gbps

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth_gbps(nbytes: int = COPY_BYTES, repeat: int = 5) -> float:
    """Read + write GB/s of one large ``np.copyto`` (see the module docstring)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)  # both touched: no page faults inside the timed copies
    t = median_seconds(lambda: np.copyto(dst, src), repeat, warmup=1)
    return 2 * nbytes / t / 1e9


def run_kernel_bench(rows: int = 4096, cols: int = 4096, repeat: int = 20, threads: int = 1,
                     seed: int = 0, copy_bytes: int = COPY_BYTES) -> KernelBench:
    if rows < 1 or cols < 1 or repeat < 1 or threads < 1:
        raise ValueError("rows, cols, repeat and threads must be >= 1")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal(cols, dtype=np.float32)
    wq = kernels.quantize_q8_0(w)
    xq = kernels.quantize_q8_0(x)
    out = np.empty(rows, dtype=np.float32)
    f32_out = np.empty(rows, dtype=np.float32)

    int8_bytes = wq.nbytes + xq.nbytes

    t_int8 = median_seconds(lambda: kernels.matmul_q8_0_f32(wq, xq, out, threads=threads), repeat)
    t_int8_1 = (t_int8 if threads == 1 else
                median_seconds(lambda: kernels.matmul_q8_0_f32(wq, xq, out), repeat))
    t_f32 = median_seconds(lambda: np.matmul(w, x, out=f32_out), repeat)
    bandwidth = copy_bandwidth_gbps(copy_bytes, repeat=max(3, min(repeat, 7)))

    ref = w.astype(np.float64) @ x.astype(np.float64)
    max_rel_error = float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))
    return KernelBench(
        rows=rows,
        cols=cols,
        variant=kernels.variant(),
        threads=threads,
        repeat=repeat,
        int8_gemv_ms=t_int8 * 1e3,
        int8_gemv_1thread_ms=t_int8_1 * 1e3,
        numpy_f32_gemv_ms=t_f32 * 1e3,
        speedup_vs_numpy_f32=t_f32 / t_int8,
        int8_gemv_gbps=int8_bytes / t_int8 / 1e9,
        memory_bandwidth_gbps=bandwidth,
        int8_bytes_per_gemv=int8_bytes,
        f32_bytes_per_gemv=w.nbytes + x.nbytes,
        copy_bytes=copy_bytes,
        max_rel_error=max_rel_error,
    )
