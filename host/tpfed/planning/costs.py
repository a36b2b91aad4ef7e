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
one Q8_0 activation frame and receives one f32 partial frame (the star all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass

from tpfed.model.config import ModelConfig
from tpfed.protocol.fastpath import activation_frame_size, partial_frame_size

QK = 32
"""Q8_0 block length (values per scale) and the MLP column granularity."""



def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def q8_bytes(rows: int, cols: int) -> int:
    """Bytes of a Q8_0 (rows x cols) matrix quantised along its rows (blocks of 32 columns)."""
    return rows * cols + rows * ceil_div(cols, QK) * 2


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
    return mlp_range_bytes(m, min(QK, m.hidden_dim))


def n_blocks(m: ModelConfig) -> int:
    """MLP blocks per layer (the last one may be narrower than 32)."""
    return ceil_div(m.hidden_dim, QK)


def block_widths(m: ModelConfig) -> list[int]:
    nb = n_blocks(m)
    return [QK] * (nb - 1) + [m.hidden_dim - QK * (nb - 1)]


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
            block_bytes=mlp_range_bytes(m, QK) if m.hidden_dim >= QK else mlp_range_bytes(m, widths[0]),
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
    return m.n_layers * (m.n_groups * attn_weight_bytes(m) + mlp_range_bytes(m, QK) * (m.hidden_dim // QK)
                         + mlp_range_bytes(m, m.hidden_dim % QK))


def total_macs_per_token(m: ModelConfig, context: float) -> float:
    """Device-side MACs of one token (every layer's attention and MLP)."""
    return m.n_layers * (m.n_groups * attn_macs(m, context) + m.hidden_dim * mlp_col_macs(m))
