"""Typed numpy wrappers over the C kernels in ``tpfed.compute._native`` (firmware/lib/tpfed).

Arrays are handed to C without copying: every array must already have the right dtype, be
C-contiguous (a row-strided view where stated) and, for outputs, be writeable; anything else
raises :class:`ValueError` naming the argument. The checks are kept to what C needs to be
memory-safe, because these functions run about a hundred times per generated token.

Q8_0 (see ``tpfed_kernels.h``): blocks of 32 values along the last axis, int8 values plus one
IEEE binary16 scale per block, stored as ``uint16`` bits. A matrix is quantised row by row, so a
row's blocks never straddle two rows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tpfed.compute._native import ffi, lib

Q8_BLOCK: int = lib.TPFED_Q8_BLOCK  # values per Q8_0 scale; the one Python name for it
_INT_MAX = 2**31 - 1

_from_buffer = ffi.from_buffer
_F32 = np.dtype(np.float32)
_I8 = np.dtype(np.int8)
_U16 = np.dtype(np.uint16)


def n_blocks(n: int) -> int:
    """Number of Q8_0 blocks (scales) for ``n`` values."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n + Q8_BLOCK - 1) // Q8_BLOCK


def _check(name: str, a: object, dtype: np.dtype, ndims: tuple[int, ...] | None,
           writeable: bool) -> None:
    """Raise ValueError unless ``a`` is a C-contiguous array of ``dtype`` with one of ``ndims``
    dimensions (any when None), writeable if asked."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {a.dtype}")
    if ndims is not None and a.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    if a.size > _INT_MAX:
        raise ValueError(f"{name} has {a.size} elements, more than the kernels' int range")


def _f32_out(name: str, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if (type(out) is np.ndarray and out.dtype == _F32 and out.shape == shape
            and out.flags.c_contiguous and out.flags.writeable):
        return out  # the common case, checked in one go
    _check(name, out, _F32, (len(shape),), writeable=True)
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    return out


@dataclass(frozen=True)
class Q8Tensor:
    """A Q8_0 vector ``(n,)`` or matrix ``(rows, cols)``: ``qs`` int8 values of that shape and
    ``d`` the fp16 scale bits (uint16) of shape ``(nb,)`` or ``(rows, nb)``, ``nb = n_blocks(cols)``.
    """

    qs: np.ndarray
    d: np.ndarray
    # C pointers to qs and d, made once (they keep the arrays' buffers alive)
    _pqs: object = field(init=False, repr=False, compare=False)
    _pd: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check("Q8Tensor.qs", self.qs, _I8, (1, 2), writeable=False)
        _check("Q8Tensor.d", self.d, _U16, (1, 2), writeable=False)
        want = (*self.qs.shape[:-1], n_blocks(self.qs.shape[-1]))
        if self.d.shape != want:
            raise ValueError(f"Q8Tensor.d must have shape {want} for qs of shape "
                             f"{self.qs.shape}, got {self.d.shape}")
        object.__setattr__(self, "_pqs", _from_buffer("int8_t[]", self.qs))
        object.__setattr__(self, "_pd", _from_buffer("uint16_t[]", self.d))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qs.shape

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes

    def dequantize(self) -> np.ndarray:
        return dequantize_q8_0(self)


def empty_q8_0(shape: int | tuple[int, ...]) -> Q8Tensor:
    """An uninitialised Q8Tensor of ``shape`` ((n,) or (rows, cols))."""
    shp = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
    if len(shp) not in (1, 2) or min(shp) < 0:
        raise ValueError(f"Q8_0 shape must be (n,) or (rows, cols) with sizes >= 0, got {shape}")
    return Q8Tensor(np.empty(shp, dtype=np.int8),
                    np.empty((*shp[:-1], n_blocks(shp[-1])), dtype=np.uint16))


def _q8_rows(fn: Callable, qs: np.ndarray, d: np.ndarray, x: np.ndarray) -> None:
    """``fn(qs_row, d_row, x_row, cols)`` for every row; a single call when rows are whole
    blocks (then a matrix is laid out exactly like one long vector)."""
    cols = x.shape[-1]
    pq = _from_buffer("int8_t[]", qs)
    pd = _from_buffer("uint16_t[]", d)
    px = _from_buffer("float[]", x)
    if x.ndim == 1 or cols % Q8_BLOCK == 0:
        fn(pq, pd, px, x.size)
        return
    nb = d.shape[-1]
    pq, pd, px = ffi.cast("int8_t *", pq), ffi.cast("uint16_t *", pd), ffi.cast("float *", px)
    for r in range(x.shape[0]):
        fn(pq + r * cols, pd + r * nb, px + r * cols, cols)


def _quantize(fn: Callable, x: np.ndarray, out: Q8Tensor | None) -> Q8Tensor:
    _check("x", x, _F32, (1, 2), writeable=False)
    if out is None:
        out = empty_q8_0(x.shape)
    elif out.shape != x.shape:
        raise ValueError(f"out must have shape {x.shape}, got {out.shape}")
    elif not (out.qs.flags.writeable and out.d.flags.writeable):
        raise ValueError("out must be writeable")
    _q8_rows(fn, out.qs, out.d, x)
    return out


def quantize_q8_0(x: np.ndarray, out: Q8Tensor | None = None) -> Q8Tensor:
    """Quantise float32 ``x`` (1-D, or 2-D row by row) to Q8_0 with the selected variant."""
    return _quantize(lib.quantize_q8_0, x, out)


def quantize_q8_0_ref(x: np.ndarray, out: Q8Tensor | None = None) -> Q8Tensor:
    """:func:`quantize_q8_0` with the reference kernel (same bits, slower)."""
    return _quantize(lib.quantize_q8_0_ref, x, out)


def _dequantize(qs: object, d: object, x: object, n: int) -> None:
    lib.dequantize_q8_0(x, qs, d, n)


def dequantize_q8_0(t: Q8Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of ``t`` (same shape): scale * int8 value."""
    out = _f32_out("out", out, t.shape)
    _q8_rows(_dequantize, t.qs, t.d, out)
    return out


