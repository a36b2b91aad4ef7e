"""GGUF files (llama.cpp's format, v2/v3) through the ``gguf`` package: reading Llama-family
models with their embedded vocabulary, and writing them (to convert llama2.c checkpoints).

Tensor types: F32 (memory-mapped views), F16 and BF16 (widened), Q8_0 (kept block for block in
:attr:`FloatWeights.q8_0` — the same fp16 scale + 32 int8 as tpfed's — and dequantised for the
float reference), and Q4_0, Q4_K, Q6_K (dequantised with the package's helpers, to be
requantised to Q8_0 by the int8 path). llama.cpp stores Llama query/key rows in Meta's
interleaved rotary layout, which is tpfed's, so they are taken as they are.

The vocabulary (``tokenizer.ggml.model == "llama"``: SentencePiece pieces, scores, types) becomes
a llama2.c-style :class:`~tpfed.model.tokenizer.Tokenizer` (best-scoring pair merges with byte
fallback, which is what SentencePiece BPE does), ``▁`` read as a space.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.tokenizer import Tokenizer
from tpfed.model.weights import FloatWeights, Q8_0Matrix

MAGIC = b"GGUF"
KEPT = ("F32", "F16", "BF16", "Q8_0")
DEQUANTISED = ("Q4_0", "Q4_K", "Q6_K")
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # ValueError for bad magic/version/offsets, IndexError when cut short
        raise ModelError(f"{path}: not a readable GGUF file (truncated or corrupt: {exc})") from None


def _field(reader, key: str, default: Any = None, required: bool = False, where: str = "") -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ModelError(f"{where}: GGUF metadata lacks {key}")
        return default
    return f.contents()


def _config(reader, path: Path) -> ModelConfig:
    where = str(path)
    arch = _field(reader, "general.architecture", required=True, where=where)
    if arch != "llama":
        raise ModelError(f"{where}: GGUF architecture {arch!r} is not supported (llama is)")
    a = f"{arch}."
    dim = int(_field(reader, a + "embedding_length", required=True, where=where))
    heads = int(_field(reader, a + "attention.head_count", required=True, where=where))
    kv = int(_field(reader, a + "attention.head_count_kv", heads))
    rope_dims = _field(reader, a + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != dim // heads:
        raise ModelError(f"{where}: partial rotary embeddings ({rope_dims} of {dim // heads} dims) are not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ModelError(f"{where}: GGUF file has no token_embd.weight tensor")
    vocab = int(emb.shape[1]) if len(emb.shape) > 1 else len(tokens or [])
    scaling = str(_field(reader, a + "rope.scaling.type", "none") or "none")
    extra: dict[str, Any] = {}
    if scaling == "linear":
        extra = {"rope_scaling": "linear", "rope_factor": float(_field(reader, a + "rope.scaling.factor", 1.0))}
    elif scaling != "none":
        raise ModelError(f"{where}: RoPE scaling {scaling!r} is not supported (none, linear)")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    try:
        return ModelConfig(
            dim=dim,
            hidden_dim=int(_field(reader, a + "feed_forward_length", required=True, where=where)),
            n_layers=int(_field(reader, a + "block_count", required=True, where=where)),
            n_heads=heads, n_kv_heads=kv, vocab_size=vocab,
            seq_len=int(_field(reader, a + "context_length", required=True, where=where)),
            norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
            shared_classifier=not has_output, arch="llama",
            name=str(_field(reader, "general.name", path.stem) or path.stem),
            bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
            **extra,
        )
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None


def _tensor(t, path: Path, shape: tuple[int, ...], q8: dict[str, Q8_0Matrix], key: str) -> np.ndarray:
    import gguf

    kind = t.tensor_type.name
    got = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
    if got != shape:
        raise ModelError(f"{path}: tensor {t.name} has shape {got}, expected {shape}")
    if kind not in KEPT + DEQUANTISED:
        raise ModelError(f"{path}: tensor {t.name} is {kind}; supported: {', '.join(KEPT + DEQUANTISED)}")
    if kind == "F32":
        return np.asarray(t.data).reshape(shape)
    if kind == "Q8_0":
        rows, cols = shape[0], int(np.prod(shape[1:]))
        raw = np.asarray(t.data).reshape(rows, cols // 32, 34)
        blocks = Q8_0Matrix(scales=raw[:, :, :2].copy().view("<f2")[:, :, 0], qs=raw[:, :, 2:].view(np.int8))
        q8[key] = blocks
        return blocks.dequantize().reshape(shape)
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)


def load_gguf(path: str | os.PathLike[str]) -> FloatWeights:
    """Load a Llama-family GGUF model (see the module docstring)."""
    path = Path(path)
    reader = _reader(path)
    c = _config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    q8: dict[str, Q8_0Matrix] = {}

    def get(name: str, shape: tuple[int, ...], key: str) -> np.ndarray:
        if name not in tensors:
            raise ModelError(f"{path}: tensor {name} is missing")
        return _tensor(tensors[name], path, shape, q8, key)

    d, q, kvd, h = c.dim, c.n_heads * c.head_size, c.kv_dim, c.hidden_dim
    per: dict[str, list] = {k: [] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
    names = {"rms_att": ("attn_norm", (d,)), "wq": ("attn_q", (q, d)), "wk": ("attn_k", (kvd, d)),
             "wv": ("attn_v", (kvd, d)), "wo": ("attn_output", (d, q)), "rms_ffn": ("ffn_norm", (d,)),
             "w1": ("ffn_gate", (h, d)), "w2": ("ffn_down", (d, h)), "w3": ("ffn_up", (h, d))}
    for i in range(c.n_layers):
        for ours, (theirs, shape) in names.items():
            per[ours].append(get(f"blk.{i}.{theirs}.weight", shape, f"{ours}.{i}"))
    emb = get("token_embd.weight", (c.vocab_size, d), "token_embedding")
    wcls = emb if c.shared_classifier else get("output.weight", (c.vocab_size, d), "wcls")
    weights = FloatWeights(config=c, token_embedding=emb, rms_final=get("output_norm.weight", (d,), "rms_final"),
                           wcls=wcls, q8_0=q8, **per)
    for name, t in weights.tensors().items():
        if not np.isfinite(t).all():
            raise ModelError(f"{path}: tensor {name} holds NaN or infinite values")
    return weights


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | None:
    """The vocabulary embedded in a GGUF file, or None when it has none."""
    path = Path(path)
    reader = _reader(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    if model != "llama":
        raise ModelError(f"{path}: GGUF tokenizer {model!r} is not supported (llama, SentencePiece, is)")
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True, where=str(path))
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = []
    byte_offset = -1
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ == TOKEN_BYTE and byte_offset < 0 and tok == "<0x00>":
            byte_offset = i
        vocab.append(tok.encode("utf-8") if typ in (TOKEN_BYTE, TOKEN_CONTROL) else tok.replace("▁", " ").encode("utf-8"))
    if byte_offset < 0:
        raise ModelError(f"{path}: GGUF vocabulary has no byte tokens <0x00>..<0xFF>; not supported")
    return Tokenizer(
        vocab=vocab, scores=[float(s) for s in scores], max_token_length=max(len(v) for v in vocab),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)), byte_offset=byte_offset,
    )


def write_gguf(weights: FloatWeights, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None,
               tensor_type: str = "F32") -> Path:
    """Write a Llama-family model as GGUF v3 with ``tensor_type`` matrices (F32, F16 or Q8_0;
    norms, and with Q8_0 matrices whose rows are not whole blocks, stay F32), and ``tokenizer`` (llama2.c's) as its embedded vocabulary. Written to a
    temporary name and renamed, so a failure leaves no file."""
    import gguf

    c = weights.config
    if c.arch not in ("llama", "mistral") or c.norm != "rms" or c.qkv_bias or c.sliding_window:
        raise ModelError(f"{c.name}: only plain Llama models are written as GGUF")
    if tensor_type not in ("F32", "F16", "Q8_0"):
        raise ModelError(f"GGUF tensor type {tensor_type!r}: F32, F16 or Q8_0")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(c.name or path.stem)
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_size)
    if c.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_factor)
    elif c.rope_scaling:
        raise ModelError(f"{c.name}: RoPE scaling {c.rope_scaling!r} is not written to GGUF")
    if tokenizer is not None:
        w.add_tokenizer_model("llama")
        tokens, types = [], []
        for i, piece in enumerate(tokenizer.vocab):
            if i == 0:
                typ = TOKEN_UNKNOWN
            elif i in (tokenizer.bos_id, tokenizer.eos_id):
                typ = TOKEN_CONTROL
            elif tokenizer.byte_offset <= i < tokenizer.byte_offset + 256:
                typ = TOKEN_BYTE
            else:
                typ = TOKEN_NORMAL
            text = piece.decode("utf-8", errors="replace")
            tokens.append(text if typ in (TOKEN_BYTE, TOKEN_CONTROL) else text.replace(" ", "▁"))
            types.append(typ)
        w.add_token_list(tokens)
        w.add_token_scores([float(s) for s in tokenizer.scores])
        w.add_token_types(types)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_unk_token_id(0)

    def put(name: str, t: np.ndarray, matrix: bool) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if not matrix or tensor_type == "F32" or (tensor_type == "Q8_0" and t.shape[-1] % 32):
            w.add_tensor(name, t)
        elif tensor_type == "F16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    put("token_embd.weight", weights.token_embedding, True)
    for i in range(c.n_layers):
        for ours, theirs in (("rms_att", "attn_norm"), ("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"),
                             ("wo", "attn_output"), ("rms_ffn", "ffn_norm"), ("w1", "ffn_gate"),
                             ("w2", "ffn_down"), ("w3", "ffn_up")):
            put(f"blk.{i}.{theirs}.weight", getattr(weights, ours)[i], ours not in ("rms_att", "rms_ffn"))
    put("output_norm.weight", weights.rms_final, False)
    if not c.shared_classifier:
        put("output.weight", weights.wcls, True)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
