"""The int8 (Q8_0) model and the single-device int8 forward pass.

:class:`Q8Model` quantises a float model once, following the unit rules of :mod:`tpfed.compute.share`
(row-wise Q8_0 for wq/wk/wv/w1/w3/w2/classifier, wo quantised per KV group as (dim, gq)
matrices; embedding and norms stay float32).

:class:`Int8Transformer` runs the coordinator-side steps (embedding, RMSNorm, quantising the
activation, adding partials into the residual, final norm, classifier) and gets each layer's
partial vectors from :meth:`Int8Transformer.partials`. Locally that sums every unit's partial
via :class:`tpfed.compute.share.DeviceShards`; the distributed coordinator overrides that one method to
broadcast the activation to its peers and sum what they send back. Every broadcast activation
is kept in :attr:`Int8Transformer.history` so a lost device's KV cache can be rebuilt by replay.

The per-token loop exists once, as the generator :meth:`Int8Transformer.forward_stages`: it
yields ``(layer, stage, activation)`` for every stage and is sent that stage's summed partial.
:meth:`Int8Transformer.forward` drives it with the local units; the coordinator drives it with
the peers' partials. Between two stages the host makes one C call
(``residual_rmsnorm_q8_0``: residual add, RMSNorm, Q8_0) on buffers allocated once.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from tpfed.compute._native import ffi, lib
from tpfed.compute.kernels import (
    Q8_BLOCK,
    Q8Tensor,
    empty_q8_0,
    matmul_q8_0_f32,
    n_blocks,
    quantize_q8_0,
)
from tpfed.compute.share import (
    AttentionWeights,
    DeviceShards,
    MlpWeights,
    ShardError,
    UnitSource,
    check_ranges,
)
from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.llama2c import LlamaWeights, load_llama2c
from tpfed.protocol.schema import Stage  # the wire enum: one definition of a stage's number

STAGES = (Stage.ATTENTION, Stage.MLP)
"""The stages of a layer, in the order they run."""

_F32 = np.dtype(np.float32)
_memmove = ffi.memmove
_from_buffer = ffi.from_buffer
_residual_rmsnorm_q8_0 = lib.residual_rmsnorm_q8_0


@dataclass(frozen=True)
class Q8Layer:
    rms_att: np.ndarray  # (dim,) float32
    rms_ffn: np.ndarray  # (dim,) float32
    wq: Q8Tensor  # (n_heads * head_size, dim)
    wk: Q8Tensor  # (kv_dim, dim)
    wv: Q8Tensor  # (kv_dim, dim)
    wo: tuple[Q8Tensor, ...]  # n_kv_heads x (dim, gq): wo columns of each KV group
    w1: Q8Tensor  # (hidden_dim, dim)
    w3: Q8Tensor  # (hidden_dim, dim)
    w2: Q8Tensor  # (dim, hidden_dim)


def _q8(a: np.ndarray) -> Q8Tensor:
    return quantize_q8_0(np.ascontiguousarray(a, dtype=np.float32))


class Q8Model(UnitSource):
    """The whole model quantised once; hands out unit weights (:class:`UnitSource`)."""

    def __init__(self, config: ModelConfig, token_embedding: np.ndarray, layers: list[Q8Layer],
                 rms_final: np.ndarray, wcls: Q8Tensor) -> None:
        self.config = config
        self.token_embedding = token_embedding  # (vocab_size, dim) float32
        self.layers = layers
        self.rms_final = rms_final  # (dim,) float32
        self.wcls = wcls  # (vocab_size, dim)

    @classmethod
    def from_weights(cls, w: LlamaWeights) -> Q8Model:
        c = w.config
        gq = c.group_q_dim
        layers = []
        for l in range(c.n_layers):  # noqa: E741
            wo = w.wo[l]  # (dim, n_heads * head_size)
            layers.append(Q8Layer(
                rms_att=np.ascontiguousarray(w.rms_att[l]),
                rms_ffn=np.ascontiguousarray(w.rms_ffn[l]),
                wq=_q8(w.wq[l]),
                wk=_q8(w.wk[l]),
                wv=_q8(w.wv[l]),
                wo=tuple(_q8(wo[:, g * gq : (g + 1) * gq]) for g in range(c.n_groups)),
                w1=_q8(w.w1[l]),
                w3=_q8(w.w3[l]),
                w2=_q8(w.w2[l]),
            ))
        return cls(c, w.token_embedding, layers, np.ascontiguousarray(w.rms_final), _q8(w.wcls))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Q8Model:
        return cls.from_weights(load_llama2c(path))

    def attention_unit(self, layer: int, group: int) -> AttentionWeights:
        c = self.config
        if not 0 <= group < c.n_groups:
            raise ShardError(f"KV group {group} outside 0..{c.n_groups - 1}")
        L = self.layers[layer]
        gq, hs = c.group_q_dim, c.head_size
        return AttentionWeights(
            wq=Q8Tensor(L.wq.qs[group * gq : (group + 1) * gq], L.wq.d[group * gq : (group + 1) * gq]),
            wk=Q8Tensor(L.wk.qs[group * hs : (group + 1) * hs], L.wk.d[group * hs : (group + 1) * hs]),
            wv=Q8Tensor(L.wv.qs[group * hs : (group + 1) * hs], L.wv.d[group * hs : (group + 1) * hs]),
            wo=L.wo[group],
        )

    def mlp_unit(self, layer: int, start: int, end: int) -> MlpWeights:
        """Weights of hidden columns [start, end). The w2 columns are the full w2's blocks
        (start is 32-aligned); a view for the full range, a compact copy otherwise."""
        ((a, b),) = check_ranges(self.config, [(start, end)])
        L = self.layers[layer]
        if (a, b) == (0, self.config.hidden_dim):
            w2 = L.w2
        else:
            b0, b1 = a // Q8_BLOCK, n_blocks(b)
            w2 = Q8Tensor(np.ascontiguousarray(L.w2.qs[:, a:b]), np.ascontiguousarray(L.w2.d[:, b0:b1]))
        return MlpWeights(
            w1=Q8Tensor(L.w1.qs[a:b], L.w1.d[a:b]),
            w3=Q8Tensor(L.w3.qs[a:b], L.w3.d[a:b]),
            w2=w2,
        )

    def full_assignment(self) -> dict[int, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
        """Every unit of every layer (the single-device split)."""
        c = self.config
        return {l: (tuple(range(c.n_groups)), ((0, c.hidden_dim),)) for l in range(c.n_layers)}  # noqa: E741

    def nbytes(self) -> int:
        t = self.token_embedding.nbytes + self.rms_final.nbytes + self.wcls.nbytes
        for L in self.layers:
            t += L.rms_att.nbytes + L.rms_ffn.nbytes + sum(w.nbytes for w in L.wo)
            t += sum(m.nbytes for m in (L.wq, L.wk, L.wv, L.w1, L.w3, L.w2))
        return t


class ActivationLog:
    """The Q8_0 activations broadcast for the current sequence: for each layer, stage and
    position, ``dim`` int8 values and their scales. Grows by doubling up to seq_len."""

    def __init__(self, config: ModelConfig, capacity: int = 64) -> None:
        self.config = config
        self._cap = 0
        self._nb = n_blocks(config.dim)
        self._qs = np.empty((config.n_layers, 2, 0, config.dim), np.int8)
        self._d = np.empty((config.n_layers, 2, 0, self._nb), np.uint16)
        self.length = 0  # positions 0..length-1 are recorded (for every layer and stage)
        self._current = 0  # the position being recorded
        self._grow(min(capacity, config.seq_len))

    def _grow(self, cap: int) -> None:
        c = self.config
        qs = np.empty((c.n_layers, 2, cap, c.dim), np.int8)
        d = np.empty((c.n_layers, 2, cap, self._nb), np.uint16)
        qs[:, :, : self._cap] = self._qs
        d[:, :, : self._cap] = self._d
        self._qs, self._d, self._cap = qs, d, cap
        # raw pointers for record(); the arrays above keep the memory alive
        self._pqs = ffi.cast("int8_t *", _from_buffer("int8_t[]", qs))
        self._pd = ffi.cast("uint16_t *", _from_buffer("uint16_t[]", d))

    def reset(self) -> None:
        self.length = 0
        self._current = 0

    def begin(self, pos: int) -> None:
        """Start recording position ``pos``; positions from ``pos`` on are forgotten (a new
        sequence starts at 0, a re-run from an earlier position drops the tail)."""
        if not 0 <= pos <= self.length:
            raise ModelError(f"activation log: position {pos} started with {self.length} recorded")
        if pos >= self._cap:
            self._grow(min(max(2 * self._cap, pos + 1), self.config.seq_len))
        self.length = pos
        self._current = pos

    def record(self, layer: int, stage: Stage, pos: int, x: Q8Tensor) -> None:
        if pos != self._current:
            raise ModelError(f"activation log: recording position {pos} while at {self._current}")
        dim, nb = self.config.dim, self._nb
        if not (0 <= layer < self.config.n_layers and (stage == 0 or stage == 1)
                and x.qs.shape == (dim,)):
            raise ModelError(f"activation log: cannot record layer {layer} stage {stage} of "
                             f"shape {x.qs.shape}")
        i = (2 * layer + stage) * self._cap + pos
        _memmove(self._pqs + i * dim, x._pqs, dim)
        _memmove(self._pd + i * nb, x._pd, 2 * nb)

    def commit(self, pos: int) -> None:
        """Position ``pos`` is complete (every layer and stage recorded)."""
        self.length = pos + 1

    def activations(self, layer: int, stage: Stage, end: int | None = None) -> Q8Tensor:
        """Rows 0..end-1 (default: all complete positions) of (layer, stage), shape (n, dim).
        ``end`` may be ``length + 1`` to include the position being recorded, for the layers
        and stages already recorded at it."""
        n = self.length if end is None else end
        if not 0 <= n <= min(self.length + 1, self._cap):
            raise ModelError(f"activation log holds {self.length} positions, asked for {n}")
        return Q8Tensor(self._qs[layer, stage, :n], self._d[layer, stage, :n])


StageStep = tuple[int, Stage, Q8Tensor]
"""What :meth:`Int8Transformer.forward_stages` yields: (layer, stage, activation)."""


class Int8Transformer:
    """Single-sequence int8 forward: the coordinator-side steps plus :meth:`partials`."""

    def __init__(self, model: Q8Model, shards: DeviceShards | None = None) -> None:
        self.model = model
        c = self.config = model.config
        self.shards = shards if shards is not None else DeviceShards(model, model.full_assignment())
        self.history = ActivationLog(c)
        self.x = np.empty(c.dim, np.float32)  # residual stream
        self._xb = np.empty(c.dim, np.float32)
        self._xq = empty_q8_0(c.dim)
        self.logits = np.empty(c.vocab_size, np.float32)
        # everything the per-stage C call needs, made once
        self._px = _from_buffer("float[]", self.x)
        self._pxb = _from_buffer("float[]", self._xb)
        self._steps = [
            (layer, stage, _from_buffer("float[]", L.rms_att if stage == Stage.ATTENTION else L.rms_ffn))
            for layer, L in enumerate(model.layers) for stage in STAGES
        ]
        self._pfinal = _from_buffer("float[]", model.rms_final)

    def reset(self) -> None:
        self.shards.reset()
        self.history.reset()

    def partials(self, layer: int, stage: Stage, x: Q8Tensor, pos: int) -> np.ndarray:
        """Sum of the partial vectors (dim,) of every unit of ``stage`` in ``layer`` for the
        activation ``x`` at ``pos``, from the local units."""
        att, mlp = self.shards.layers[layer]
        if stage == Stage.ATTENTION:
            return att.forward(x, pos)
        return mlp.forward(x)

    def embed(self, token: int) -> np.ndarray:
        c = self.config
        if not 0 <= token < c.vocab_size:
            raise ModelError(f"token id {token} outside the vocabulary (size {c.vocab_size})")
        self.x[:] = self.model.token_embedding[token]
        return self.x

    def _norm_quantize(self, partial: object, w: object) -> Q8Tensor:
        """x += partial (a C pointer or NULL); the activation = Q8_0(rmsnorm(x, w))."""
        xq = self._xq
        _residual_rmsnorm_q8_0(self._px, partial, w, self.config.dim, self.config.norm_eps,
                               self._pxb, xq._pqs, xq._pd)
        return xq

    def _partial_ptr(self, partial: object) -> object:
        if not (isinstance(partial, np.ndarray) and partial.dtype == _F32
                and partial.shape == self.x.shape and partial.flags.c_contiguous):
            raise ModelError(f"a stage's partial must be a C-contiguous float32 array of shape "
                             f"{self.x.shape}, got {getattr(partial, 'shape', type(partial).__name__)}")
        return _from_buffer("float[]", partial)

    def activation(self, layer: int, stage: Stage, pos: int) -> Q8Tensor:
        """RMSNorm the residual with the stage's norm and quantise it (the vector broadcast);
        recorded in :attr:`history`."""
        xq = self._norm_quantize(ffi.NULL, self._steps[2 * layer + stage][2])
        self.history.record(layer, stage, pos, xq)
        return xq

    def classify(self) -> np.ndarray:
        xq = self._norm_quantize(ffi.NULL, self._pfinal)
        return matmul_q8_0_f32(self.model.wcls, xq, out=self.logits)

    def forward_stages(self, token: int, pos: int) -> Generator[StageStep, np.ndarray, np.ndarray]:
        """The forward pass of ``token`` at ``pos``, stage by stage: yields ``(layer, stage,
        activation)`` for every stage in order and must be sent that stage's summed partial
        (float32 (dim,)), which is added to the residual; returns the logits (vocab_size,)
        (reused by the next pass). The activation is recorded in :attr:`history` and valid
        until the next stage. Drive it with ``send(None)`` first, then ``send(partial)``."""
        c = self.config
        if not 0 <= pos < c.seq_len:
            raise ModelError(f"position {pos} outside the context (seq_len {c.seq_len})")
        if pos > self.history.length:
            raise ModelError(f"position {pos} fed before position {self.history.length}")
        self.embed(token)
        history = self.history
        history.begin(pos)
        norm_quantize, partial_ptr, record = self._norm_quantize, self._partial_ptr, history.record
        partial = ffi.NULL
        for layer, stage, w in self._steps:
            xq = norm_quantize(partial, w)
            record(layer, stage, pos, xq)
            partial = partial_ptr((yield layer, stage, xq))
        history.commit(pos)
        xq = norm_quantize(partial, self._pfinal)
        return matmul_q8_0_f32(self.model.wcls, xq, out=self.logits)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) float32 for ``token`` at ``pos``; reused by the next call.
        :meth:`forward_stages` driven with the local units' partials."""
        stages = self.forward_stages(token, pos)
        partials = self.partials
        partial = None
        try:
            while True:
                layer, stage, xq = stages.send(partial)
                partial = partials(layer, stage, xq, pos)
        except StopIteration as done:
            return done.value
