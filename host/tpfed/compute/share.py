"""The int8 units a device can own, their computation, and their wire format.

A layer splits into *units*:

* an **attention unit** per KV group ``g`` (one KV head and the ``group_size`` query heads that
  share it; ``gq = group_size * head_size``, ``hs = head_size``):
  ``wq`` rows ``[g*gq, (g+1)*gq)``, ``wk`` and ``wv`` rows ``[g*hs, (g+1)*hs)`` (all (out, dim),
  quantised row-wise), and the ``wo`` columns ``[g*gq, (g+1)*gq)`` quantised as their own
  ``(dim, gq)`` matrix. The group's attention output is quantised on its own, blocks of 32
  within the group (a group narrower than 32 is one short block).
* **MLP column ranges** ``[a, b)`` of the hidden dimension, ``a`` a multiple of 32 and ``b``
  either a multiple of 32 or ``hidden_dim``: ``w1``/``w3`` rows ``[a, b)`` and the ``w2``
  columns ``[a, b)`` as a ``(dim, b-a)`` matrix, whose blocks are exactly those of the full
  ``w2`` row because ``a`` is 32-aligned; the range's hidden activation is quantised on its own,
  which for the same reason equals the full vector's quantisation.

Every unit returns a partial vector of length ``dim``; the sum of all units' partials is the
single-device int8 result up to float summation order, whatever the split.

Wire format of one device's share of one layer (``serialize_layer_share``), little-endian,
every section starting 4-byte aligned, padding bytes zero. The 40-byte header is
``LayerShareHeader`` in ``shared_protocol/schema.py`` (constants ``SHARE_MAGIC``,
``SHARE_VERSION``, ``SHARE_HEADER_SIZE``), from which ``HEADER`` below is derived and the C
``tpfed_share_header_t`` codec in ``tpfed_proto.h`` is generated; change it there. The
sections after the header are defined here (firmware/lib/tpfed/src/peer.c implements them too):

=======  ==========  ==========================================================================
offset   type        field
=======  ==========  ==========================================================================
0        char[4]     magic ``b"TPLS"``
4        u16         version (1)
6        u16         header size in bytes (40)
8        u32         layer index
12       u32         dim
16       u32         hidden_dim
20       u16         head_size
22       u16         group_size (query heads per KV group)
24       u16         n_groups: KV groups in this share
26       u16         n_ranges: MLP column ranges in this share
28       u16         n_kv_heads of the model (group indices are below it)
30       u16         reserved, 0
32       u64         total size of the share in bytes, header included
40       u16[n_g]    group indices, strictly ascending; padded to 4 bytes
..       u32[2*n_r]  ranges (start, end), ascending, disjoint
..                   per group, in index order: wq (gq, dim), wk (hs, dim), wv (hs, dim),
                     wo (dim, gq)
..                   per range, in order (n = end - start): w1 (n, dim), w3 (n, dim), w2 (dim, n)
=======  ==========  ==========================================================================

Each Q8_0 matrix ``(rows, cols)`` is ``rows*cols`` int8 values (row-major) padded to 4 bytes,
then ``rows * ceil(cols/32)`` uint16 fp16 scales (row-major) padded to 4 bytes. The coordinator
keeps the norms; nothing else travels.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from construct import Const, Struct

from tpfed.compute._native import ffi, lib
from tpfed.compute.kernels import (
    Q8_BLOCK,
    Q8Tensor,
    n_blocks,
)
from tpfed.errors import TpfedError
from tpfed.model.config import ModelConfig
from tpfed.protocol.layout import all_fixed, fixed_prefix, joined, unwrap
from tpfed.protocol.schema import SHARE_HEADER_SIZE, SHARE_MAGIC, SHARE_VERSION, LayerShareHeader

MAGIC = SHARE_MAGIC
VERSION = SHARE_VERSION


def _header_struct() -> tuple[struct.Struct, tuple[str, ...]]:
    """``LayerShareHeader`` as a struct.Struct (its bytes magic as ``4s``) and its field names."""
    first, *rest = LayerShareHeader.subcons
    magic, name, _ = unwrap(first)
    body = Struct(*rest)
    if name != "magic" or not isinstance(magic, Const) or not isinstance(magic.value, bytes):
        raise TypeError("LayerShareHeader must start with a bytes Const named magic")
    if not all_fixed(body):
        raise TypeError("LayerShareHeader fields after the magic must be fixed-width scalars")
    fmt, names = fixed_prefix(body)
    return joined(f"{len(magic.value)}s", fmt), ("magic", *names)


HEADER, _HEADER_FIELDS = _header_struct()
# serialize_layer_share / parse_layer_share pack and unpack the header in this order.
assert _HEADER_FIELDS == ("magic", "version", "header_size", "layer", "dim", "hidden_dim", "head_size",
                          "group_size", "n_groups", "n_ranges", "n_kv_heads", "reserved", "total")
assert HEADER.size == SHARE_HEADER_SIZE

Range = tuple[int, int]


class ShardError(TpfedError):
    """A layer share is malformed or does not fit the model, or a split is invalid."""


@dataclass(frozen=True)
class AttentionWeights:
    """One KV group's weights."""

    wq: Q8Tensor  # (gq, dim)
    wk: Q8Tensor  # (head_size, dim)
    wv: Q8Tensor  # (head_size, dim)
    wo: Q8Tensor  # (dim, gq): the wo columns of this group, quantised on their own


