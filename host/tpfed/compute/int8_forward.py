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
import tempfile
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
    UnitParams,
    UnitSource,
    check_ranges,
    unit_params,
)
from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.llama2c import load_llama2c
from tpfed.protocol.schema import Stage  # the wire enum: one definition of a stage's number

STAGES = (Stage.ATTENTION, Stage.MLP)
"""The stages of a layer, in the order they run."""

_F32 = np.dtype(np.float32)
_memmove = ffi.memmove
_from_buffer = ffi.from_buffer
_residual_norm_q8_0 = lib.residual_norm_q8_0


@dataclass(frozen=True)
class Q8Layer:
    rms_att: np.ndarray  # (dim,) float32: the attention's norm (before it, or after it: post-norm)
    rms_ffn: np.ndarray  # (dim,) float32: the MLP's norm
    wq: Q8Tensor  # (n_heads * head_size, dim)
    wk: Q8Tensor  # (kv_dim, dim)
    wv: Q8Tensor  # (kv_dim, dim)
    wo: tuple[Q8Tensor, ...]  # n_kv_heads x (dim, gq): wo columns of each KV group
    w1: Q8Tensor  # (hidden_dim, dim)
    w3: Q8Tensor | None  # (hidden_dim, dim); None for a plain (2-matrix) MLP
    w2: Q8Tensor  # (dim, hidden_dim)
    # float32 vectors, None when the architecture has none
    rms_att_bias: np.ndarray | None = None  # LayerNorm biases
    rms_ffn_bias: np.ndarray | None = None
    bq: np.ndarray | None = None  # (n_heads * head_size,): the devices add their rows
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    b1: np.ndarray | None = None  # (hidden_dim,)
    b3: np.ndarray | None = None
    bo: np.ndarray | None = None  # (dim,): added once, by the coordinator
    b2: np.ndarray | None = None  # (dim,): added once, by the coordinator


def _q8(a: np.ndarray) -> Q8Tensor:
    return quantize_q8_0(np.ascontiguousarray(a, dtype=np.float32))


def _f32(a) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def _kept(blocks) -> Q8Tensor:
    """A file's Q8_0 blocks (:class:`tpfed.model.weights.Q8_0Matrix`) as a Q8Tensor, values
    and scales as they were."""
    rows, cols = blocks.shape
    return Q8Tensor(np.ascontiguousarray(blocks.qs).reshape(rows, cols),
                    np.ascontiguousarray(blocks.scales).view(np.uint16))


def _at(seq, layer: int):
    return None if seq is None else seq[layer]