def fp16_to_f32(h: np.ndarray) -> np.ndarray:
    """Exact float32 values of uint16 fp16 bit patterns (any shape, C-contiguous)."""
    _check("h", h, _U16, None, writeable=False)
    out = np.empty(h.shape, dtype=np.float32)
    lib.fp16_to_f32_n(_from_buffer("float[]", out), _from_buffer("uint16_t[]", h), h.size)
    return out


def f32_to_fp16(x: np.ndarray) -> np.ndarray:
    """fp16 bit patterns (uint16) of float32 values, round to nearest even; equals numpy's cast."""
    _check("x", x, _F32, None, writeable=False)
    out = np.empty(x.shape, dtype=np.uint16)
    lib.f32_to_fp16_n(_from_buffer("uint16_t[]", out), _from_buffer("float[]", x), x.size)
    return out


# Row splitting across threads: the C call releases the GIL (CFFI API mode), so chunks of rows
# run in parallel. Chunks are multiples of 8 rows (the AVX2 tile).
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1)),
                                       thread_name_prefix="tpfed-matmul")
        return _pool


def _matmul(fn: Callable, w: Q8Tensor, x: Q8Tensor, out: np.ndarray | None,
            threads: int) -> np.ndarray:
    if not (isinstance(w, Q8Tensor) and isinstance(x, Q8Tensor)):
        raise ValueError("w and x must be Q8Tensor (see quantize_q8_0)")
    wqs = w.qs
    if wqs.ndim != 2:
        raise ValueError(f"w must be a (rows, cols) Q8Tensor, got shape {wqs.shape}")
    rows, cols = wqs.shape
    if x.qs.shape != (cols,):
        raise ValueError(f"x must be a Q8Tensor of shape ({cols},), got {x.qs.shape}")
    out = _f32_out("out", out, (rows,))
    po = _from_buffer("float[]", out)
    pw, pwd, px, pxd = w._pqs, w._pd, x._pqs, x._pd
    if threads <= 1 or rows < 16:
        fn(po, pw, pwd, px, pxd, rows, cols)
        return out
    nb = w.d.shape[1]
    chunk = -(-rows // threads)
    chunk += -chunk % 8
    po, pw, pwd = ffi.cast("float *", po), ffi.cast("int8_t *", pw), ffi.cast("uint16_t *", pwd)
    pool = _executor()
    futures: list[Future] = []
    for r0 in range(chunk, rows, chunk):
        n = min(chunk, rows - r0)
        futures.append(pool.submit(fn, po + r0, pw + r0 * cols, pwd + r0 * nb, px, pxd, n, cols))
    try:
        fn(po, pw, pwd, px, pxd, min(chunk, rows), cols)
    finally:
        for f in futures:
            f.result()
    return out


def matmul_q8_0_f32(w: Q8Tensor, x: Q8Tensor, out: np.ndarray | None = None,
                    threads: int = 1) -> np.ndarray:
    """``out[r] = sum_b isum(r, b) * (scale_w[r, b] * scale_x[b])`` for a (rows, cols) Q8_0
    matrix ``w`` and a (cols,) Q8_0 vector ``x``; float32 (rows,). ``threads`` > 1 splits the
    rows across that many threads (same bits: rows are independent)."""
    return _matmul(lib.matmul_q8_0_f32, w, x, out, threads)


def matmul_q8_0_f32_ref(w: Q8Tensor, x: Q8Tensor, out: np.ndarray | None = None,
                        threads: int = 1) -> np.ndarray:
    """:func:`matmul_q8_0_f32` with the reference kernel."""
    return _matmul(lib.matmul_q8_0_f32_ref, w, x, out, threads)


def rmsnorm_f32(x: np.ndarray, w: np.ndarray, eps: float = 1e-5,
                out: np.ndarray | None = None) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps) * w`` for 1-D float32 ``x`` and ``w``; ``out`` may be ``x``."""
    _check("x", x, _F32, (1,), writeable=False)
    _check("w", w, _F32, (1,), writeable=False)
    if w.shape != x.shape:
        raise ValueError(f"w must have shape {x.shape}, got {w.shape}")
    out = _f32_out("out", out, x.shape)
    lib.rmsnorm_f32(_from_buffer("float[]", out), _from_buffer("float[]", x),
                    _from_buffer("float[]", w), x.size, eps)
    return out


def _residual_rmsnorm_q8_0(fn: Callable, x: np.ndarray, partial: np.ndarray | None,
                           w: np.ndarray, eps: float, out: Q8Tensor | None,
                           xb: np.ndarray | None) -> Q8Tensor:
    _check("x", x, _F32, (1,), writeable=True)
    _check("w", w, _F32, (1,), writeable=False)
    if w.shape != x.shape:
        raise ValueError(f"w must have shape {x.shape}, got {w.shape}")
    if partial is not None:
        _check("partial", partial, _F32, (1,), writeable=False)
        if partial.shape != x.shape:
            raise ValueError(f"partial must have shape {x.shape}, got {partial.shape}")
    xb = _f32_out("xb", xb, x.shape)
    if out is None:
        out = empty_q8_0(x.shape)
    elif out.shape != x.shape:
        raise ValueError(f"out must have shape {x.shape}, got {out.shape}")
    elif not (out.qs.flags.writeable and out.d.flags.writeable):
        raise ValueError("out must be writeable")
    fn(_from_buffer("float[]", x), ffi.NULL if partial is None else _from_buffer("float[]", partial),
       _from_buffer("float[]", w), x.size, eps, _from_buffer("float[]", xb), out._pqs, out._pd)
    return out


def residual_rmsnorm_q8_0(x: np.ndarray, partial: np.ndarray | None, w: np.ndarray,
                          eps: float = 1e-5, out: Q8Tensor | None = None,
                          xb: np.ndarray | None = None) -> Q8Tensor:
    """The coordinator's step between stages in one call (``tpfed_residual.h``): ``x +=
    partial`` in place (skipped when None), ``xb = rmsnorm_f32(x, w, eps)``, and ``out`` = Q8_0
    of ``xb``; the same bits as those three steps done separately."""
    return _residual_rmsnorm_q8_0(lib.residual_rmsnorm_q8_0, x, partial, w, eps, out, xb)


def residual_rmsnorm_q8_0_ref(x: np.ndarray, partial: np.ndarray | None, w: np.ndarray,
                              eps: float = 1e-5, out: Q8Tensor | None = None,
                              xb: np.ndarray | None = None) -> Q8Tensor:
    """:func:`residual_rmsnorm_q8_0` with the reference kernel."""
    return _residual_rmsnorm_q8_0(lib.residual_rmsnorm_q8_0_ref, x, partial, w, eps, out, xb)


def softmax_f32(x: np.ndarray) -> np.ndarray:
    """Softmax of 1-D float32 ``x`` in place (max subtracted); returns ``x``."""
    _check("x", x, _F32, (1,), writeable=True)
    lib.softmax_f32(_from_buffer("float[]", x), x.size)
    return x


def rope_f32(x: np.ndarray, head_size: int, pos: int, theta: float = 10000.0) -> np.ndarray:
    """llama2.c RoPE in place on float32 ``x`` of shape (n,) or (heads, head_size), n a multiple
    of ``head_size``: interleaved pairs (x[i], x[i+1]) rotated by
    ``pos * theta ** -((i % head_size) / head_size)``. Returns ``x``."""
    _check("x", x, _F32, (1, 2), writeable=True)
    if head_size <= 0 or head_size % 2:
        raise ValueError(f"head_size must be even and > 0, got {head_size}")
    if x.size % head_size or (x.ndim == 2 and x.shape[1] != head_size):
        raise ValueError(f"x of shape {x.shape} is not made of heads of {head_size}")
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    lib.rope_f32(_from_buffer("float[]", x), x.size, head_size, pos, theta)
    return x


def silu_f32(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` in place on a C-contiguous float32 array; returns ``x``."""
    _check("x", x, _F32, None, writeable=True)
    lib.silu_f32(_from_buffer("float[]", x), x.size)
    return x


