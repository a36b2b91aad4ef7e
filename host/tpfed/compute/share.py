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
30       u16         flags (:class:`ShareFlag`), 0 for llama2.c's units
32       u64         total size of the share in bytes, header included
40       u16[n_g]    group indices, strictly ascending; padded to 4 bytes
..       u32[2*n_r]  ranges (start, end), ascending, disjoint
..       u32         sliding window (flag WINDOW only)
..       f32[hs/2]   RoPE frequency table (flag ROPE_TABLE only)
..                   per group, in index order: wq (gq, dim), wk (hs, dim), wv (hs, dim),
                     wo (dim, gq)
..                   per range, in order (n = end - start): w1 (n, dim), w3 (n, dim) (not with
                     PLAIN_MLP), w2 (dim, n)
..       f32         per group bq (gq), bk (hs), bv (hs) (flag QKV_BIAS only)
..       f32         per range b1 (n) and, gated, b3 (n) (flag MLP_BIAS only)
=======  ==========  ==========================================================================

Flags 0 is exactly llama2.c's layout. The flag bits (:class:`ShareFlag`) are defined in
``shared_protocol/schema.py`` with the header, so the C core gets them as ``TPFED_SHARE_*``;
bits 8-9 hold the MLP activation (TPFED_ACT_*). ASSIGN carries the model's flags too: a peer
sizes every share from them before any arrives, and refuses a share whose header says
otherwise. An encoder (flag NONCAUSAL) gets each row's k/v first (``Stage.KV``, an empty
PARTIAL) and then attends over every row appended. The output projection's and down
projection's biases are not in any share: the coordinator adds them once.

Each Q8_0 matrix ``(rows, cols)`` is ``rows*cols`` int8 values (row-major) padded to 4 bytes,
then ``rows * ceil(cols/32)`` uint16 fp16 scales (row-major) padded to 4 bytes. The coordinator
keeps the norms and embeddings; nothing else travels.
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
from tpfed.protocol.schema import (
    SHARE_ACT_SHIFT,
    SHARE_FLAGS_KNOWN,
    SHARE_HEADER_SIZE,
    SHARE_MAGIC,
    SHARE_VERSION,
    LayerShareHeader,
    ShareFlag,
)

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
                          "group_size", "n_groups", "n_ranges", "n_kv_heads", "flags", "total")
assert HEADER.size == SHARE_HEADER_SIZE

Range = tuple[int, int]


class ShardError(TpfedError):
    """A layer share is malformed or does not fit the model, or a split is invalid."""


@dataclass(frozen=True)
class AttentionWeights:
    """One KV group's weights; the biases (float32) when the model has q/k/v biases."""

    wq: Q8Tensor  # (gq, dim)
    wk: Q8Tensor  # (head_size, dim)
    wv: Q8Tensor  # (head_size, dim)
    wo: Q8Tensor  # (dim, gq): the wo columns of this group, quantised on their own
    bq: np.ndarray | None = None  # (gq,)
    bk: np.ndarray | None = None  # (head_size,)
    bv: np.ndarray | None = None  # (head_size,)


@dataclass(frozen=True)
class MlpWeights:
    """One hidden-column range's weights (n = end - start); ``w3`` is None for a plain
    (2-matrix) MLP, the biases (float32) are there when the model has MLP biases."""

    w1: Q8Tensor  # (n, dim)
    w3: Q8Tensor | None  # (n, dim)
    w2: Q8Tensor  # (dim, n)
    b1: np.ndarray | None = None  # (n,)
    b3: np.ndarray | None = None  # (n,)


ACT = {"silu": lib.TPFED_ACT_SILU, "gelu_tanh": lib.TPFED_ACT_GELU_TANH, "gelu": lib.TPFED_ACT_GELU}
ROPE_NONE, ROPE_THETA, ROPE_TABLE = lib.TPFED_ROPE_NONE, lib.TPFED_ROPE_THETA, lib.TPFED_ROPE_TABLE