@dataclass(frozen=True)
class MlpWeights:
    """One hidden-column range's weights (n = end - start)."""

    w1: Q8Tensor  # (n, dim)
    w3: Q8Tensor  # (n, dim)
    w2: Q8Tensor  # (dim, n)


class UnitSource:
    """Anything that hands out unit weights: :class:`tpfed.compute.int8_forward.Q8Model` or a parsed
    :class:`LayerShare` set (see :class:`DeviceShards`)."""

    config: ModelConfig

    def attention_unit(self, layer: int, group: int) -> AttentionWeights:  # pragma: no cover
        raise NotImplementedError

    def mlp_unit(self, layer: int, start: int, end: int) -> MlpWeights:  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# validation of a split


def check_groups(config: ModelConfig, groups: Iterable[int]) -> tuple[int, ...]:
    gs = tuple(int(g) for g in groups)
    if any(b <= a for a, b in zip(gs, gs[1:], strict=False)):
        raise ShardError(f"KV groups must be strictly ascending, got {gs}")
    if gs and (gs[0] < 0 or gs[-1] >= config.n_groups):
        raise ShardError(f"KV groups {gs} outside 0..{config.n_groups - 1}")
    return gs


def check_ranges(config: ModelConfig, ranges: Iterable[Range]) -> tuple[Range, ...]:
    rs = tuple((int(a), int(b)) for a, b in ranges)
    prev_end = 0
    for a, b in rs:
        if not 0 <= a < b <= config.hidden_dim:
            raise ShardError(f"MLP range [{a}, {b}) is empty or outside [0, {config.hidden_dim})")
        if a % Q8_BLOCK or (b % Q8_BLOCK and b != config.hidden_dim):
            raise ShardError(
                f"MLP range [{a}, {b}) must start on a multiple of {Q8_BLOCK} and end on one or at "
                f"hidden_dim {config.hidden_dim}"
            )
        if a < prev_end:
            raise ShardError(f"MLP ranges {rs} must be ascending and disjoint")
        prev_end = b
    return rs


# ---------------------------------------------------------------------------------------------
# computation


def _q8_rows(t: Q8Tensor, start: int, end: int) -> Q8Tensor:
    return Q8Tensor(t.qs[start:end], t.d[start:end])


def _stack_rows(parts: Sequence[Q8Tensor]) -> Q8Tensor:
    """One matrix holding the rows of ``parts`` in order (a view when there is one part)."""
    if len(parts) == 1:
        return parts[0]
    return Q8Tensor(np.concatenate([p.qs for p in parts]), np.concatenate([p.d for p in parts]))


def _c_matrix(m: object, t: Q8Tensor) -> None:
    """Point a ``tpfed_q8_matrix`` at a Q8Tensor (which keeps the buffers alive)."""
    m.qs = t._pqs
    m.d = t._pd
    m.rows, m.cols = t.shape


def _f32_ptr(a: np.ndarray) -> object:
    return ffi.cast("float *", ffi.from_buffer("float[]", a))


def _unit_array(ctype: str, layer: int, units: Sequence[tuple[str, object, dict]]) -> object:
    """A C array of ``ctype`` units (tpfed_units.h), unit i pointing at the Q8 matrices of
    ``units[i] = (label, weights, {matrix name: expected shape})``; a wrong shape is a
    :class:`ShardError` naming the layer and unit."""
    arr = ffi.new(f"{ctype}[]", len(units))
    for i, (label, weights, want) in enumerate(units):
        for name, shape in want.items():
            t = getattr(weights, name)
            if t.shape != shape:
                raise ShardError(f"layer {layer}: {name} of {label} has shape {t.shape}, "
                                 f"expected {shape}")
            _c_matrix(getattr(arr[i], name), t)
    return arr


