"""Float32 reference forward pass of the llama2.c architecture (numpy), the oracle the int8 paths
are measured against. Follows llama2.c ``run.c`` ``forward`` step by step: RMSNorm (eps from the
config, 1e-5), RoPE on interleaved pairs, grouped-query attention, SwiGLU MLP, classifier."""

from __future__ import annotations

import numpy as np

from tpfed.errors import ModelError
from tpfed.model.llama2c import LlamaWeights


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ss = np.float32(np.dot(x, x) / np.float32(x.size) + np.float32(eps))
    return (w * (x * np.float32(1.0 / np.sqrt(ss)))).astype(np.float32, copy=False)


def rope_tables(head_size: int, seq_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of ``pos * theta^(-j/head_size)`` for j = 0, 2, 4, ... (run.c's frequencies),
    shape (seq_len, head_size // 2), float32."""
    j = np.arange(0, head_size, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(theta), j / np.float32(head_size))).astype(np.float32)
    val = np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]
    return np.cos(val).astype(np.float32), np.sin(val).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate each (x[2i], x[2i+1]) pair in place; x is (heads, head_size)."""
    v0 = x[:, 0::2].copy()
    v1 = x[:, 1::2].copy()
    x[:, 0::2] = v0 * cos - v1 * sin
    x[:, 1::2] = v0 * sin + v1 * cos


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class FloatTransformer:
    """Single-sequence float32 decoder with its own KV cache."""

    def __init__(self, weights: LlamaWeights) -> None:
        self.w = weights
        c = self.config = weights.config
        self.key_cache = np.zeros((c.n_layers, c.seq_len, c.n_kv_heads, c.head_size), np.float32)
        self.value_cache = np.zeros_like(self.key_cache)
        self.cos, self.sin = rope_tables(c.head_size, c.seq_len, c.rope_theta)
        self.pos = 0  # next position expected

    def reset(self) -> None:
        self.key_cache[:] = 0
        self.value_cache[:] = 0
        self.pos = 0

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) float32 for ``token`` at ``pos`` (positions 0..pos-1 must have
        been fed before, in order)."""
        c, w = self.config, self.w
        if not 0 <= token < c.vocab_size:
            raise ModelError(f"token id {token} outside the vocabulary (size {c.vocab_size})")
        if not 0 <= pos < c.seq_len:
            raise ModelError(f"position {pos} outside the context (seq_len {c.seq_len})")
        hs, kv_mul = c.head_size, c.group_size
        cos, sin = self.cos[pos], self.sin[pos]
        scale = np.float32(1.0 / np.sqrt(hs))
        x = np.array(w.token_embedding[token], dtype=np.float32)
        for layer in range(c.n_layers):
            xb = rmsnorm(x, w.rms_att[layer], c.norm_eps)
            q = (w.wq[layer] @ xb).reshape(c.n_heads, hs)
            k = (w.wk[layer] @ xb).reshape(c.n_kv_heads, hs)
            v = (w.wv[layer] @ xb).reshape(c.n_kv_heads, hs)
            apply_rope(q, cos, sin)
            apply_rope(k, cos, sin)
            self.key_cache[layer, pos] = k
            self.value_cache[layer, pos] = v
            keys = self.key_cache[layer, : pos + 1]  # (pos+1, n_kv_heads, hs)
            values = self.value_cache[layer, : pos + 1]
            att_out = np.empty((c.n_heads, hs), np.float32)
            for h in range(c.n_heads):
                g = h // kv_mul
                att = softmax((keys[:, g, :] @ q[h]) * scale)
                att_out[h] = att @ values[:, g, :]
            x += w.wo[layer] @ att_out.reshape(-1)
            xb = rmsnorm(x, w.rms_ffn[layer], c.norm_eps)
            h1 = w.w1[layer] @ xb
            h3 = w.w3[layer] @ xb
            hb = (h1 / (np.float32(1.0) + np.exp(-h1))) * h3
            x += w.w2[layer] @ hb
        x = rmsnorm(x, w.rms_final, c.norm_eps)
        self.pos = pos + 1
        return (w.wcls @ x).astype(np.float32, copy=False)
