"""Loader for llama2.c legacy checkpoints (``.bin`` as written by llama2.c's ``export.py
--version 0``).

Layout (all little-endian)::

    int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    float32 token_embedding  (vocab_size, dim)
    float32 rms_att          (n_layers, dim)
    float32 wq               (n_layers, n_heads * head_size, dim)
    float32 wk               (n_layers, n_kv_heads * head_size, dim)
    float32 wv               (n_layers, n_kv_heads * head_size, dim)
    float32 wo               (n_layers, dim, n_heads * head_size)
    float32 rms_ffn          (n_layers, dim)
    float32 w1               (n_layers, hidden_dim, dim)
    float32 w2               (n_layers, dim, hidden_dim)
    float32 w3               (n_layers, hidden_dim, dim)
    float32 rms_final        (dim,)
    float32 freq_cis_real    (seq_len, head_size / 2)   legacy RoPE table, ignored
    float32 freq_cis_imag    (seq_len, head_size / 2)   legacy RoPE table, ignored
    float32 wcls             (vocab_size, dim)          only when vocab_size < 0 in the header

Every matrix is stored (out, in) row-major, as llama2.c's ``matmul(xout, x, w, n, d)`` reads
it: ``xout = w @ x`` with ``w`` of shape (d, n). A negative ``vocab_size`` means the
classifier is a separate tensor after the RoPE tables; otherwise it shares the embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig

HEADER_INTS = 7
HEADER_BYTES = HEADER_INTS * 4
F32 = np.dtype("<f4")


@dataclass(frozen=True)
class LlamaWeights:
    """Float32 weights of a llama2.c model. Arrays are read-only views of the file's bytes."""

    config: ModelConfig
    token_embedding: np.ndarray  # (vocab_size, dim)
    rms_att: np.ndarray  # (n_layers, dim)
    wq: np.ndarray  # (n_layers, n_heads * head_size, dim)
    wk: np.ndarray  # (n_layers, n_kv_heads * head_size, dim)
    wv: np.ndarray  # (n_layers, n_kv_heads * head_size, dim)
    wo: np.ndarray  # (n_layers, dim, n_heads * head_size)
    rms_ffn: np.ndarray  # (n_layers, dim)
    w1: np.ndarray  # (n_layers, hidden_dim, dim)
    w2: np.ndarray  # (n_layers, dim, hidden_dim)
    w3: np.ndarray  # (n_layers, hidden_dim, dim)
    rms_final: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab_size, dim); the embedding itself when shared