class Q8Model(UnitSource):
    """The whole model quantised once; hands out unit weights (:class:`UnitSource`).

    Matrices a GGUF file held as Q8_0 are taken as they are (the block is ours); every other
    matrix is quantised here. Embeddings, norms and biases stay float32."""

    def __init__(self, config: ModelConfig, token_embedding: np.ndarray, layers: list[Q8Layer],
                 rms_final: np.ndarray | None, wcls: Q8Tensor | None, *,
                 rms_final_bias: np.ndarray | None = None,
                 position_embedding: np.ndarray | None = None,
                 token_type_embedding: np.ndarray | None = None,
                 embed_norm: np.ndarray | None = None,
                 embed_norm_bias: np.ndarray | None = None) -> None:
        self.config = config
        self.token_embedding = token_embedding  # (vocab_size, dim) float32
        self.layers = layers
        self.rms_final = rms_final  # (dim,) float32; None for post-norm models
        self.rms_final_bias = rms_final_bias
        self.wcls = wcls  # (vocab_size, dim); None for an encoder
        self.position_embedding = position_embedding  # (seq_len, dim) learned positions
        self.token_type_embedding = token_type_embedding  # (type_vocab_size, dim)
        self.embed_norm = embed_norm  # (dim,) LayerNorm of the embeddings (BERT)
        self.embed_norm_bias = embed_norm_bias
        self._params = unit_params(config)

    @property
    def params(self) -> UnitParams:
        return self._params

    @classmethod
    def from_weights(cls, w) -> Q8Model:
        """From :class:`~tpfed.model.weights.FloatWeights` (any architecture) or llama2.c's
        :class:`~tpfed.model.llama2c.LlamaWeights`."""
        kept = getattr(w, "q8_0", None) or {}
        c = w.config
        gq = c.group_q_dim

        def q8(name: str, layer: int | None = None) -> Q8Tensor:
            key = name if layer is None else f"{name}.{layer}"
            if key in kept:
                return _kept(kept[key])
            return _q8(getattr(w, name) if layer is None else getattr(w, name)[layer])

        def wo_groups(layer: int) -> tuple[Q8Tensor, ...]:
            key = f"wo.{layer}"
            if key in kept and gq % Q8_BLOCK == 0:  # the file's blocks split along groups
                t = _kept(kept[key])
                nb = gq // Q8_BLOCK
                return tuple(Q8Tensor(np.ascontiguousarray(t.qs[:, g * gq:(g + 1) * gq]),
                                      np.ascontiguousarray(t.d[:, g * nb:(g + 1) * nb]))
                             for g in range(c.n_groups))
            wo = np.asarray(w.wo[layer])  # (dim, n_heads * head_size)
            return tuple(_q8(wo[:, g * gq:(g + 1) * gq]) for g in range(c.n_groups))

        layers = []
        for l in range(c.n_layers):  # noqa: E741
            layers.append(Q8Layer(
                rms_att=_f32(w.rms_att[l]), rms_ffn=_f32(w.rms_ffn[l]),
                wq=q8("wq", l), wk=q8("wk", l), wv=q8("wv", l), wo=wo_groups(l),
                w1=q8("w1", l), w3=None if w.w3 is None else q8("w3", l), w2=q8("w2", l),
                **{name: _f32(_at(getattr(w, name, None), l))
                   for name in ("rms_att_bias", "rms_ffn_bias", "bq", "bk", "bv", "b1", "b3", "bo", "b2")},
            ))
        wcls = None
        if "wcls" in kept:
            wcls = _kept(kept["wcls"])
        elif w.wcls is not None and c.shared_classifier and "token_embedding" in kept:
            wcls = _kept(kept["token_embedding"])
        elif w.wcls is not None:
            wcls = _q8(w.wcls)
        return cls(c, _f32(w.token_embedding), layers, _f32(w.rms_final), wcls,
                   rms_final_bias=_f32(getattr(w, "rms_final_bias", None)),
                   position_embedding=_f32(getattr(w, "position_embedding", None)),
                   token_type_embedding=_f32(getattr(w, "token_type_embedding", None)),
                   embed_norm=_f32(getattr(w, "embed_norm", None)),
                   embed_norm_bias=_f32(getattr(w, "embed_norm_bias", None)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Q8Model:
        """Any model file or folder :func:`tpfed.model.formats.load_float_model` reads."""
        from tpfed.model.formats import detect_format, load_float_model

        if detect_format(path)[0] == "llama2c":
            return cls.from_weights(load_llama2c(detect_format(path)[1]))
        return cls.from_weights(load_float_model(path).weights)

    def attention_unit(self, layer: int, group: int) -> AttentionWeights:
        c = self.config
        if not 0 <= group < c.n_groups:
            raise ShardError(f"KV group {group} outside 0..{c.n_groups - 1}")
        L = self.layers[layer]
        gq, hs = c.group_q_dim, c.head_size
        q0, q1, k0, k1 = group * gq, (group + 1) * gq, group * hs, (group + 1) * hs
        return AttentionWeights(
            wq=Q8Tensor(L.wq.qs[q0:q1], L.wq.d[q0:q1]),
            wk=Q8Tensor(L.wk.qs[k0:k1], L.wk.d[k0:k1]),
            wv=Q8Tensor(L.wv.qs[k0:k1], L.wv.d[k0:k1]),
            wo=L.wo[group],
            bq=None if L.bq is None else L.bq[q0:q1],
            bk=None if L.bk is None else L.bk[k0:k1],
            bv=None if L.bv is None else L.bv[k0:k1],
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
            w3=None if L.w3 is None else Q8Tensor(L.w3.qs[a:b], L.w3.d[a:b]),
            w2=w2,
            b1=None if L.b1 is None else L.b1[a:b],
            b3=None if L.b3 is None else L.b3[a:b],
        )

    def full_assignment(self) -> dict[int, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
        """Every unit of every layer (the single-device split)."""
        c = self.config
        return {l: (tuple(range(c.n_groups)), ((0, c.hidden_dim),)) for l in range(c.n_layers)}  # noqa: E741

    def nbytes(self) -> int:
        t = self.token_embedding.nbytes
        for extra in (self.rms_final, self.rms_final_bias, self.wcls, self.position_embedding,
                      self.token_type_embedding, self.embed_norm, self.embed_norm_bias):
            t += 0 if extra is None else extra.nbytes
        for L in self.layers:
            t += sum(w.nbytes for w in L.wo)
            t += sum(m.nbytes for m in (L.wq, L.wk, L.wv, L.w1, L.w3, L.w2) if m is not None)
            t += sum(v.nbytes for v in (L.rms_att, L.rms_ffn, L.rms_att_bias, L.rms_ffn_bias, L.bq,
                                        L.bk, L.bv, L.b1, L.b3, L.bo, L.b2) if v is not None)
        return t


class ActivationLog:
    """What a replay needs to rebuild a KV cache exactly: the Q8_0 input of every layer's
    ATTENTION stage for the current sequence (``dim`` int8 values and their fp16 scales per
    layer and position; the MLP stages' inputs are not needed and not kept). Grows by doubling
    up to seq_len. With ``spill_dir`` the log lives in a file there (memory-mapped; the page
    cache decides what stays in RAM) instead of anonymous memory."""

    def __init__(self, config: ModelConfig, capacity: int = 64,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = config
        self._cap = 0
        self._nb = n_blocks(config.dim)
        self._spill = spill_dir
        self._files: list = []
        self._qs = np.empty((config.n_layers, 0, config.dim), np.int8)
        self._d = np.empty((config.n_layers, 0, self._nb), np.uint16)
        self.length = 0  # positions 0..length-1 are recorded (for every layer)
        self._current = 0  # the position being recorded
        self._grow(min(capacity, config.seq_len))

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position takes: n_layers x (dim + 2 * ceil(dim/32))."""
        return self.config.n_layers * (self.config.dim + 2 * self._nb)

    @property
    def nbytes(self) -> int:
        """Bytes the log holds now (its capacity, recorded or not)."""
        return int(self._qs.nbytes + self._d.nbytes)

    def _array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        if self._spill is None:
            return np.empty(shape, dtype)
        # lives as long as the array mapped on it (closed, and so deleted, with the log)
        f = tempfile.TemporaryFile(dir=self._spill, prefix="tpfed-log-")  # noqa: SIM115
        self._files.append(f)
        return np.memmap(f, dtype=dtype, mode="w+", shape=shape)

    def _grow(self, cap: int) -> None:
        c = self.config
        qs = self._array((c.n_layers, cap, c.dim), np.int8)
        d = self._array((c.n_layers, cap, self._nb), np.uint16)
        qs[:, : self._cap] = self._qs
        d[:, : self._cap] = self._d
        self._qs, self._d, self._cap = qs, d, cap
        self._files = self._files[-2:]  # the older files go with the arrays that used them
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
        """Keep the input of (layer, stage) at ``pos`` if a replay needs it (ATTENTION)."""
        if pos != self._current:
            raise ModelError(f"activation log: recording position {pos} while at {self._current}")
        dim, nb = self.config.dim, self._nb
        if not (0 <= layer < self.config.n_layers and x.qs.shape == (dim,)):
            raise ModelError(f"activation log: cannot record layer {layer} stage {stage} of "
                             f"shape {x.qs.shape}")
        if stage != Stage.ATTENTION:
            return
        i = layer * self._cap + pos
        _memmove(self._pqs + i * dim, x._pqs, dim)
        _memmove(self._pd + i * nb, x._pd, 2 * nb)

    def commit(self, pos: int) -> None:
        """Position ``pos`` is complete (every layer recorded)."""
        self.length = pos + 1

    def activations(self, layer: int, stage: Stage = Stage.ATTENTION,
                    end: int | None = None) -> Q8Tensor:
        """Rows 0..end-1 (default: all complete positions) of the ATTENTION inputs of
        ``layer``, shape (n, dim). ``end`` may be ``length + 1`` to include the position being
        recorded, for the layers already recorded at it."""
        if stage != Stage.ATTENTION:
            raise ModelError("activation log: only the ATTENTION inputs are kept (a replay needs "
                             "nothing else)")
        n = self.length if end is None else end
        if not 0 <= n <= min(self.length + 1, self._cap):
            raise ModelError(f"activation log holds {self.length} positions, asked for {n}")
        return Q8Tensor(self._qs[layer, :n], self._d[layer, :n])


StageStep = tuple[int, Stage, Q8Tensor]
"""What :meth:`Int8Transformer.forward_stages` yields: (layer, stage, activation)."""


class Int8Transformer:
    """Single-sequence int8 forward: the coordinator-side steps plus :meth:`partials`.

    Between two stages the coordinator adds the stage's summed partial (and, once, the bias
    of its output or down projection) into the residual, normalises it as the architecture
    says (RMSNorm or LayerNorm, before the next stage or, post-norm, after this one) and
    quantises it: one ``residual_norm_q8_0`` call (tpfed_residual.h). Embeddings (token,
    learned position, token type, embedding LayerNorm) and the classifier are the
    coordinator's too."""

    def __init__(self, model: Q8Model, shards: DeviceShards | None = None) -> None:
        self.model = model
        c = self.config = model.config
        self.shards = shards if shards is not None else DeviceShards(model, model.full_assignment())
        self.history = ActivationLog(c)
        self.x = np.empty(c.dim, np.float32)  # residual stream
        self._xb = np.empty(c.dim, np.float32)
        self._xq = empty_q8_0(c.dim)
        self.logits = np.empty(c.vocab_size, np.float32)
        self._kind = ((lib.TPFED_NORM_LAYER if c.norm == "layer" else 0)
                      | (lib.TPFED_NORM_POST if c.norm_position == "post" else 0))
        # everything the per-stage C call needs, made once
        self._px = _from_buffer("float[]", self.x)
        self._pxb = _from_buffer("float[]", self._xb)
        self._steps, self._final = self._make_steps()

    def _make_steps(self) -> tuple[list, tuple]:
        """Per stage (layer, stage, norm weight, norm bias, bias added with the partial that
        comes before it) as C pointers (NULL for none), and the final step's (norm weight, norm
        bias, bias). Pre-norm: a stage's input is its own norm of the residual. Post-norm: the
        residual is normalised after each stage with that stage's norm and broadcast as is."""
        m = self.model
        keep = self._keep = []

        def ptr(a):
            if a is None:
                return ffi.NULL
            keep.append(a)
            return _from_buffer("float[]", a)

        post = self.config.norm_position == "post"
        norms = []  # per stage: (weight, bias) of its norm, and the bias of its output
        for L in m.layers:
            norms.append((L.rms_att, L.rms_att_bias, L.bo))
            norms.append((L.rms_ffn, L.rms_ffn_bias, L.b2))
        steps = []
        for i, (layer, stage) in enumerate((l, s) for l in range(len(m.layers)) for s in STAGES):  # noqa: E741
            bias = ptr(norms[i - 1][2]) if i else ffi.NULL
            if post:
                w, b = (norms[i - 1][0], norms[i - 1][1]) if i else (None, None)
            else:
                w, b = norms[i][0], norms[i][1]
            steps.append((layer, stage, ptr(w), ptr(b), bias))
        if post:
            final = (ptr(norms[-1][0]), ptr(norms[-1][1]), ptr(norms[-1][2]))
        else:
            final = (ptr(m.rms_final), ptr(m.rms_final_bias), ptr(norms[-1][2]))
        return steps, final

    @property
    def params(self) -> UnitParams:
        return self.model.params

    def reset(self) -> None:
        self.shards.reset()
        self.history.reset()

    def partials(self, layer: int, stage: Stage, x: Q8Tensor, pos: int) -> np.ndarray:
        """Sum of the partial vectors (dim,) of every unit of ``stage`` in ``layer`` for the
        activation ``x`` at ``pos``, from the local units; (n, dim) for the rows (n, dim) of
        an encoder's sequence starting at ``pos``."""
        att, mlp = self.shards.layers[layer]
        if x.qs.ndim == 2:
            return att.forward_rows(x, pos) if stage == Stage.ATTENTION else mlp.forward_rows(x)
        if stage == Stage.ATTENTION:
            return att.forward(x, pos)
        return mlp.forward(x)

    def _embed_into(self, out: np.ndarray, token: int, pos: int, token_type: int = 0) -> None:
        c, m = self.config, self.model
        if not 0 <= token < c.vocab_size:
            raise ModelError(f"token id {token} outside the vocabulary (size {c.vocab_size})")
        out[:] = m.token_embedding[token]
        if m.position_embedding is not None:
            out += m.position_embedding[pos]
        if m.token_type_embedding is not None:
            if not 0 <= token_type < m.token_type_embedding.shape[0]:
                raise ModelError(f"token type {token_type} outside 0..{m.token_type_embedding.shape[0] - 1}")
            out += m.token_type_embedding[token_type]
        if m.embed_norm is not None:
            lib.layernorm_f32(_from_buffer("float[]", out), _from_buffer("float[]", out),
                              _from_buffer("float[]", m.embed_norm),
                              ffi.NULL if m.embed_norm_bias is None else _from_buffer("float[]", m.embed_norm_bias),
                              c.dim, c.norm_eps)

    def embed(self, token: int, pos: int = 0) -> np.ndarray:
        self._embed_into(self.x, token, pos)
        return self.x

    def _norm_quantize(self, partial: object, step: tuple) -> Q8Tensor:
        """x += partial (+ bias) (a C pointer or NULL); the activation = Q8_0(norm(x))."""
        xq = self._xq
        w, b, bias = step
        _residual_norm_q8_0(self._px, partial, bias if partial != ffi.NULL else ffi.NULL, w, b,
                            self.config.dim, self.config.norm_eps, self._kind, self._pxb,
                            xq._pqs, xq._pd)
        return xq

    def _partial_ptr(self, partial: object, shape: tuple[int, ...] | None = None) -> object:
        shape = shape or self.x.shape
        if not (isinstance(partial, np.ndarray) and partial.dtype == _F32
                and partial.shape == shape and partial.flags.c_contiguous):
            raise ModelError(f"a stage's partial must be a C-contiguous float32 array of shape "
                             f"{shape}, got {getattr(partial, 'shape', type(partial).__name__)}")
        return _from_buffer("float[]", partial)

    def activation(self, layer: int, stage: Stage, pos: int) -> Q8Tensor:
        """Normalise the residual as the stage's input and quantise it (the vector broadcast);
        recorded in :attr:`history`."""
        _, _, w, b, bias = self._steps[2 * layer + stage]
        xq = self._norm_quantize(ffi.NULL, (w, b, bias))
        self.history.record(layer, stage, pos, xq)
        return xq

    def classify(self) -> np.ndarray:
        xq = self._norm_quantize(ffi.NULL, self._final)
        if self.model.wcls is None:
            return self._xb
        return matmul_q8_0_f32(self.model.wcls, xq, out=self.logits)

    def forward_stages(self, token, pos: int,
                       token_types=None) -> Generator[StageStep, np.ndarray, np.ndarray]:
        """The forward pass of ``token`` at ``pos``, stage by stage: yields ``(layer, stage,
        activation)`` for every stage in order and must be sent that stage's summed partial
        (float32 (dim,)), which is added to the residual; returns the logits (vocab_size,)
        (reused by the next pass). The activation is recorded in :attr:`history` and valid
        until the next stage. Drive it with ``send(None)`` first, then ``send(partial)``.

        An encoder (non-causal) takes its whole sequence at once: ``token`` is the list of
        token ids (``token_types`` optional), ``pos`` 0; the activations are (n, dim) and the
        partials (n, dim); it returns the last hidden states (n, dim) (not recorded in
        :attr:`history`). The stages are the same, in the same order."""
        c = self.config
        if not isinstance(token, int | np.integer):
            return (yield from self._sequence_stages(token, pos, token_types))
        if not c.causal:
            raise ModelError(f"{c.arch} is an encoder: its forward pass takes the whole sequence")
        if not 0 <= pos < c.seq_len:
            raise ModelError(f"position {pos} outside the context (seq_len {c.seq_len})")
        if pos > self.history.length:
            raise ModelError(f"position {pos} fed before position {self.history.length}")
        self._embed_into(self.x, int(token), pos)
        history = self.history
        history.begin(pos)
        px, pxb, xq, dim, eps, kind = self._px, self._pxb, self._xq, c.dim, c.norm_eps, self._kind
        pqs, pd = xq._pqs, xq._pd
        partial_ptr, record = self._partial_ptr, history.record
        partial = ffi.NULL
        for layer, stage, w, b, bias in self._steps:
            _residual_norm_q8_0(px, partial, bias, w, b, dim, eps, kind, pxb, pqs, pd)
            record(layer, stage, pos, xq)
            partial = partial_ptr((yield layer, stage, xq))
        history.commit(pos)
        w, b, bias = self._final
        _residual_norm_q8_0(px, partial, bias, w, b, dim, eps, kind, pxb, pqs, pd)
        return matmul_q8_0_f32(self.model.wcls, xq, out=self.logits)

    def _sequence_stages(self, tokens, pos: int, token_types) -> Generator[StageStep, np.ndarray, np.ndarray]:
        """:meth:`forward_stages` over a whole sequence (encoders)."""
        c = self.config
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if c.causal:
            raise ModelError(f"{c.arch} is a decoder: feed it one token at a time")
        if pos != 0 or not 0 < n <= c.seq_len:
            raise ModelError(f"an encoder input needs 1..{c.seq_len} tokens from position 0, got {n}")
        types = [0] * n if token_types is None else [int(t) for t in token_types]
        if len(types) != n:
            raise ModelError(f"{len(types)} token types for {n} tokens")
        x = np.empty((n, c.dim), np.float32)
        for r in range(n):
            self._embed_into(x[r], tokens[r], r, types[r])
        xb = np.empty_like(x)
        xq = empty_q8_0((n, c.dim))
        nb = xq.d.shape[1]
        px, pxb = ffi.cast("float *", _from_buffer("float[]", x)), ffi.cast("float *", _from_buffer("float[]", xb))
        pqs, pd = ffi.cast("int8_t *", xq._pqs), ffi.cast("uint16_t *", xq._pd)
        dim, eps, kind = c.dim, c.norm_eps, self._kind
        partial = None
        for layer, stage, w, b, bias in [*self._steps, (None, None, *self._final)]:
            pp = None if partial is None else ffi.cast("float *", self._partial_ptr(partial, x.shape))
            for r in range(n):
                _residual_norm_q8_0(px + r * dim, ffi.NULL if pp is None else pp + r * dim, bias,
                                    w, b, dim, eps, kind, pxb + r * dim, pqs + r * dim, pd + r * nb)
            if layer is None:
                break
            partial = yield layer, stage, xq
        return xb

    def forward(self, token, pos: int, token_types=None) -> np.ndarray:
        """Logits (vocab_size,) float32 for ``token`` at ``pos``; reused by the next call
        (an encoder: the hidden states of the sequence ``token``).
        :meth:`forward_stages` driven with the local units' partials."""
        stages = self.forward_stages(token, pos, token_types)
        partials = self.partials
        partial = None
        try:
            while True:
                layer, stage, xq = stages.send(partial)
                partial = partials(layer, stage, xq, pos)
        except StopIteration as done:
            return done.value


# ---------------------------------------------------------------------------------------------
# streaming load of Hugging Face Llama-family checkpoints straight to Q8_0


def _q8_raw(files, name: str, shape: tuple[int, int]) -> Q8Tensor:
    """Q8_0 of a memory-mapped safetensors matrix: BF16/F16 quantised by one C call per
    tensor without a float32 copy (the same bits as quantising its float32 values), F32 as is.
    Non-finite values are refused."""
    f, dtype, got, offset, nbytes = files.where[name]
    if tuple(got) != tuple(shape):
        raise ModelError(f"{files.folder}: tensor {name} has shape {tuple(got)}, expected {tuple(shape)}")
    if dtype not in ("BF16", "F16"):
        a = files.get(name)
        if not np.isfinite(a).all():
            raise ModelError(f"{files.folder}: tensor {name} holds NaN or infinite values")
        return _q8(a)
    if f not in files._maps:
        files._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
    raw = files._maps[f][offset:offset + nbytes].view(np.uint16)
    bf16 = int(dtype == "BF16")
    px = ffi.cast("uint16_t *", _from_buffer("uint16_t[]", raw))
    if not lib.all_finite_16(px, raw.size, bf16):
        raise ModelError(f"{files.folder}: tensor {name} holds NaN or infinite values")
    out = empty_q8_0(shape)
    rows, cols = shape
    if cols % Q8_BLOCK == 0:
        lib.quantize_16_q8_0(out._pqs, out._pd, px, raw.size, bf16)
    else:
        nb = n_blocks(cols)
        pq, pd = ffi.cast("int8_t *", out._pqs), ffi.cast("uint16_t *", out._pd)
        for r in range(rows):
            lib.quantize_16_q8_0(pq + r * cols, pd + r * nb, px + r * cols, cols, bf16)
    return out


def _rope_rows(t: Q8Tensor, n_heads: int) -> Q8Tensor:
    """Hugging Face's half-split rotary rows to llama2.c's interleaved order: whole Q8_0 rows
    move, so this equals quantising the permuted float rows."""
    rows = t.shape[0]
    hs = rows // n_heads
    perm = np.arange(rows).reshape(n_heads, 2, hs // 2).swapaxes(1, 2).reshape(rows)
    return Q8Tensor(np.ascontiguousarray(t.qs[perm]), np.ascontiguousarray(t.d[perm]))


LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def load_hf_q8(folder: str | os.PathLike[str], threads: int | None = None) -> Q8Model:
    """A Llama-family Hugging Face folder (Llama, Mistral, Qwen2) straight to a
    :class:`Q8Model`: tensors are read once from the memory-mapped safetensors and quantised
    without float32 copies, layers in parallel threads (the C calls release the GIL). Gives the
    same model as ``Q8Model.from_weights(load_hf(folder))``."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from tpfed.model.hf import _prefixed, _SafetensorsFiles, read_hf_config

    folder = Path(folder)
    c, _ = read_hf_config(folder)
    if c.arch not in LLAMA_FAMILY:
        raise ModelError(f"{folder}: {c.arch} is not a Llama-family model")
    files = _SafetensorsFiles(folder)
    pre = _prefixed(files, ("model.", ""), "embed_tokens.weight")
    d, q, kv, h = c.dim, c.n_heads * c.head_size, c.kv_dim, c.hidden_dim
    gq = c.group_q_dim

    def vec(name: str, n: int) -> np.ndarray:
        if name not in files:
            raise ModelError(f"{folder}: tensor {name} is missing")
        a = np.ascontiguousarray(files.get(name), dtype=np.float32)
        if a.shape != (n,) or not np.isfinite(a).all():
            raise ModelError(f"{folder}: tensor {name} has shape {a.shape} (expected ({n},)) or non-finite values")
        return a

    def mat(name: str, shape: tuple[int, int]) -> Q8Tensor:
        if name not in files:
            raise ModelError(f"{folder}: tensor {name} is missing")
        return _q8_raw(files, name, shape)

    def layer(i: int) -> Q8Layer:
        p = f"{pre}layers.{i}."
        wo = np.asarray(files.get(p + "self_attn.o_proj.weight"))
        if wo.shape != (d, q):
            raise ModelError(f"{folder}: tensor {p}self_attn.o_proj.weight has shape {wo.shape}")
        wo_groups = tuple(_q8(np.ascontiguousarray(wo[:, g * gq:(g + 1) * gq], dtype=np.float32))
                          for g in range(c.n_groups))
        bias = {}
        if c.qkv_bias:
            from tpfed.model.weights import interleave_rope_rows

            bias["bq"] = interleave_rope_rows(vec(p + "self_attn.q_proj.bias", q), c.n_heads)
            bias["bk"] = interleave_rope_rows(vec(p + "self_attn.k_proj.bias", kv), c.n_kv_heads)
            bias["bv"] = vec(p + "self_attn.v_proj.bias", kv)
        if c.o_bias:
            bias["bo"] = vec(p + "self_attn.o_proj.bias", d)
        if c.mlp_bias:
            bias["b1"] = vec(p + "mlp.gate_proj.bias", h)
            bias["b3"] = vec(p + "mlp.up_proj.bias", h)
            bias["b2"] = vec(p + "mlp.down_proj.bias", d)
        return Q8Layer(
            rms_att=vec(p + "input_layernorm.weight", d), rms_ffn=vec(p + "post_attention_layernorm.weight", d),
            wq=_rope_rows(mat(p + "self_attn.q_proj.weight", (q, d)), c.n_heads),
            wk=_rope_rows(mat(p + "self_attn.k_proj.weight", (kv, d)), c.n_kv_heads),
            wv=mat(p + "self_attn.v_proj.weight", (kv, d)), wo=wo_groups,
            w1=mat(p + "mlp.gate_proj.weight", (h, d)), w3=mat(p + "mlp.up_proj.weight", (h, d)),
            w2=mat(p + "mlp.down_proj.weight", (d, h)), **bias)

    emb_name = pre + "embed_tokens.weight"
    with ThreadPoolExecutor(max_workers=threads or max(1, os.cpu_count() or 1)) as pool:
        layers_f = [pool.submit(layer, i) for i in range(c.n_layers)]
        head = "lm_head.weight" if not c.shared_classifier else emb_name
        if head not in files:
            raise ModelError(f"{folder}: tensor {head} is missing (tie_word_embeddings is false)")
        wcls_f = pool.submit(mat, head, (c.vocab_size, d))
        emb = np.asarray(files.get(emb_name), dtype=np.float32)  # float32: rows are looked up
        if emb.shape != (c.vocab_size, d) or not np.isfinite(emb).all():
            raise ModelError(f"{folder}: tensor {emb_name} has shape {emb.shape} or non-finite values")
        layers = [f.result() for f in layers_f]
        wcls = wcls_f.result()
    return Q8Model(c, emb, layers, vec(pre + "norm.weight", d), wcls)
