"""Bytes and multiply-accumulates of the units a plan hands out; the one cost model shared by the
planner and the simulator.

A *unit* is what a device can own in one layer:

- an attention unit: one KV group (a KV head and the ``group_size`` query heads that share it),
  i.e. wq rows (gq x dim), wk and wv rows (hs x dim each), wo columns (dim x gq), plus its f32 KV
  cache of ``2 * seq_len * hs`` floats;
- an MLP block: 32 hidden columns (the last block of a layer may be narrower when ``hidden_dim``
  is not a multiple of 32): w1 (and w3 for a gated MLP) rows (w x dim) and w2 columns (dim x w).

Weights are Q8_0: int8 values with one f16 scale per block of 32 along the input dimension, so a
(rows x cols) matrix takes ``rows*cols + rows*ceil(cols/32)*2`` bytes. A column slice of w2 or wo
starts on a multiple of 32, so its scales are exactly the blocks it covers.

Per layer and per stage (attention, then MLP) the coordinator sends every participating device
one Q8_0 activation frame and receives one f32 partial frame (the star all-reduce). What that
costs the coordinator itself (:class:`CoordinatorSpec`, :class:`CoordinatorCosts`) is part of the
model too: its sends leave one after another on its own NIC, and the partials of a stage are
received and summed one at a time, so every device taking part in a stage adds a frame to each
of its two queues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tpfed.compute.kernels import Q8_BLOCK  # Q8_0 block length and the MLP column granularity
from tpfed.model.config import ModelConfig
from tpfed.protocol.fastpath import activation_frame_size, partial_frame_size


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def q8_bytes(rows: int, cols: int) -> int:
    """Bytes of a Q8_0 (rows x cols) matrix quantised along its rows (blocks of 32 columns)."""
    return rows * cols + rows * ceil_div(cols, Q8_BLOCK) * 2


def attn_weight_bytes(m: ModelConfig) -> int:
    """Q8_0 weight bytes of one KV group in one layer: wq, wk, wv rows and wo columns."""
    hs, gq = m.head_size, m.group_q_dim
    return q8_bytes(gq, m.dim) + 2 * q8_bytes(hs, m.dim) + q8_bytes(m.dim, gq)


def kv_bytes(m: ModelConfig, seq_len: int) -> int:
    """f32 K and V cache of one KV group in one layer for ``seq_len`` positions."""
    return 2 * seq_len * m.head_size * 4


def attn_unit_bytes(m: ModelConfig, seq_len: int) -> int:
    """Everything a device allocates for one KV group of one layer."""
    return attn_weight_bytes(m) + kv_bytes(m, seq_len)


def mlp_range_bytes(m: ModelConfig, width: int) -> int:
    """Q8_0 bytes of an MLP column range of ``width`` hidden units (w1[, w3] rows, w2 columns)."""
    if width <= 0:
        return 0
    return (m.mlp_matrices - 1) * q8_bytes(width, m.dim) + q8_bytes(m.dim, width)


def mlp_block_bytes(m: ModelConfig) -> int:
    """Bytes of one full 32-column MLP block (an upper bound for the narrower tail block)."""
    return mlp_range_bytes(m, min(Q8_BLOCK, m.hidden_dim))


def n_blocks(m: ModelConfig) -> int:
    """MLP blocks per layer (the last one may be narrower than 32)."""
    return ceil_div(m.hidden_dim, Q8_BLOCK)


def block_widths(m: ModelConfig) -> list[int]:
    nb = n_blocks(m)
    return [Q8_BLOCK] * (nb - 1) + [m.hidden_dim - Q8_BLOCK * (nb - 1)]


def attn_macs(m: ModelConfig, context: float) -> float:
    """MACs of one KV group for one token attending over ``context`` positions: the four
    projections plus scores (q.k) and the weighted sum of values for each query head."""
    hs, gq = m.head_size, m.group_q_dim
    return float(2 * gq * m.dim + 2 * hs * m.dim) + 2.0 * m.group_size * hs * context


def mlp_col_macs(m: ModelConfig) -> int:
    """MACs of one hidden column of the MLP for one token."""
    return m.mlp_matrices * m.dim


def act_frame_bytes(m: ModelConfig) -> int:
    """The Q8_0 activation broadcast frame of a stage (the protocol's own size)."""
    return activation_frame_size(m.dim)


def partial_frame_bytes(m: ModelConfig) -> int:
    """The f32 partial-sum reply frame of length dim (the protocol's own size)."""
    return partial_frame_size(m.dim)


def mean_context(seq_len: int) -> float:
    """Average attention span over a full sequence of ``seq_len`` tokens (positions 0..seq_len-1
    attend over 1..seq_len keys). The planner's per-token predictions use this."""
    return (seq_len + 1) / 2.0


@dataclass(frozen=True)
class UnitCosts:
    """Per-unit figures of one model at one sequence length, precomputed for the hot loops."""

    attn_bytes: int
    """Weights + KV cache of one KV group in one layer."""
    block_bytes: int
    """Weights of one full 32-column MLP block in one layer."""
    tail_bytes: int
    """Weights of the last MLP block of a layer (== block_bytes when hidden_dim % 32 == 0)."""
    attn_macs: float
    """MACs of one KV group per token (at the mean context)."""
    col_macs: int
    """MACs of one hidden column per token."""
    stage_bytes: int
    """Activation frame + partial frame: what one device's link carries per stage."""
    n_groups: int
    n_blocks: int
    n_layers: int

    @classmethod
    def of(cls, m: ModelConfig, seq_len: int) -> UnitCosts:
        widths = block_widths(m)
        return cls(
            attn_bytes=attn_unit_bytes(m, seq_len),
            block_bytes=(mlp_range_bytes(m, Q8_BLOCK) if m.hidden_dim >= Q8_BLOCK
                         else mlp_range_bytes(m, widths[0])),
            tail_bytes=mlp_range_bytes(m, widths[-1]),
            attn_macs=attn_macs(m, mean_context(seq_len)),
            col_macs=mlp_col_macs(m),
            stage_bytes=act_frame_bytes(m) + partial_frame_bytes(m),
            n_groups=m.n_groups,
            n_blocks=len(widths),
            n_layers=m.n_layers,
        )


def model_weight_bytes(m: ModelConfig) -> int:
    """Q8_0 bytes of everything the devices hold (all layers' attention and MLP weights)."""
    full = mlp_range_bytes(m, Q8_BLOCK) * (m.hidden_dim // Q8_BLOCK)
    return m.n_layers * (m.n_groups * attn_weight_bytes(m) + full
                         + mlp_range_bytes(m, m.hidden_dim % Q8_BLOCK))


def total_macs_per_token(m: ModelConfig, context: float) -> float:
    """Device-side MACs of one token (every layer's attention and MLP)."""
    return m.n_layers * (m.n_groups * attn_macs(m, context) + m.hidden_dim * mlp_col_macs(m))


@dataclass(frozen=True)
class CoordinatorSpec:
    """The host that embeds, normalises, sums partials and samples."""

    int8_macs: float = 38e9
    """Classifier throughput (MAC/s); default: the desktop profile's figure."""
    ops_per_s: float = 1e9
    """Elementwise work (norm, quantise, summing partials), operations per second."""
    bandwidth_Bps: float = 117.5e6
    """Its NIC's payload rate; default: gigabit Ethernet."""
    per_frame_s: float = 5e-6
    """Software cost of sending or receiving one frame (system call, framing, CRC)."""
    stage_s: float | None = None
    """Measured: RMSNorm, quantising and encoding the activation of one stage (replaces the
    ``ops_per_s`` estimate)."""
    send_s: float | None = None
    """Measured: handing one activation frame to one peer's link (replaces ``per_frame_s`` and
    the NIC time)."""
    recv_s: float | None = None
    """Measured: CPU of receiving one partial frame, all included (wake-up, system call,
    reassembly, decode, sum)."""
    recv_after_s: float | None = None
    """Measured: the part of ``recv_s`` after the link hands the frame over (decode, sum)."""
    token_s: float | None = None
    """Measured: embedding, final norm, classifier and sampling of one token."""
    peer_frame_s: float = 0.0
    """CPU a peer on this host spends per activation besides its MACs (wake-up, receive,
    dispatch, encode, send); used for the ``colocated`` devices."""
    peer_s_per_mac: float = 0.0
    """Measured: a colocated peer's CPU per multiply-accumulate (on two share sizes); 0: its
    MACs at the device's announced MAC/s."""
    peer_dispatch_s: float = 0.0
    """What a round trip with a peer on this host takes beyond its probed round trip, its MACs
    and ``recv_after_s``: the peer dispatching an activation rather than echoing a probe, and
    the coordinator's gather bookkeeping; on the critical path of the ``colocated`` devices."""
    cores: float | None = None
    """Cores the coordinator and its colocated peers get; None: no CPU contention modelled."""
    colocated: frozenset[str] = frozenset()
    """Names of the devices running on the coordinator's host (sharing its cores)."""
    broadcast: bool = False
    """The activation of a stage leaves once for all its participants (a broadcast medium:
    multicast, a shared bus) instead of once per participant. No tpfed transport does this
    yet; the default is one send per participant."""


FREE_COORDINATOR = CoordinatorSpec(int8_macs=math.inf, ops_per_s=math.inf, bandwidth_Bps=math.inf,
                                   per_frame_s=0.0)
"""A coordinator that costs nothing: the device-side model alone (each stage as long as its
slowest participant's round trip and compute)."""


@dataclass(frozen=True)
class CoordinatorCosts:
    """What one coordinator spends on one model, in seconds; shared by the planner and the
    simulator."""

    pre_s: float
    """Per stage: RMSNorm + quantising (+ encoding) the activation."""
    send_s: float
    """Per activation frame sent (CPU + its NIC time); once per stage with ``broadcast``."""
    recv_s: float
    """Per partial received and summed; the partials of a stage queue for it one at a time."""
    early_s: float
    """The part of ``recv_s`` that lies before the link hands a partial over (measured specs)."""
    embed_s: float
    head_s: float
    """Per token: embedding lookup, and final norm + classifier + sampling."""
    broadcast: bool = False

    @classmethod
    def of(cls, coord: CoordinatorSpec, m: ModelConfig) -> CoordinatorCosts:
        act, part = act_frame_bytes(m), partial_frame_bytes(m)
        send_s = coord.send_s if coord.send_s is not None else coord.per_frame_s + act / coord.bandwidth_Bps
        recv_s = (coord.recv_s if coord.recv_s is not None
                  else coord.per_frame_s + part / coord.bandwidth_Bps + m.dim / coord.ops_per_s)
        early_s = recv_s - (coord.recv_after_s if coord.recv_after_s is not None else recv_s)
        pre_s = coord.stage_s if coord.stage_s is not None else 6 * m.dim / coord.ops_per_s
        embed_s = 0.0 if coord.token_s is not None else m.dim / coord.ops_per_s
        head_s = (coord.token_s if coord.token_s is not None else
                  m.vocab_size * m.dim / coord.int8_macs + (6 * m.dim + 3 * m.vocab_size) / coord.ops_per_s)
        return cls(pre_s, send_s, recv_s, early_s, embed_s, head_s, coord.broadcast)

    @property
    def token_s(self) -> float:
        return self.embed_s + self.head_s

    def send_offsets(self, k: int) -> np.ndarray:
        """When each of ``k`` participants' activation has left (after ``pre_s``), in send order."""
        if self.broadcast:
            return np.full(k, self.send_s)
        return (np.arange(k) + 1) * self.send_s