class AttentionShard:
    """One layer's attention for a set of KV groups, with their KV caches.

    ``forward(x, pos)`` computes q/k/v for the groups from the Q8_0 activation ``x``, applies
    RoPE to q and k, appends k/v to the cache at ``pos``, attends over positions 0..pos, quantises
    each group's output on its own, multiplies by the group's wo columns and returns the sum of
    the groups' partials, float32 (dim,). The returned array is reused by the next call.
    The arithmetic is ``attention_units_forward`` of the C library (tpfed_units.h), the same
    code a board runs."""

    def __init__(self, config: ModelConfig, layer: int, groups: Sequence[int],
                 weights: Sequence[AttentionWeights]) -> None:
        self.config = config
        self.layer = layer
        self.groups = check_groups(config, groups)
        if not self.groups or len(weights) != len(self.groups):
            raise ShardError(f"layer {layer}: {len(self.groups)} groups but {len(weights)} weight sets")
        c = config
        hs, gq, ng = c.head_size, c.group_q_dim, len(self.groups)
        self.weights = list(weights)
        want = {"wq": (gq, c.dim), "wk": (hs, c.dim), "wv": (hs, c.dim), "wo": (c.dim, gq)}
        self._units = _unit_array("tpfed_attention_unit", layer,
                                  [(f"KV group {g}", w, want) for g, w in zip(self.groups, self.weights, strict=True)])
        # KV cache: (seq_len, ng * hs); group i's cache is the strided view [:, i*hs:(i+1)*hs].
        self.key_cache = np.zeros((c.seq_len, ng * hs), np.float32)
        self.value_cache = np.zeros((c.seq_len, ng * hs), np.float32)
        self._pk, self._pv = _f32_ptr(self.key_cache), _f32_ptr(self.value_cache)
        nbytes = lib.attention_units_scratch_bytes(c.dim, hs, c.group_size, c.seq_len)
        self._scratch = np.empty((nbytes + 3) // 4, np.float32)
        self._pscratch = ffi.cast("void *", ffi.from_buffer("float[]", self._scratch))
        self.out = np.empty(c.dim, np.float32)
        self._pout = _f32_ptr(self.out)

    def kv_cache(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) cache views (seq_len, head_size) of the i-th owned group."""
        hs = self.config.head_size
        return self.key_cache[:, i * hs : (i + 1) * hs], self.value_cache[:, i * hs : (i + 1) * hs]

    def reset(self) -> None:
        self.key_cache.fill(0)
        self.value_cache.fill(0)

    def _check_pos(self, pos: int) -> None:
        if not 0 <= pos < self.config.seq_len:
            raise ShardError(f"position {pos} outside the context (seq_len {self.config.seq_len})")

    def _check_x(self, x: Q8Tensor) -> None:
        if x.shape != (self.config.dim,):
            raise ShardError(f"activation of shape {x.shape}, expected ({self.config.dim},)")

    def forward(self, x: Q8Tensor, pos: int) -> np.ndarray:
        self._check_pos(pos)
        self._check_x(x)
        c = self.config
        rc = lib.attention_units_forward(
            self._pout, self._units, len(self.groups), self._pk, self._pv, self.key_cache.shape[1],
            x._pqs, x._pd, c.dim, c.head_size, c.group_size, pos, c.seq_len, c.rope_theta,
            self._pscratch, self._scratch.nbytes)
        if rc != 0:
            raise ShardError(f"layer {self.layer}: attention_units_forward refused its arguments")
        return self.out

    def replay(self, xs: Q8Tensor, start: int = 0) -> None:
        """Rebuild the KV cache for positions start..start+len(xs)-1 from the activations that
        were broadcast then (rows of ``xs``, shape (n, dim)): k/v are a function of the
        activation and the position only, so the cache comes out bit-identical."""
        n = xs.shape[0]
        if n == 0:
            return
        self._check_pos(start + n - 1)
        c = self.config
        for r in range(n):
            x = Q8Tensor(xs.qs[r], xs.d[r])
            rc = lib.attention_units_append_kv(
                self._units, len(self.groups), self._pk, self._pv, self.key_cache.shape[1],
                x._pqs, x._pd, c.dim, c.head_size, start + r, c.seq_len, c.rope_theta)
            if rc != 0:
                raise ShardError(f"layer {self.layer}: attention_units_append_kv refused its arguments")


class MlpShard:
    """One layer's MLP for a set of hidden-column ranges: ``forward(x)`` returns the sum over
    ranges of ``w2[:, a:b] @ q8(silu(w1[a:b] @ x) * (w3[a:b] @ x))``, float32 (dim,), reused by
    the next call. The arithmetic is ``mlp_units_forward`` of the C library (tpfed_units.h)."""

    def __init__(self, config: ModelConfig, layer: int, ranges: Sequence[Range],
                 weights: Sequence[MlpWeights]) -> None:
        self.config = config
        self.layer = layer
        self.ranges = check_ranges(config, ranges)
        if not self.ranges or len(weights) != len(self.ranges):
            raise ShardError(f"layer {layer}: {len(self.ranges)} MLP ranges but {len(weights)} weight sets")
        self.weights = list(weights)
        d = config.dim
        self._units = _unit_array("tpfed_mlp_unit", layer, [
            (f"range [{a}, {b})", w, {"w1": (b - a, d), "w3": (b - a, d), "w2": (d, b - a)})
            for (a, b), w in zip(self.ranges, self.weights, strict=True)])
        widest = max(b - a for a, b in self.ranges)
        nbytes = lib.mlp_units_scratch_bytes(config.dim, widest)
        self._scratch = np.empty((nbytes + 3) // 4, np.float32)
        self._pscratch = ffi.cast("void *", ffi.from_buffer("float[]", self._scratch))
        self.out = np.empty(config.dim, np.float32)
        self._pout = _f32_ptr(self.out)

    def forward(self, x: Q8Tensor) -> np.ndarray:
        if x.shape != (self.config.dim,):
            raise ShardError(f"activation of shape {x.shape}, expected ({self.config.dim},)")
        rc = lib.mlp_units_forward(self._pout, self._units, len(self.ranges), x._pqs, x._pd,
                                   self.config.dim, self._pscratch, self._scratch.nbytes)
        if rc != 0:
            raise ShardError(f"layer {self.layer}: mlp_units_forward refused its arguments")
        return self.out


Assignment = Mapping[int, tuple[Sequence[int], Sequence[Range]]]


class DeviceShards:
    """Everything one device holds: ``layers[layer] = (AttentionShard | None, MlpShard | None)``.

    ``assignment`` maps a layer to (KV groups, MLP ranges) of that layer owned by the device;
    ``source`` is a :class:`tpfed.compute.int8_forward.Q8Model` (coordinator, simulator) or a
    :class:`ShareSet` of parsed shares (a peer)."""

    def __init__(self, source: UnitSource, assignment: Assignment) -> None:
        self.config = c = source.config
        self.layers: dict[int, tuple[AttentionShard | None, MlpShard | None]] = {}
        for layer, (groups, ranges) in sorted(assignment.items()):
            if not 0 <= layer < c.n_layers:
                raise ShardError(f"layer {layer} outside 0..{c.n_layers - 1}")
            gs = check_groups(c, groups)
            rs = check_ranges(c, ranges)
            att = AttentionShard(c, layer, gs, [source.attention_unit(layer, g) for g in gs]) if gs else None
            mlp = MlpShard(c, layer, rs, [source.mlp_unit(layer, a, b) for a, b in rs]) if rs else None
            if att or mlp:
                self.layers[layer] = (att, mlp)

    def attention(self, layer: int, x: Q8Tensor, pos: int) -> np.ndarray | None:
        att = self.layers.get(layer, (None, None))[0]
        return None if att is None else att.forward(x, pos)

    def mlp(self, layer: int, x: Q8Tensor) -> np.ndarray | None:
        mlp = self.layers.get(layer, (None, None))[1]
        return None if mlp is None else mlp.forward(x)

    def reset(self) -> None:
        for att, _ in self.layers.values():
            if att is not None:
                att.reset()

    def nbytes(self) -> int:
        """Weight bytes held (as serialised) plus KV-cache bytes."""
        c = self.config
        total = 0
        for att, mlp in self.layers.values():
            gs = att.groups if att else ()
            rs = mlp.ranges if mlp else ()
            total += share_nbytes(c, gs, rs) + kv_cache_nbytes(c, gs, c.seq_len)
        return total


# ---------------------------------------------------------------------------------------------
# wire format


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _q8_nbytes(rows: int, cols: int) -> int:
    return _pad4(rows * cols) + _pad4(2 * rows * n_blocks(cols))


def _unit_shapes(config: ModelConfig, n_groups: int, ranges: Sequence[Range]) -> list[tuple[int, int]]:
    c = config
    gq, hs = c.group_q_dim, c.head_size
    shapes = [(gq, c.dim), (hs, c.dim), (hs, c.dim), (c.dim, gq)] * n_groups
    for a, b in ranges:
        shapes += [(b - a, c.dim), (b - a, c.dim), (c.dim, b - a)]
    return shapes


def _tables_nbytes(n_groups: int, n_ranges: int) -> int:
    return _pad4(2 * n_groups) + 8 * n_ranges


def share_nbytes(config: ModelConfig, kv_groups: Sequence[int] | int, mlp_ranges: Sequence[Range]) -> int:
    """Exact size of :func:`serialize_layer_share`'s output, without building it (``kv_groups``
    may be the number of groups)."""
    ng = kv_groups if isinstance(kv_groups, int) else len(kv_groups)
    rs = check_ranges(config, mlp_ranges)
    return HEADER.size + _tables_nbytes(ng, len(rs)) + sum(
        _q8_nbytes(r, c) for r, c in _unit_shapes(config, ng, rs)
    )


def kv_cache_nbytes(config: ModelConfig, kv_groups: Sequence[int] | int, seq_len: int | None = None) -> int:
    """Bytes of the float32 K and V caches of these groups for ``seq_len`` positions."""
    ng = kv_groups if isinstance(kv_groups, int) else len(kv_groups)
    return ng * 2 * (seq_len or config.seq_len) * config.head_size * 4


def serialize_layer_share(source: UnitSource, layer: int, kv_groups: Sequence[int],
                          mlp_ranges: Sequence[Range]) -> bytes:
    """One device's share of ``layer`` in the wire format of the module docstring."""
    c = source.config
    if not 0 <= layer < c.n_layers:
        raise ShardError(f"layer {layer} outside 0..{c.n_layers - 1}")
    gs = check_groups(c, kv_groups)
    rs = check_ranges(c, mlp_ranges)
    total = share_nbytes(c, gs, rs)
    buf = bytearray(total)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, HEADER.size, layer, c.dim, c.hidden_dim, c.head_size,
                     c.group_size, len(gs), len(rs), c.n_kv_heads, 0, total)
    off = HEADER.size
    struct.pack_into(f"<{len(gs)}H", buf, off, *gs)
    off += _pad4(2 * len(gs))
    for a, b in rs:
        struct.pack_into("<II", buf, off, a, b)
        off += 8
    mats: list[Q8Tensor] = []
    for g in gs:
        u = source.attention_unit(layer, g)
        mats += [u.wq, u.wk, u.wv, u.wo]
    for a, b in rs:
        m = source.mlp_unit(layer, a, b)
        mats += [m.w1, m.w3, m.w2]
    for t, shape in zip(mats, _unit_shapes(c, len(gs), rs), strict=True):
        if t.shape != shape:
            raise ShardError(f"layer {layer}: a unit matrix has shape {t.shape}, expected {shape}")
        qs = t.qs.tobytes()
        buf[off : off + len(qs)] = qs
        off += _pad4(len(qs))
        d = t.d.astype("<u2", copy=False).tobytes()
        buf[off : off + len(d)] = d
        off += _pad4(len(d))
    assert off == total
    return bytes(buf)