@dataclass(frozen=True, eq=False)
class UnitParams:
    """What the units of every layer need beyond the shapes (the same for every layer):
    rotary positions (``rope`` ROPE_NONE / ROPE_THETA / ROPE_TABLE with ``rope_freq``, head_size/2
    float32 frequencies), the attention span (``causal``, ``window``), the MLP's activation
    (``act``, a TPFED_ACT_* code) and kind (``gated``: SwiGLU-style w1/w3/w2), and which biases
    the units carry (``qkv_bias``: q/k/v rows; ``mlp_bias``: w1/w3 rows; the output
    projection's and the down projection's biases are the coordinator's)."""

    rope: int = ROPE_THETA
    rope_theta: float = 10000.0
    rope_freq: np.ndarray | None = None
    window: int = 0
    causal: bool = True
    act: int = 0
    gated: bool = True
    qkv_bias: bool = False
    mlp_bias: bool = False

    @property
    def plain_llama(self) -> bool:
        """What a version-1 share (no flags) means: llama2.c's units."""
        return (self.rope == ROPE_THETA and self.window == 0 and self.causal and self.act == 0
                and self.gated and not self.qkv_bias and not self.mlp_bias)


def rope_frequencies_f32(config: ModelConfig) -> np.ndarray:
    """The rotary frequency table the units use: ``rope_freqs_f32`` (the bits of ``rope_f32``'s
    own), rescaled in float32 as the config's ``rope_scaling`` asks (linear, llama3)."""
    from tpfed.model.reference import scale_rope_frequencies

    hs = config.head_size
    freq = np.empty(hs // 2, np.float32)
    lib.rope_freqs_f32(ffi.from_buffer("float[]", freq), hs, config.rope_theta)
    return scale_rope_frequencies(freq, config)


def unit_params(config: ModelConfig) -> UnitParams:
    c = config
    if c.position == "learned":
        rope, freq = ROPE_NONE, None
    elif c.rope_scaling:
        rope, freq = ROPE_TABLE, rope_frequencies_f32(c)
    else:
        rope, freq = ROPE_THETA, None
    return UnitParams(rope=rope, rope_theta=c.rope_theta, rope_freq=freq, window=c.sliding_window,
                      causal=c.causal, act=ACT[c.activation], gated=c.mlp_matrices == 3,
                      qkv_bias=c.qkv_bias, mlp_bias=c.mlp_bias)


class UnitSource:
    """Anything that hands out unit weights: :class:`tpfed.compute.int8_forward.Q8Model` or a parsed
    :class:`LayerShare` set (see :class:`DeviceShards`)."""

    config: ModelConfig

    @property
    def params(self) -> UnitParams:
        return unit_params(self.config)

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


def _unit_array(ctype: str, layer: int, units: Sequence[tuple[str, object, dict]],
                keep: list) -> object:
    """A C array of ``ctype`` units (tpfed_units.h), unit i pointing at the Q8 matrices and
    float32 biases of ``units[i] = (label, weights, {name: expected shape})``; a matrix or bias
    that is None stays NULL; a wrong shape is a :class:`ShardError` naming the layer and unit.
    ``keep`` receives the buffers the array points into."""
    arr = ffi.new(f"{ctype}[]", len(units))
    for i, (label, weights, want) in enumerate(units):
        for name, shape in want.items():
            t = getattr(weights, name)
            if t is None:
                continue
            if t.shape != shape:
                raise ShardError(f"layer {layer}: {name} of {label} has shape {t.shape}, "
                                 f"expected {shape}")
            if isinstance(t, Q8Tensor):
                _c_matrix(getattr(arr[i], name), t)
            else:
                b = np.ascontiguousarray(t, dtype=np.float32)
                keep.append(b)
                setattr(arr[i], name, ffi.cast("float *", ffi.from_buffer("float[]", b)))
    return arr


def _attention_cfg(config: ModelConfig, params: UnitParams, seq_len: int, keep: list) -> object:
    cfg = ffi.new("tpfed_attention_cfg *")
    cfg.dim, cfg.head_size, cfg.group_size = config.dim, config.head_size, config.group_size
    cfg.seq_len = seq_len
    cfg.rope, cfg.rope_theta = params.rope, params.rope_theta
    if params.rope == ROPE_TABLE:
        freq = np.ascontiguousarray(params.rope_freq, dtype=np.float32)
        if freq.shape != (config.head_size // 2,):
            raise ShardError(f"RoPE table of shape {freq.shape}, expected ({config.head_size // 2},)")
        keep.append(freq)
        cfg.rope_freq = ffi.cast("float *", ffi.from_buffer("float[]", freq))
    cfg.window, cfg.causal = params.window, int(params.causal)
    return cfg


class AttentionShard:
    """One layer's attention for a set of KV groups, with their KV caches.

    ``forward(x, pos)`` computes q/k/v for the groups from the Q8_0 activation ``x`` (adding
    their biases), applies RoPE to q and k, appends k/v to the cache at ``pos``, attends over
    positions 0..pos (the last ``window`` of them with a sliding window), quantises each group's
    output on its own, multiplies by the group's wo columns and returns the sum of the groups'
    partials, float32 (dim,). The returned array is reused by the next call. An encoder's
    (non-causal) attention is :meth:`forward_rows`: every row's k/v first, then every query over
    all of them. The arithmetic is ``attention_units_forward_cfg`` of the C library
    (tpfed_units.h), the same code a board runs."""

    def __init__(self, config: ModelConfig, layer: int, groups: Sequence[int],
                 weights: Sequence[AttentionWeights], params: UnitParams | None = None) -> None:
        self.config = config
        self.layer = layer
        self.groups = check_groups(config, groups)
        if not self.groups or len(weights) != len(self.groups):
            raise ShardError(f"layer {layer}: {len(self.groups)} groups but {len(weights)} weight sets")
        c = config
        self.params = params = params if params is not None else unit_params(c)
        hs, gq, ng = c.head_size, c.group_q_dim, len(self.groups)
        self.weights = list(weights)
        want = {"wq": (gq, c.dim), "wk": (hs, c.dim), "wv": (hs, c.dim), "wo": (c.dim, gq),
                "bq": (gq,), "bk": (hs,), "bv": (hs,)}
        self._keep: list = []
        self._units = _unit_array("tpfed_attention_unit", layer,
                                  [(f"KV group {g}", w, want) for g, w in zip(self.groups, self.weights, strict=True)],
                                  self._keep)
        self._cfg = _attention_cfg(c, params, c.seq_len, self._keep)
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

    def forward(self, x: Q8Tensor, pos: int, n_ctx: int | None = None) -> np.ndarray:
        """The partial at ``pos`` (causal), or, for an encoder, of the query at ``pos`` over
        the ``n_ctx`` rows appended before (:meth:`append_kv`)."""
        self._check_pos(pos)
        self._check_x(x)
        if not self.params.causal and n_ctx is None:
            raise ShardError(f"layer {self.layer}: non-causal attention needs n_ctx (use forward_rows)")
        rc = lib.attention_units_forward_cfg(
            self._pout, self._units, len(self.groups), self._pk, self._pv, self.key_cache.shape[1],
            x._pqs, x._pd, self._cfg, pos, pos + 1 if n_ctx is None else n_ctx,
            self._pscratch, self._scratch.nbytes)
        if rc != 0:
            raise ShardError(f"layer {self.layer}: attention_units_forward refused its arguments")
        return self.out

    def append_kv(self, x: Q8Tensor, pos: int) -> None:
        """k/v of the activation ``x`` into the cache at ``pos`` (nothing else)."""
        self._check_pos(pos)
        self._check_x(x)
        rc = lib.attention_units_append_kv_cfg(
            self._units, len(self.groups), self._pk, self._pv, self.key_cache.shape[1],
            x._pqs, x._pd, self._cfg, pos)
        if rc != 0:
            raise ShardError(f"layer {self.layer}: attention_units_append_kv refused its arguments")

    def forward_rows(self, xs: Q8Tensor, start: int = 0) -> np.ndarray:
        """Partials (n, dim) of the rows of ``xs`` (n, dim) at positions start.. : one by one
        when causal; for an encoder every row's k/v first, then each query over all rows."""
        n = xs.shape[0]
        self._check_pos(start + n - 1)
        rows = [Q8Tensor(xs.qs[r], xs.d[r]) for r in range(n)]
        out = np.empty((n, self.config.dim), np.float32)
        if self.params.causal:
            for r, x in enumerate(rows):
                out[r] = self.forward(x, start + r)
            return out
        for r, x in enumerate(rows):
            self.append_kv(x, start + r)
        for r, x in enumerate(rows):
            out[r] = self.forward(x, start + r, n_ctx=start + n)
        return out

    def replay(self, xs: Q8Tensor, start: int = 0) -> None:
        """Rebuild the KV cache for positions start..start+len(xs)-1 from the activations that
        were broadcast then (rows of ``xs``, shape (n, dim)): k/v are a function of the
        activation and the position only, so the cache comes out bit-identical."""
        for r in range(xs.shape[0]):
            self.append_kv(Q8Tensor(xs.qs[r], xs.d[r]), start + r)


class MlpShard:
    """One layer's MLP for a set of hidden-column ranges: ``forward(x)`` returns the sum over
    ranges of ``w2[:, a:b] @ q8(act(w1[a:b] @ x + b1) [* (w3[a:b] @ x + b3)])``, float32 (dim,),
    reused by the next call (SwiGLU when the MLP is gated, GELU or SiLU on one matrix
    otherwise). The arithmetic is ``mlp_units_forward_act`` of the C library (tpfed_units.h)."""

    def __init__(self, config: ModelConfig, layer: int, ranges: Sequence[Range],
                 weights: Sequence[MlpWeights], params: UnitParams | None = None) -> None:
        self.config = config
        self.layer = layer
        self.params = params = params if params is not None else unit_params(config)
        self.ranges = check_ranges(config, ranges)
        if not self.ranges or len(weights) != len(self.ranges):
            raise ShardError(f"layer {layer}: {len(self.ranges)} MLP ranges but {len(weights)} weight sets")
        self.weights = list(weights)
        for (a, b), w in zip(self.ranges, self.weights, strict=True):
            if (w.w3 is not None) != params.gated:
                raise ShardError(f"layer {layer}: range [{a}, {b}) "
                                 f"{'lacks' if params.gated else 'has'} the gated MLP's w3")
        d = config.dim
        self._keep: list = []
        self._units = _unit_array("tpfed_mlp_unit", layer, [
            (f"range [{a}, {b})", w, {"w1": (b - a, d), "w3": (b - a, d), "w2": (d, b - a),
                                      "b1": (b - a,), "b3": (b - a,)})
            for (a, b), w in zip(self.ranges, self.weights, strict=True)], self._keep)
        widest = max(b - a for a, b in self.ranges)
        nbytes = lib.mlp_units_scratch_bytes(config.dim, widest)
        self._scratch = np.empty((nbytes + 3) // 4, np.float32)
        self._pscratch = ffi.cast("void *", ffi.from_buffer("float[]", self._scratch))
        self.out = np.empty(config.dim, np.float32)
        self._pout = _f32_ptr(self.out)

    def forward(self, x: Q8Tensor) -> np.ndarray:
        if x.shape != (self.config.dim,):
            raise ShardError(f"activation of shape {x.shape}, expected ({self.config.dim},)")
        rc = lib.mlp_units_forward_act(self._pout, self._units, len(self.ranges), x._pqs, x._pd,
                                       self.config.dim, self.params.act, self._pscratch,
                                       self._scratch.nbytes)
        if rc != 0:
            raise ShardError(f"layer {self.layer}: mlp_units_forward refused its arguments")
        return self.out

    def forward_rows(self, xs: Q8Tensor) -> np.ndarray:
        out = np.empty((xs.shape[0], self.config.dim), np.float32)
        for r in range(xs.shape[0]):
            out[r] = self.forward(Q8Tensor(xs.qs[r], xs.d[r]))
        return out


Assignment = Mapping[int, tuple[Sequence[int], Sequence[Range]]]


class DeviceShards:
    """Everything one device holds: ``layers[layer] = (AttentionShard | None, MlpShard | None)``.

    ``assignment`` maps a layer to (KV groups, MLP ranges) of that layer owned by the device;
    ``source`` is a :class:`tpfed.compute.int8_forward.Q8Model` (coordinator, simulator) or a
    :class:`ShareSet` of parsed shares (a peer)."""

    def __init__(self, source: UnitSource, assignment: Assignment) -> None:
        self.config = c = source.config
        params = getattr(source, "params", None)  # duck-typed sources may leave it out
        self.params = params = params if params is not None else unit_params(c)
        self.layers: dict[int, tuple[AttentionShard | None, MlpShard | None]] = {}
        for layer, (groups, ranges) in sorted(assignment.items()):
            if not 0 <= layer < c.n_layers:
                raise ShardError(f"layer {layer} outside 0..{c.n_layers - 1}")
            gs = check_groups(c, groups)
            rs = check_ranges(c, ranges)
            att = AttentionShard(c, layer, gs, [source.attention_unit(layer, g) for g in gs],
                                 params) if gs else None
            mlp = MlpShard(c, layer, rs, [source.mlp_unit(layer, a, b) for a, b in rs], params) if rs else None
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
            total += share_nbytes(c, gs, rs, self.params) + kv_cache_nbytes(c, gs, c.seq_len)
        return total


# ---------------------------------------------------------------------------------------------
# wire format


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _q8_nbytes(rows: int, cols: int) -> int:
    return _pad4(rows * cols) + _pad4(2 * rows * n_blocks(cols))


ACT_SHIFT = SHARE_ACT_SHIFT


def share_flags(params: UnitParams) -> int:
    f = 0
    f |= ShareFlag.QKV_BIAS if params.qkv_bias else 0
    f |= 0 if params.gated else ShareFlag.PLAIN_MLP
    f |= ShareFlag.MLP_BIAS if params.mlp_bias else 0
    f |= 0 if params.causal else ShareFlag.NONCAUSAL
    f |= {ROPE_NONE: ShareFlag.NO_ROPE, ROPE_THETA: 0, ROPE_TABLE: ShareFlag.ROPE_TABLE}[params.rope]
    f |= ShareFlag.WINDOW if params.window else 0
    return int(f) | (params.act << ACT_SHIFT)


def _extras_nbytes(config: ModelConfig, flags: int) -> int:
    return (4 if flags & ShareFlag.WINDOW else 0) + (
        2 * config.head_size if flags & ShareFlag.ROPE_TABLE else 0)


def _unit_shapes(config: ModelConfig, n_groups: int, ranges: Sequence[Range],
                 flags: int = 0) -> list[tuple[int, ...]]:
    """Sections after the tables and extras, in order: (rows, cols) Q8_0 matrices, then (n,)
    float32 biases."""
    c = config
    gq, hs = c.group_q_dim, c.head_size
    gated = not flags & ShareFlag.PLAIN_MLP
    shapes: list[tuple[int, ...]] = [(gq, c.dim), (hs, c.dim), (hs, c.dim), (c.dim, gq)] * n_groups
    for a, b in ranges:
        shapes += [(b - a, c.dim), (b - a, c.dim), (c.dim, b - a)] if gated else [(b - a, c.dim), (c.dim, b - a)]
    if flags & ShareFlag.QKV_BIAS:
        shapes += [(gq,), (hs,), (hs,)] * n_groups
    if flags & ShareFlag.MLP_BIAS:
        for a, b in ranges:
            shapes += [(b - a,), (b - a,)] if gated else [(b - a,)]
    return shapes


def _section_nbytes(shape: tuple[int, ...]) -> int:
    return _q8_nbytes(*shape) if len(shape) == 2 else 4 * shape[0]


def _tables_nbytes(n_groups: int, n_ranges: int) -> int:
    return _pad4(2 * n_groups) + 8 * n_ranges


def share_nbytes(config: ModelConfig, kv_groups: Sequence[int] | int, mlp_ranges: Sequence[Range],
                 params: UnitParams | None = None) -> int:
    """Exact size of :func:`serialize_layer_share`'s output, without building it (``kv_groups``
    may be the number of groups)."""
    ng = kv_groups if isinstance(kv_groups, int) else len(kv_groups)
    rs = check_ranges(config, mlp_ranges)
    flags = share_flags(params if params is not None else unit_params(config))
    return _share_nbytes(config, ng, rs, flags)


def _share_nbytes(config: ModelConfig, ng: int, rs: Sequence[Range], flags: int) -> int:
    return HEADER.size + _tables_nbytes(ng, len(rs)) + _extras_nbytes(config, flags) + sum(
        _section_nbytes(shape) for shape in _unit_shapes(config, ng, rs, flags))


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
    params = source.params
    flags = share_flags(params)
    total = _share_nbytes(c, len(gs), rs, flags)
    buf = bytearray(total)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, HEADER.size, layer, c.dim, c.hidden_dim, c.head_size,
                     c.group_size, len(gs), len(rs), c.n_kv_heads, flags, total)
    off = HEADER.size
    struct.pack_into(f"<{len(gs)}H", buf, off, *gs)
    off += _pad4(2 * len(gs))
    for a, b in rs:
        struct.pack_into("<II", buf, off, a, b)
        off += 8
    if flags & ShareFlag.WINDOW:
        struct.pack_into("<I", buf, off, params.window)
        off += 4
    if flags & ShareFlag.ROPE_TABLE:
        freq = np.asarray(params.rope_freq, dtype="<f4").tobytes()
        buf[off : off + len(freq)] = freq
        off += len(freq)
    sections: list = []
    biases: list = []
    atts = [source.attention_unit(layer, g) for g in gs]
    mlps = [source.mlp_unit(layer, a, b) for a, b in rs]
    for u in atts:
        sections += [u.wq, u.wk, u.wv, u.wo]
        if flags & ShareFlag.QKV_BIAS:
            biases += [u.bq, u.bk, u.bv]
    for m in mlps:
        sections += [m.w1, m.w3, m.w2] if params.gated else [m.w1, m.w2]
        if flags & ShareFlag.MLP_BIAS:
            biases += [m.b1, m.b3] if params.gated else [m.b1]
    for t, shape in zip(sections + biases, _unit_shapes(c, len(gs), rs, flags), strict=True):
        if t is None or t.shape != shape:
            raise ShardError(f"layer {layer}: a unit section has shape "
                             f"{None if t is None else t.shape}, expected {shape}")
        if isinstance(t, Q8Tensor):
            qs = t.qs.tobytes()
            buf[off : off + len(qs)] = qs
            off += _pad4(len(qs))
            d = t.d.astype("<u2", copy=False).tobytes()
            buf[off : off + len(d)] = d
            off += _pad4(len(d))
        else:
            v = np.asarray(t, dtype="<f4").tobytes()
            buf[off : off + len(v)] = v
            off += len(v)
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
    params: UnitParams | None = None


def params_from_flags(config: ModelConfig, flags: int, window: int = 0,
                      rope_freq: np.ndarray | None = None) -> UnitParams:
    act = flags >> ACT_SHIFT
    if flags & ~SHARE_FLAGS_KNOWN or act not in ACT.values():
        raise ShardError(f"layer share flags {flags:#x} unknown")
    if flags & ShareFlag.NO_ROPE and flags & ShareFlag.ROPE_TABLE:
        raise ShardError("layer share flags ask for no RoPE and a RoPE table")
    rope = ROPE_NONE if flags & ShareFlag.NO_ROPE else ROPE_TABLE if flags & ShareFlag.ROPE_TABLE else ROPE_THETA
    return UnitParams(rope=rope, rope_theta=config.rope_theta, rope_freq=rope_freq, window=window,
                      causal=not flags & ShareFlag.NONCAUSAL, act=act,
                      gated=not flags & ShareFlag.PLAIN_MLP, qkv_bias=bool(flags & ShareFlag.QKV_BIAS),
                      mlp_bias=bool(flags & ShareFlag.MLP_BIAS))


def parse_layer_share(data: bytes | bytearray | memoryview, config: ModelConfig) -> LayerShare:
    """Inverse of :func:`serialize_layer_share`; raises :class:`ShardError` on any inconsistency
    (wrong magic/version, a geometry other than ``config``'s, bad tables or flags, wrong size,
    non-zero padding, non-finite scales or biases)."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER.size:
        raise ShardError(f"layer share truncated: {len(mv)} bytes, the header alone is {HEADER.size}")
    (magic, version, hsize, layer, dim, hidden, head_size, group_size, ng, nr, n_kv, flags,
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
    if got != want:
        raise ShardError(
            f"layer share is for another model: dim/hidden/head_size/group_size/n_kv_heads {got}, "
            f"this model has {want}"
        )
    params_from_flags(c, flags)  # known flags
    if flags != share_flags(unit_params(c)):
        raise ShardError(f"layer share is for another architecture: flags {flags:#x}, this model's "
                         f"are {share_flags(unit_params(c)):#x}")
    if not 0 <= layer < c.n_layers:
        raise ShardError(f"layer share for layer {layer}, the model has {c.n_layers}")
    off = HEADER.size
    if len(mv) < off + _tables_nbytes(ng, nr) + _extras_nbytes(c, flags):
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
    if _share_nbytes(c, ng, rs, flags) != len(mv):
        raise ShardError(f"layer share size {len(mv)} does not match its tables "
                         f"({_share_nbytes(c, ng, rs, flags)} expected)")
    window, freq = 0, None
    if flags & ShareFlag.WINDOW:
        (window,) = struct.unpack_from("<I", mv, off)
        off += 4
    if flags & ShareFlag.ROPE_TABLE:
        freq = np.frombuffer(mv, "<f4", c.head_size // 2, off).astype(np.float32)
        off += 2 * c.head_size
        if not np.isfinite(freq).all():
            raise ShardError(f"layer share for layer {layer} holds a non-finite RoPE frequency")
    params = params_from_flags(c, flags, window, freq)
    mats: list = []
    for shape in _unit_shapes(c, ng, rs, flags):
        if len(shape) == 1:
            v = np.frombuffer(mv, "<f4", shape[0], off).astype(np.float32, copy=False)
            off += 4 * shape[0]
            if not np.isfinite(v).all():
                raise ShardError(f"layer share for layer {layer} holds a non-finite bias")
            mats.append(v)
            continue
        rows, cols = shape
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
    per_range = 3 if params.gated else 2
    it = iter(mats)
    att_m = [[next(it) for _ in range(4)] for _ in range(ng)]
    mlp_m = [[next(it) for _ in range(per_range)] for _ in range(nr)]
    att_b = [[next(it) for _ in range(3)] if params.qkv_bias else [None] * 3 for _ in range(ng)]
    mlp_b = [[next(it) for _ in range(per_range - 1)] if params.mlp_bias else [] for _ in range(nr)]
    att = tuple(AttentionWeights(*m, *b) for m, b in zip(att_m, att_b, strict=True))
    mlp = []
    for m, b in zip(mlp_m, mlp_b, strict=True):
        w1, w3, w2 = (m[0], m[1], m[2]) if params.gated else (m[0], None, m[1])
        b1, b3 = (b + [None, None])[:2]
        mlp.append(MlpWeights(w1, w3, w2, b1, b3))
    return LayerShare(layer=layer, groups=gs, ranges=rs, attention=att, mlp=tuple(mlp), params=params)


def _check_zero(mv: memoryview, start: int, end: int) -> None:
    if any(mv[start:end]):
        raise ShardError("layer share has non-zero padding bytes (corrupted)")


class ShareSet(UnitSource):
    """Unit weights from parsed shares, as a peer holds them (for :class:`DeviceShards`); the
    unit parameters are the shares' (those of the config when there are none)."""

    def __init__(self, config: ModelConfig, shares: Iterable[LayerShare]) -> None:
        self.config = config
        shares = list(shares)
        self._params = next((s.params for s in shares if s.params is not None), None)
        self._att: dict[tuple[int, int], AttentionWeights] = {}
        self._mlp: dict[tuple[int, int, int], MlpWeights] = {}
        for s in shares:
            for g, w in zip(s.groups, s.attention, strict=True):
                self._att[(s.layer, g)] = w
            for (a, b), w in zip(s.ranges, s.mlp, strict=True):
                self._mlp[(s.layer, a, b)] = w

    @property
    def params(self) -> UnitParams:
        return self._params if self._params is not None else unit_params(self.config)

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