def swiglu_f32(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``silu(gate) * up`` (float32, same shape, C-contiguous); ``out`` may be gate or up."""
    _check("gate", gate, _F32, (1, 2), writeable=False)
    _check("up", up, _F32, (1, 2), writeable=False)
    if up.shape != gate.shape:
        raise ValueError(f"up must have shape {gate.shape}, got {up.shape}")
    out = _f32_out("out", out, gate.shape)
    lib.swiglu_f32(_from_buffer("float[]", out), _from_buffer("float[]", gate),
                   _from_buffer("float[]", up), gate.size)
    return out


def _row_view_ptr(name: str, a: np.ndarray, head_size: int, rows: int) -> tuple[object, int]:
    """Pointer to a (>= rows, head_size) float32 view whose rows are contiguous, and its row
    stride in floats."""
    if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D float32 array (rows, head_size)")
    if a.shape[1] != head_size or a.shape[0] < rows:
        raise ValueError(f"{name} must have shape (>= {rows}, {head_size}), got {a.shape}")
    if a.strides[1] != 4:
        raise ValueError(f"{name} rows must be contiguous (inner stride 4 bytes)")
    stride = a.strides[0]
    if rows > 1 and (stride % 4 or stride < 4 * head_size):
        raise ValueError(f"{name} row stride must be a positive multiple of 4 bytes covering a "
                         f"whole row, got {stride}")
    # row 0 is contiguous, so it exports a buffer; the C code walks on from it by the row stride
    return _from_buffer("float[]", a[0]), stride // 4 if rows > 1 else head_size


def attention_f32(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
                  out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Attention of the query heads ``q`` (n_q, head_size) that share one KV head, at ``pos``.

    ``k_cache`` and ``v_cache`` are (rows >= pos + 1, head_size) float32 views with contiguous
    rows and the same row stride, e.g. ``cache[layer, :, kvh * hs:(kvh + 1) * hs]`` of a
    (layers, seq_len, kv_dim) cache. ``scratch`` holds >= pos + 1 float32 (allocated if None).
    Returns ``out`` (n_q, head_size)."""
    _check("q", q, _F32, (2,), writeable=False)
    n_q, head_size = q.shape
    if pos < 0:
        raise ValueError(f"pos must be >= 0, got {pos}")
    pk, ks = _row_view_ptr("k_cache", k_cache, head_size, pos + 1)
    pv, vs = _row_view_ptr("v_cache", v_cache, head_size, pos + 1)
    if ks != vs:
        raise ValueError(f"k_cache and v_cache must have the same row stride ({ks} != {vs})")
    out = _f32_out("out", out, q.shape)
    if scratch is None:
        scratch = np.empty(pos + 1, dtype=np.float32)
    else:
        _check("scratch", scratch, _F32, (1,), writeable=True)
        if scratch.size < pos + 1:
            raise ValueError(f"scratch must hold >= {pos + 1} floats, got {scratch.size}")
    lib.attention_f32(_from_buffer("float[]", out), _from_buffer("float[]", q), pk, pv,
                      n_q, head_size, pos, ks, _from_buffer("float[]", scratch))
    return out


_VARIANT = ffi.string(lib.tpfed_kernels_variant()).decode()


def variant() -> str:
    """Name of the matmul/quantize variant this build runs ("avx2", "ref", ...)."""
    return _VARIANT