@dataclass(frozen=True)
class LayerShare:
    """A parsed share; the Q8 arrays are read-only views of the bytes it was parsed from."""

    layer: int
    groups: tuple[int, ...]
    ranges: tuple[Range, ...]
    attention: tuple[AttentionWeights, ...]
    mlp: tuple[MlpWeights, ...]


def parse_layer_share(data: bytes | bytearray | memoryview, config: ModelConfig) -> LayerShare:
    """Inverse of :func:`serialize_layer_share`; raises :class:`ShardError` on any inconsistency
    (wrong magic/version, a geometry other than ``config``'s, bad tables, wrong size, non-zero
    padding, non-finite scales)."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER.size:
        raise ShardError(f"layer share truncated: {len(mv)} bytes, the header alone is {HEADER.size}")
    (magic, version, hsize, layer, dim, hidden, head_size, group_size, ng, nr, n_kv, reserved,
     total) = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ShardError(f"not a layer share (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION or hsize != HEADER.size:
        raise ShardError(f"layer share version {version} (header {hsize} bytes) unsupported; expected "
                         f"version {VERSION}, header {HEADER.size}")
    if total != len(mv):
        raise ShardError(f"layer share size mismatch: header says {total} bytes, got {len(mv)}")
    c = config
    got = (dim, hidden, head_size, group_size, n_kv)
    want = (c.dim, c.hidden_dim, c.head_size, c.group_size, c.n_kv_heads)
    if got != want or reserved:
        raise ShardError(
            f"layer share is for another model: dim/hidden/head_size/group_size/n_kv_heads {got}, "
            f"this model has {want}"
        )
    if not 0 <= layer < c.n_layers:
        raise ShardError(f"layer share for layer {layer}, the model has {c.n_layers}")
    off = HEADER.size
    if len(mv) < off + _tables_nbytes(ng, nr):
        raise ShardError("layer share truncated in its group/range tables")
    gs = struct.unpack_from(f"<{ng}H", mv, off)
    _check_zero(mv, off + 2 * ng, off + _pad4(2 * ng))
    off += _pad4(2 * ng)
    flat = struct.unpack_from(f"<{2 * nr}I", mv, off)
    off += 8 * nr
    try:
        gs = check_groups(c, gs)
        rs = check_ranges(c, zip(flat[0::2], flat[1::2], strict=True))
    except ShardError as exc:
        raise ShardError(f"layer share tables invalid: {exc}") from None
    shapes = _unit_shapes(c, ng, rs)
    if share_nbytes(c, ng, rs) != len(mv):
        raise ShardError(f"layer share size {len(mv)} does not match its tables "
                         f"({share_nbytes(c, ng, rs)} expected)")
    mats = []
    for rows, cols in shapes:
        nq, nd = rows * cols, rows * n_blocks(cols)
        qs = np.frombuffer(mv, np.int8, nq, off).reshape(rows, cols)
        _check_zero(mv, off + nq, off + _pad4(nq))
        off += _pad4(nq)
        d = np.frombuffer(mv, "<u2", nd, off).reshape(rows, n_blocks(cols))
        _check_zero(mv, off + 2 * nd, off + _pad4(2 * nd))
        off += _pad4(2 * nd)
        if np.any((d & 0x7C00) == 0x7C00):
            raise ShardError(f"layer share for layer {layer} holds a non-finite fp16 scale")
        mats.append(Q8Tensor(qs, d.astype(np.uint16, copy=False)))
    att = tuple(AttentionWeights(*mats[4 * i : 4 * i + 4]) for i in range(ng))
    base = 4 * ng
    mlp = tuple(MlpWeights(*mats[base + 3 * i : base + 3 * i + 3]) for i in range(nr))
    return LayerShare(layer=layer, groups=gs, ranges=rs, attention=att, mlp=mlp)


def _check_zero(mv: memoryview, start: int, end: int) -> None:
    if any(mv[start:end]):
        raise ShardError("layer share has non-zero padding bytes (corrupted)")


class ShareSet(UnitSource):
    """Unit weights from parsed shares, as a peer holds them (for :class:`DeviceShards`)."""

    def __init__(self, config: ModelConfig, shares: Iterable[LayerShare]) -> None:
        self.config = config
        self._att: dict[tuple[int, int], AttentionWeights] = {}
        self._mlp: dict[tuple[int, int, int], MlpWeights] = {}
        for s in shares:
            for g, w in zip(s.groups, s.attention, strict=True):
                self._att[(s.layer, g)] = w
            for (a, b), w in zip(s.ranges, s.mlp, strict=True):
                self._mlp[(s.layer, a, b)] = w

    def assignment(self) -> dict[int, tuple[tuple[int, ...], tuple[Range, ...]]]:
        out: dict[int, tuple[list[int], list[Range]]] = {}
        for layer, g in sorted(self._att):
            out.setdefault(layer, ([], []))[0].append(g)
        for layer, a, b in sorted(self._mlp):
            out.setdefault(layer, ([], []))[1].append((a, b))
        return {k: (tuple(v[0]), tuple(v[1])) for k, v in sorted(out.items())}

    def attention_unit(self, layer: int, group: int) -> AttentionWeights:
        try:
            return self._att[(layer, group)]
        except KeyError:
            raise ShardError(f"no weights received for layer {layer} KV group {group}") from None

    def mlp_unit(self, layer: int, start: int, end: int) -> MlpWeights:
        try:
            return self._mlp[(layer, start, end)]
        except KeyError:
            raise ShardError(f"no weights received for layer {layer} MLP range [{start}, {end})") from None
