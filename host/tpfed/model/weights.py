"""Float weights of any supported architecture, in one layout whatever the file format.

Every matrix is (out, in) row-major, as llama2.c stores it (``y = w @ x``); per-layer tensors
are sequences indexed by layer (lists of arrays, or a stacked array for llama2.c files), so
``weights.wq[layer]`` reads the same for every format and the int8 path, written for
:class:`~tpfed.model.llama2c.LlamaWeights`, can take these too. The names are llama2.c's:

- ``rms_att`` / ``rms_ffn`` are the two norms of a layer, whatever their kind. With
  ``config.norm_position == "pre"`` they normalise the input of attention and of the MLP; with
  ``"post"`` (BERT) they normalise the residual after attention and after the MLP.
- ``w1`` is the MLP's first matrix (gate for SwiGLU, up for a plain MLP), ``w3`` the SwiGLU's
  up matrix (None for a plain MLP), ``w2`` the down matrix.
- Query and key rows use llama2.c's RoPE layout (each head's rotation pairs interleaved);
  loaders of Hugging Face checkpoints permute them from the half-split layout.

Optional tensors are None when the architecture has none: biases (``bq`` ... ``b2``), norm
biases (``*_bias``, LayerNorm only), learned ``position_embedding``, ``token_type_embedding``
and the embedding LayerNorm (BERT). ``q8_0`` keeps matrices that were stored as Q8_0 in the
file (GGUF) exactly as they were, keyed ``"wq.3"`` (name.layer) or ``"wcls"``: the dense
arrays hold their exact dequantisation, so the float reference and a re-quantisation agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tpfed.model.config import ModelConfig

LayerTensors = Sequence[np.ndarray]
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LAYER_VECTORS = ("rms_att", "rms_ffn", "rms_att_bias", "rms_ffn_bias", "bq", "bk", "bv", "bo", "b1", "b2", "b3")


@dataclass(frozen=True)
class Q8_0Matrix:
    """A matrix in Q8_0 blocks as a file held it: ``scales`` (rows, blocks) float16 and ``qs``
    (rows, blocks, 32) int8; element (r, 32*b + i) is ``scales[r, b] * qs[r, b, i]``."""

    scales: np.ndarray
    qs: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qs.shape[0], self.qs.shape[1] * self.qs.shape[2])

    def dequantize(self) -> np.ndarray:
        return (self.scales.astype(np.float32)[:, :, None] * self.qs.astype(np.float32)).reshape(self.shape)


@dataclass(frozen=True)
class FloatWeights:
    config: ModelConfig
    token_embedding: np.ndarray  # (vocab_size, dim)
    rms_att: LayerTensors  # (dim,) per layer
    wq: LayerTensors  # (n_heads * head_size, dim)
    wk: LayerTensors  # (n_kv_heads * head_size, dim)
    wv: LayerTensors  # (n_kv_heads * head_size, dim)
    wo: LayerTensors  # (dim, n_heads * head_size)
    rms_ffn: LayerTensors  # (dim,)
    w1: LayerTensors  # (hidden_dim, dim)
    w2: LayerTensors  # (dim, hidden_dim)
    w3: LayerTensors | None  # (hidden_dim, dim); None for a plain (2-matrix) MLP
    rms_final: np.ndarray | None  # (dim,); None for BERT (post-norm: no final norm)
    wcls: np.ndarray | None  # (vocab_size, dim); the embedding when tied; None for an encoder
    rms_att_bias: LayerTensors | None = None
    rms_ffn_bias: LayerTensors | None = None
    rms_final_bias: np.ndarray | None = None
    bq: LayerTensors | None = None
    bk: LayerTensors | None = None
    bv: LayerTensors | None = None
    bo: LayerTensors | None = None
    b1: LayerTensors | None = None
    b2: LayerTensors | None = None
    b3: LayerTensors | None = None
    position_embedding: np.ndarray | None = None  # (seq_len, dim), learned positions
    token_type_embedding: np.ndarray | None = None  # (type_vocab_size, dim)
    embed_norm: np.ndarray | None = None  # (dim,) LayerNorm after the embeddings (BERT)
    embed_norm_bias: np.ndarray | None = None
    q8_0: dict[str, Q8_0Matrix] = field(default_factory=dict)

    @classmethod
    def from_llama2c(cls, w) -> FloatWeights:
        """The same arrays as a :class:`~tpfed.model.llama2c.LlamaWeights` (no copy)."""
        return cls(
            config=w.config, token_embedding=w.token_embedding, rms_att=w.rms_att, wq=w.wq, wk=w.wk,
            wv=w.wv, wo=w.wo, rms_ffn=w.rms_ffn, w1=w.w1, w2=w.w2, w3=w.w3, rms_final=w.rms_final,
            wcls=w.wcls,
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor by a flat name (``"wq.3"``, ``"token_embedding"``), for comparisons."""
        out: dict[str, np.ndarray] = {}
        for name in ("token_embedding", "rms_final", "rms_final_bias", "wcls", "position_embedding",
                     "token_type_embedding", "embed_norm", "embed_norm_bias"):
            t = getattr(self, name)
            if t is not None:
                out[name] = np.asarray(t)
        for name in LAYER_MATRICES + LAYER_VECTORS:
            seq = getattr(self, name)
            if seq is None:
                continue
            for layer in range(self.config.n_layers):
                out[f"{name}.{layer}"] = np.asarray(seq[layer])
        return out


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (each head's first half rotates with its second half) to
    llama2.c's (pairs 2i, 2i+1), for query/key weight rows or biases; a copy."""
    rows = w.shape[0]
    hs = rows // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, hs // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


def half_split_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`interleave_rope_rows` (llama2.c to Hugging Face), as
    transformers' ``convert_llama_weights_to_hf`` permutes Meta's checkpoints."""
    rows = w.shape[0]
    hs = rows // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, hs // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )
