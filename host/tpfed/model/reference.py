"""Float32 reference forward pass (numpy) of every supported architecture, the oracle the int8
paths are measured against and itself checked against transformers.

For llama2.c's Llama it follows ``run.c``'s ``forward`` step by step: RMSNorm (eps from the
config, 1e-5), RoPE on interleaved pairs, grouped-query attention, SwiGLU MLP, classifier. The
other architectures change only what their config says:

- Mistral: a sliding window (position i attends to j with i - window < j <= i);
- Qwen2: biases on q, k and v;
- Llama 3 / linear RoPE scaling: the rotation frequencies (``rope_frequencies``);
- GPT-2: LayerNorm, tanh GELU, learned positions, biases everywhere, tied classifier;
- BERT: post-LayerNorm, exact GELU, token types, an embedding LayerNorm, and bidirectional
  attention, so :class:`FloatEncoder` takes the whole sequence at once; ``embed`` pools it.
"""

from __future__ import annotations

import math

import numpy as np

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.weights import FloatWeights

_F1 = np.float32(1.0)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of a vector, or of each row of a matrix."""
    if x.ndim == 1:
        ss = np.float32(np.dot(x, x) / np.float32(x.size) + np.float32(eps))
        return (w * (x * np.float32(1.0 / np.sqrt(ss)))).astype(np.float32, copy=False)
    ss = (np.einsum("ij,ij->i", x, x) / np.float32(x.shape[-1]) + np.float32(eps)).astype(np.float32)
    return (w * (x * (_F1 / np.sqrt(ss))[:, None])).astype(np.float32, copy=False)


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch)."""
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True, dtype=np.float32)
    return ((d / np.sqrt(var + np.float32(eps))) * w + b).astype(np.float32, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return (np.float32(0.5) * x * (_F1 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))).astype(np.float32)


_ERF = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)) (BERT's ``gelu``), erf in double precision."""
    e = _ERF(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64)
    return (0.5 * x.astype(np.float64) * (1.0 + e)).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (_F1 + np.exp(-x))).astype(np.float32, copy=False)


def rope_frequencies(head_size: int, theta: float, config: ModelConfig | None = None) -> np.ndarray:
    """Rotation frequency of each pair, float32: ``theta^(-j/head_size)`` for j = 0, 2, 4, ...
    (run.c's, and transformers' ``inv_freq``), rescaled as ``config.rope_scaling`` asks."""
    j = np.arange(0, head_size, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(theta), j / np.float32(head_size))).astype(np.float32)
    return freq if config is None else scale_rope_frequencies(freq, config)


def scale_rope_frequencies(freq: np.ndarray, config: ModelConfig) -> np.ndarray:
    """``freq`` (float32) rescaled as ``config.rope_scaling`` asks (unchanged when it asks
    nothing)."""
    if not config.rope_scaling:
        return freq
    factor = np.float32(config.rope_factor)
    if config.rope_scaling == "linear":
        return (freq / factor).astype(np.float32)
    # llama3 (transformers' _compute_llama3_parameters, in float32 as it computes them)
    old = float(config.rope_original_max_pos)
    lo, hi = float(config.rope_low_freq_factor), float(config.rope_high_freq_factor)
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = np.float32(2 * math.pi) / freq
    scaled = np.where(wavelen > np.float32(low_wavelen), freq / factor, freq).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
    smoothed = ((_F1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < np.float32(high_wavelen)) & ~(wavelen > np.float32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    head_size: int, seq_len: int, theta: float, config: ModelConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of ``pos * freq_j`` (see :func:`rope_frequencies`), shape (seq_len,
    head_size // 2), float32."""
    freq = rope_frequencies(head_size, theta, config)
    val = np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]
    return np.cos(val).astype(np.float32), np.sin(val).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate each (x[..., 2i], x[..., 2i+1]) pair in place; x is (heads, head_size) with
    cos/sin (head_size/2,), or (rows, heads, head_size) with cos/sin (rows, 1, head_size/2)."""
    v0 = x[..., 0::2].copy()
    v1 = x[..., 1::2].copy()
    x[..., 0::2] = v0 * cos - v1 * sin
    x[..., 1::2] = v0 * sin + v1 * cos


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ np.asarray(w).T if x.ndim == 2 else np.asarray(w) @ x
    if b is not None:
        y = y + b
    return y.astype(np.float32, copy=False)


def _at(seq, layer: int):
    return None if seq is None else seq[layer]


class _Core:
    """What decoders and encoders share: embeddings, norms, the MLP, one attention."""

    def __init__(self, weights) -> None:
        if not isinstance(weights, FloatWeights):
            weights = FloatWeights.from_llama2c(weights)
        self.w = weights
        c = self.config = weights.config
        if c.position == "rope":
            if c.head_size % 2:
                raise ModelError(f"{c.name}: head size {c.head_size} is odd; RoPE needs pairs")
            self.cos, self.sin = rope_tables(c.head_size, c.seq_len, c.rope_theta, c)

    def _norm(self, x: np.ndarray, w, b) -> np.ndarray:
        c = self.config
        if c.norm == "rms":
            return rmsnorm(x, w, c.norm_eps)
        return layernorm(x, w, b, c.norm_eps)

    def _embed(self, tokens: np.ndarray, positions: np.ndarray, types: np.ndarray | None) -> np.ndarray:
        c, w = self.config, self.w
        if tokens.size and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
            bad = int(tokens[(tokens < 0) | (tokens >= c.vocab_size)][0])
            raise ModelError(f"token id {bad} outside the vocabulary (size {c.vocab_size})")
        if positions.size and (positions.min() < 0 or positions.max() >= c.seq_len):
            raise ModelError(f"position {int(positions.max())} outside the context (seq_len {c.seq_len})")
        x = np.array(w.token_embedding[tokens], dtype=np.float32)
        if c.position == "learned":
            x += w.position_embedding[positions]
        if w.token_type_embedding is not None:
            types = np.zeros_like(tokens) if types is None else np.asarray(types)
            if types.shape != tokens.shape or types.min() < 0 or types.max() >= c.type_vocab_size:
                raise ModelError(f"token types must be one per token, in 0..{c.type_vocab_size - 1}")
            x += w.token_type_embedding[types]
        if w.embed_norm is not None:
            x = self._norm(x, w.embed_norm, w.embed_norm_bias)
        return x

    def _mlp(self, layer: int, h: np.ndarray) -> np.ndarray:
        c, w = self.config, self.w
        a = _linear(h, w.w1[layer], _at(w.b1, layer))
        if c.activation == "silu":
            a = silu(a)
        elif c.activation == "gelu_tanh":
            a = gelu_tanh(a)
        else:
            a = gelu(a)
        if c.mlp_matrices == 3:
            a = a * _linear(h, w.w3[layer], _at(w.b3, layer))
        return _linear(a, w.w2[layer], _at(w.b2, layer))

    def _qkv(self, layer: int, h: np.ndarray, positions: np.ndarray):
        c, w = self.config, self.w
        hs, t = c.head_size, h.shape[0]
        q = _linear(h, w.wq[layer], _at(w.bq, layer)).reshape(t, c.n_heads, hs)
        k = _linear(h, w.wk[layer], _at(w.bk, layer)).reshape(t, c.n_kv_heads, hs)
        v = _linear(h, w.wv[layer], _at(w.bv, layer)).reshape(t, c.n_kv_heads, hs)
        if c.position == "rope":
            cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
            apply_rope(q, cos, sin)
            apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """q (t, n_heads, hs), keys/values (s, n_kv_heads, hs), mask (t, s) of allowed pairs;
        returns (t, n_heads * hs)."""
        c = self.config
        scale = np.float32(1.0 / np.sqrt(c.head_size))
        g = c.group_size
        out = np.empty(q.shape, np.float32)
        for h in range(c.n_heads):
            kv = h // g
            scores = (q[:, h, :] @ keys[:, kv, :].T) * scale
            if mask is not None:
                scores = np.where(mask, scores, np.float32(-np.inf))
            out[:, h, :] = softmax(scores) @ values[:, kv, :]
        return out.reshape(q.shape[0], -1)

    def _layer(self, layer: int, x: np.ndarray, attention) -> np.ndarray:
        """One block on rows ``x`` (t, dim); ``attention(h)`` gives the attention output."""
        w = self.w
        pre = self.config.norm_position == "pre"
        na, nab = w.rms_att[layer], _at(w.rms_att_bias, layer)
        nf, nfb = w.rms_ffn[layer], _at(w.rms_ffn_bias, layer)
        h = self._norm(x, na, nab) if pre else x
        o = _linear(attention(h), w.wo[layer], _at(w.bo, layer))
        x = x + o if pre else self._norm(x + o, na, nab)
        h = self._norm(x, nf, nfb) if pre else x
        m = self._mlp(layer, h)
        return x + m if pre else self._norm(x + m, nf, nfb)


class FloatTransformer(_Core):
    """Single-sequence float32 decoder with its own KV cache (Llama, Mistral, Qwen2, GPT-2).
    Takes :class:`~tpfed.model.llama2c.LlamaWeights` or :class:`~tpfed.model.weights.FloatWeights`."""

    def __init__(self, weights) -> None:
        super().__init__(weights)
        c = self.config
        if not c.causal:
            raise ModelError(f"{c.name}: {c.arch} is an encoder; use FloatEncoder")
        self.key_cache = np.zeros((c.n_layers, c.seq_len, c.n_kv_heads, c.head_size), np.float32)
        self.value_cache = np.zeros_like(self.key_cache)
        self.pos = 0  # next position expected

    def reset(self) -> None:
        self.key_cache[:] = 0
        self.value_cache[:] = 0
        self.pos = 0

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) float32 for ``token`` at ``pos`` (positions 0..pos-1 must have
        been fed before, in order)."""
        return self.forward_many([token], pos)[0]

    def forward_many(self, tokens, start: int) -> np.ndarray:
        """Logits (len(tokens), vocab_size) for ``tokens`` at positions start, start+1, ...
        (teacher forcing; the same numbers as one ``forward`` per token)."""
        c, w = self.config, self.w
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.arange(start, start + tokens.size)
        if start < 0 or start + tokens.size > c.seq_len:
            raise ModelError(f"position {start + tokens.size - 1} outside the context (seq_len {c.seq_len})")
        x = self._embed(tokens, positions, None)
        last = start + tokens.size
        lo = positions[:, None]
        keys_pos = np.arange(last)[None, :]
        mask = keys_pos <= lo
        if c.sliding_window:
            mask &= keys_pos > lo - c.sliding_window
        for layer in range(c.n_layers):
            def attention(h, layer=layer):
                q, k, v = self._qkv(layer, h, positions)
                self.key_cache[layer, start:last] = k
                self.value_cache[layer, start:last] = v
                return self._attend(q, self.key_cache[layer, :last], self.value_cache[layer, :last], mask)

            x = self._layer(layer, x, attention)
        x = self._norm(x, w.rms_final, w.rms_final_bias)
        self.pos = last
        return _linear(x, w.wcls, None)


class FloatEncoder(_Core):
    """A bidirectional encoder (BERT): the whole sequence at once."""

    def __init__(self, weights, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__(weights)
        if pooling not in ("mean", "cls"):
            raise ModelError(f"pooling {pooling!r} is not supported (mean, cls)")
        self.pooling = pooling
        self.normalize = normalize

    def hidden_states(self, tokens, token_types=None) -> np.ndarray:
        """Last hidden states (len(tokens), dim) float32."""
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not 0 < tokens.size <= c.seq_len:
            raise ModelError(f"an encoder input needs 1..{c.seq_len} tokens, got {tokens.size}")
        positions = np.arange(tokens.size)
        types = None if token_types is None else np.asarray(token_types, dtype=np.int64).reshape(-1)
        x = self._embed(tokens, positions, types)
        mask = None if not c.causal else np.tri(tokens.size, dtype=bool)
        for layer in range(c.n_layers):
            def attention(h, layer=layer):
                q, k, v = self._qkv(layer, h, positions)
                return self._attend(q, k, v, mask)

            x = self._layer(layer, x, attention)
        return x

    def embed(self, tokens, token_types=None) -> np.ndarray:
        """Sentence embedding (dim,): mean (or CLS) pooling, then L2 normalisation if asked."""
        h = self.hidden_states(tokens, token_types)
        v = h.mean(axis=0, dtype=np.float32) if self.pooling == "mean" else h[0]
        if self.normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return v.astype(np.float32)