def _tensor_shapes(c: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 tensors in file order (the classifier excluded)."""
    q_dim = c.n_heads * c.head_size
    return [
        ("token_embedding", (c.vocab_size, c.dim)),
        ("rms_att", (c.n_layers, c.dim)),
        ("wq", (c.n_layers, q_dim, c.dim)),
        ("wk", (c.n_layers, c.kv_dim, c.dim)),
        ("wv", (c.n_layers, c.kv_dim, c.dim)),
        ("wo", (c.n_layers, c.dim, q_dim)),
        ("rms_ffn", (c.n_layers, c.dim)),
        ("w1", (c.n_layers, c.hidden_dim, c.dim)),
        ("w2", (c.n_layers, c.dim, c.hidden_dim)),
        ("w3", (c.n_layers, c.hidden_dim, c.dim)),
        ("rms_final", (c.dim,)),
        ("freq_cis_real", (c.seq_len, c.head_size // 2)),
        ("freq_cis_imag", (c.seq_len, c.head_size // 2)),
    ]


def expected_file_size(config: ModelConfig) -> int:
    """Exact size in bytes of a llama2.c checkpoint with this geometry."""
    n = sum(int(np.prod(shape)) for _, shape in _tensor_shapes(config))
    if not config.shared_classifier:
        n += config.vocab_size * config.dim
    return HEADER_BYTES + 4 * n


def parse_header(header: bytes, name: str = "model") -> ModelConfig:
    """Turn the 28-byte header into a :class:`ModelConfig` (raises :class:`ModelError`)."""
    if len(header) < HEADER_BYTES:
        raise ModelError(
            f"{name}: file is {len(header)} bytes, shorter than the {HEADER_BYTES}-byte llama2.c header"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = np.frombuffer(
        header, dtype="<i4", count=HEADER_INTS
    ).tolist()
    shared = vocab_size > 0
    try:
        config = ModelConfig(
            dim=dim,
            hidden_dim=hidden_dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=abs(vocab_size),
            seq_len=seq_len,
            shared_classifier=shared,
            name=name,
        )
    except ValueError as exc:
        raise ModelError(f"{name}: not a llama2.c checkpoint (bad header: {exc})") from None
    if config.head_size % 2:
        raise ModelError(f"{name}: head size {config.head_size} is odd; RoPE needs pairs")
    # Sanity bounds so garbage headers fail here rather than in a huge allocation.
    limits = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "vocab_size": 1 << 22,
              "seq_len": 1 << 20}
    for field, limit in limits.items():
        if getattr(config, field) > limit:
            raise ModelError(
                f"{name}: not a llama2.c checkpoint ({field}={getattr(config, field)} is implausible)"
            )
    return config


def load_llama2c(path: str | os.PathLike[str], *, mmap: bool = True) -> LlamaWeights:
    """Load a llama2.c legacy checkpoint. With ``mmap`` the arrays map the file (no copy)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(HEADER_BYTES)
    config = parse_header(header, name=path.stem)
    expected = expected_file_size(config)
    if size != expected:
        how = "truncated" if size < expected else "has trailing bytes"
        raise ModelError(
            f"{path}: file {how}: {size} bytes, but its header (dim={config.dim}, "
            f"hidden_dim={config.hidden_dim}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
            f"n_kv_heads={config.n_kv_heads}, vocab_size={config.vocab_size}, seq_len={config.seq_len}) "
            f"needs exactly {expected}"
        )
    if mmap:
        data = np.memmap(path, dtype=F32, mode="r", offset=HEADER_BYTES)
    else:
        data = np.frombuffer(path.read_bytes(), dtype=F32, offset=HEADER_BYTES)
    return weights_from_buffer(config, data)


def weights_from_buffer(config: ModelConfig, data: np.ndarray) -> LlamaWeights:
    """Slice a flat float32 array (everything after the header) into named tensors."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in _tensor_shapes(config):
        n = int(np.prod(shape))
        tensors[name] = data[offset : offset + n].reshape(shape)
        offset += n
    if config.shared_classifier:
        wcls = tensors["token_embedding"]
    else:
        n = config.vocab_size * config.dim
        wcls = data[offset : offset + n].reshape(config.vocab_size, config.dim)
        offset += n
    if offset != data.size:
        raise ModelError(f"{config.name}: {data.size - offset} float32 values left over after the weights")
    _check_finite(config, data)
    return LlamaWeights(
        config=config,
        token_embedding=tensors["token_embedding"],
        rms_att=tensors["rms_att"],
        wq=tensors["wq"],
        wk=tensors["wk"],
        wv=tensors["wv"],
        wo=tensors["wo"],
        rms_ffn=tensors["rms_ffn"],
        w1=tensors["w1"],
        w2=tensors["w2"],
        w3=tensors["w3"],
        rms_final=tensors["rms_final"],
        wcls=wcls,
    )


def _check_finite(config: ModelConfig, data: np.ndarray, chunk: int = 1 << 22) -> None:
    """Reject NaN/inf weights, reading the data in bounded chunks (no file-sized temporaries)."""
    for start in range(0, data.size, chunk):
        block = data[start : start + chunk]
        if np.isfinite(block).all():
            continue
        bad = start + int(np.flatnonzero(~np.isfinite(block))[0])
        offset = 0
        where = "classifier"
        for name, shape in _tensor_shapes(config):
            n = int(np.prod(shape))
            if bad < offset + n:
                where = name
                break
            offset += n
        raise ModelError(f"{config.name}: tensor {where} holds NaN or infinite values")
