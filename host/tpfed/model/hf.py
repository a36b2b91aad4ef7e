"""Hugging Face checkpoints: a folder with ``config.json`` and ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``), for Llama, Mistral, Qwen2, GPT-2 and BERT.

Files are opened with the ``safetensors`` library, which checks each header against the file
(a truncated or corrupt file fails there); float32 tensors are then memory-mapped views of the
file, float16 and bfloat16 ones are widened to float32. Everything is checked (names, shapes,
finite values) before a :class:`~tpfed.model.weights.FloatWeights` is returned, so a bad folder
fails with one :class:`ModelError` and nothing half-loaded.

:func:`save_hf` writes the other way (used to convert llama2.c and GGUF files, and by tests).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.hfconfig import model_config_from_hf
from tpfed.model.weights import FloatWeights, half_split_rope_rows, interleave_rope_rows

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def read_hf_config(folder: Path, strict: bool = True) -> tuple[ModelConfig, dict[str, Any]]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable config.json ({exc})") from None
    return model_config_from_hf(raw, name=folder.name, strict=strict), raw


class _SafetensorsFiles:
    """Every tensor of a checkpoint by name, from one file or the shards of an index."""

    def __init__(self, folder: Path) -> None:
        import safetensors

        self.folder = folder
        if (folder / SINGLE).is_file():
            files = [folder / SINGLE]
        elif (folder / INDEX).is_file():
            try:
                index = json.loads((folder / INDEX).read_text())
                weight_map = index["weight_map"]
                files = [folder / f for f in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{folder / INDEX}: not a readable safetensors index ({exc})") from None
            for f in files:
                if not f.is_file():
                    raise ModelError(f"{folder / INDEX}: names shard {f.name}, which is missing")
        else:
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
            hint = f" (found {', '.join(others)}: PyTorch pickles are not read; save as safetensors)" if others else ""
            raise ModelError(f"{folder}: no {SINGLE} or {INDEX}{hint}")
        self.where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            try:
                with safetensors.safe_open(f, framework="numpy") as handle:
                    names = list(handle.keys())
            except Exception as exc:  # the library's own errors: header, size, overlap
                raise ModelError(f"{f}: not a valid safetensors file ({exc})") from None
            header, data_start = _header(f)
            for name in names:
                info = header[name]
                begin, end = info["data_offsets"]
                self.where[name] = (f, info["dtype"], list(info["shape"]), data_start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        f, dtype, shape, offset, nbytes = self.where[name]
        if dtype not in _DTYPES:
            raise ModelError(f"{f}: tensor {name} has dtype {dtype}; F32, F16 and BF16 are supported")
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        raw = self._maps[f][offset : offset + nbytes]
        arr = raw.view(_DTYPES[dtype]).reshape(shape)
        if dtype == "F32":
            return arr
        if dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (already validated by the library) and the offset
    of its data: the library checks the file but does not say where tensors lie, and mapping
    them ourselves is what keeps float32 weights out of RAM."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _prefixed(files: _SafetensorsFiles, prefixes: tuple[str, ...], probe: str) -> str:
    for p in prefixes:
        if p + probe in files:
            return p
    raise ModelError(f"{files.folder}: no tensor {probe!r} (tried prefixes {', '.join(repr(p) for p in prefixes)}); "
                     "not a checkpoint of the architecture its config.json names")


class _Reader:
    def __init__(self, files: _SafetensorsFiles, prefix: str) -> None:
        self.files = files
        self.prefix = prefix
        self.used: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray | None:
        full = self.prefix + name
        if full not in self.files:
            if optional:
                return None
            raise ModelError(f"{self.files.folder}: tensor {full} is missing")
        arr = self.files.get(full)
        if tuple(arr.shape) != tuple(shape):
            raise ModelError(f"{self.files.folder}: tensor {full} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        self.used.add(full)
        return arr


def load_hf(path: str | os.PathLike[str]) -> FloatWeights:
    """Load a Hugging Face model folder (see the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder")
    config, _ = read_hf_config(folder)
    files = _SafetensorsFiles(folder)
    if config.arch in ("llama", "mistral", "qwen2"):
        weights = _load_llama(config, files)
    elif config.arch == "gpt2":
        weights = _load_gpt2(config, files)
    else:
        weights = _load_bert(config, files)
    check_finite(weights)
    return weights


def check_finite(weights: FloatWeights) -> None:
    for name, t in weights.tensors().items():
        if not np.isfinite(t).all():
            raise ModelError(f"{weights.config.name}: tensor {name} holds NaN or infinite values")


def _load_llama(c: ModelConfig, files: _SafetensorsFiles) -> FloatWeights:
    r = _Reader(files, _prefixed(files, ("model.", ""), "embed_tokens.weight"))
    d, q, kv, h, L = c.dim, c.n_heads * c.head_size, c.kv_dim, c.hidden_dim, c.n_layers
    per: dict[str, list] = {k: [] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                                            "bq", "bk", "bv", "bo", "b1", "b2", "b3")}
    for i in range(L):
        p = f"layers.{i}."
        per["rms_att"].append(r(p + "input_layernorm.weight", (d,)))
        per["wq"].append(interleave_rope_rows(r(p + "self_attn.q_proj.weight", (q, d)), c.n_heads))
        per["wk"].append(interleave_rope_rows(r(p + "self_attn.k_proj.weight", (kv, d)), c.n_kv_heads))
        per["wv"].append(r(p + "self_attn.v_proj.weight", (kv, d)))
        per["wo"].append(r(p + "self_attn.o_proj.weight", (d, q)))
        per["rms_ffn"].append(r(p + "post_attention_layernorm.weight", (d,)))
        per["w1"].append(r(p + "mlp.gate_proj.weight", (h, d)))
        per["w3"].append(r(p + "mlp.up_proj.weight", (h, d)))
        per["w2"].append(r(p + "mlp.down_proj.weight", (d, h)))
        if c.qkv_bias:
            per["bq"].append(interleave_rope_rows(r(p + "self_attn.q_proj.bias", (q,)), c.n_heads))
            per["bk"].append(interleave_rope_rows(r(p + "self_attn.k_proj.bias", (kv,)), c.n_kv_heads))
            per["bv"].append(r(p + "self_attn.v_proj.bias", (kv,)))
        if c.o_bias:
            per["bo"].append(r(p + "self_attn.o_proj.bias", (d,)))
        if c.mlp_bias:
            per["b1"].append(r(p + "mlp.gate_proj.bias", (h,)))
            per["b3"].append(r(p + "mlp.up_proj.bias", (h,)))
            per["b2"].append(r(p + "mlp.down_proj.bias", (d,)))
    emb = r("embed_tokens.weight", (c.vocab_size, d))
    if c.shared_classifier:
        wcls = emb
    else:
        head = "lm_head.weight"
        if head not in files:
            raise ModelError(f"{files.folder}: tensor {head} is missing (tie_word_embeddings is false)")
        wcls = files.get(head)
        if wcls.shape != (c.vocab_size, d):
            raise ModelError(f"{files.folder}: tensor {head} has shape {wcls.shape}, expected {(c.vocab_size, d)}")
    return FloatWeights(
        config=c, token_embedding=emb, rms_final=r("norm.weight", (d,)), wcls=wcls,
        **{k: (v or None) for k, v in per.items()},
    )


def _load_gpt2(c: ModelConfig, files: _SafetensorsFiles) -> FloatWeights:
    r = _Reader(files, _prefixed(files, ("transformer.", ""), "wte.weight"))
    d, h, L = c.dim, c.hidden_dim, c.n_layers
    per: dict[str, list] = {k: [] for k in ("rms_att", "rms_att_bias", "wq", "wk", "wv", "wo", "bq", "bk", "bv",
                                            "bo", "rms_ffn", "rms_ffn_bias", "w1", "b1", "w2", "b2")}
    for i in range(L):
        p = f"h.{i}."
        per["rms_att"].append(r(p + "ln_1.weight", (d,)))
        per["rms_att_bias"].append(r(p + "ln_1.bias", (d,)))
        # Conv1D stores (in, out): y = x @ W + b. Ours is (out, in).
        qkv = r(p + "attn.c_attn.weight", (d, 3 * d)).T
        bqkv = r(p + "attn.c_attn.bias", (3 * d,))
        for j, name in enumerate(("wq", "wk", "wv")):
            per[name].append(np.ascontiguousarray(qkv[j * d : (j + 1) * d]))
            per["b" + name[1]].append(bqkv[j * d : (j + 1) * d])
        per["wo"].append(np.ascontiguousarray(r(p + "attn.c_proj.weight", (d, d)).T))
        per["bo"].append(r(p + "attn.c_proj.bias", (d,)))
        per["rms_ffn"].append(r(p + "ln_2.weight", (d,)))
        per["rms_ffn_bias"].append(r(p + "ln_2.bias", (d,)))
        per["w1"].append(np.ascontiguousarray(r(p + "mlp.c_fc.weight", (d, h)).T))
        per["b1"].append(r(p + "mlp.c_fc.bias", (h,)))
        per["w2"].append(np.ascontiguousarray(r(p + "mlp.c_proj.weight", (h, d)).T))
        per["b2"].append(r(p + "mlp.c_proj.bias", (d,)))
    emb = r("wte.weight", (c.vocab_size, d))
    wcls = emb
    if not c.shared_classifier:
        if "lm_head.weight" not in files:
            raise ModelError(f"{files.folder}: tensor lm_head.weight is missing (tie_word_embeddings is false)")
        wcls = files.get("lm_head.weight")
    return FloatWeights(
        config=c, token_embedding=emb, w3=None, rms_final=r("ln_f.weight", (d,)),
        rms_final_bias=r("ln_f.bias", (d,)), wcls=wcls, position_embedding=r("wpe.weight", (c.seq_len, d)),
        **per,
    )


def _load_bert(c: ModelConfig, files: _SafetensorsFiles) -> FloatWeights:
    r = _Reader(files, _prefixed(files, ("bert.", ""), "embeddings.word_embeddings.weight"))
    d, h, L = c.dim, c.hidden_dim, c.n_layers
    per: dict[str, list] = {k: [] for k in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "rms_att",
                                            "rms_att_bias", "w1", "b1", "w2", "b2", "rms_ffn", "rms_ffn_bias")}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            per["w" + ours].append(r(p + f"attention.self.{theirs}.weight", (d, d)))
            per["b" + ours].append(r(p + f"attention.self.{theirs}.bias", (d,)))
        per["wo"].append(r(p + "attention.output.dense.weight", (d, d)))
        per["bo"].append(r(p + "attention.output.dense.bias", (d,)))
        per["rms_att"].append(r(p + "attention.output.LayerNorm.weight", (d,)))
        per["rms_att_bias"].append(r(p + "attention.output.LayerNorm.bias", (d,)))
        per["w1"].append(r(p + "intermediate.dense.weight", (h, d)))
        per["b1"].append(r(p + "intermediate.dense.bias", (h,)))
        per["w2"].append(r(p + "output.dense.weight", (d, h)))
        per["b2"].append(r(p + "output.dense.bias", (d,)))
        per["rms_ffn"].append(r(p + "output.LayerNorm.weight", (d,)))
        per["rms_ffn_bias"].append(r(p + "output.LayerNorm.bias", (d,)))
    types = None
    if c.type_vocab_size:
        types = r("embeddings.token_type_embeddings.weight", (c.type_vocab_size, d))
    return FloatWeights(
        config=c, token_embedding=r("embeddings.word_embeddings.weight", (c.vocab_size, d)), w3=None,
        rms_final=None, wcls=None, position_embedding=r("embeddings.position_embeddings.weight", (c.seq_len, d)),
        token_type_embedding=types, embed_norm=r("embeddings.LayerNorm.weight", (d,)),
        embed_norm_bias=r("embeddings.LayerNorm.bias", (d,)), **per,
    )


def hf_config_dict(c: ModelConfig) -> dict[str, Any]:
    """A transformers ``config.json`` for a Llama-family :class:`ModelConfig`."""
    if c.arch not in ("llama", "mistral", "qwen2") or c.norm != "rms" or c.position != "rope":
        raise ModelError(f"{c.name}: only Llama-family models are written as Hugging Face folders")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.shared_classifier,
        "attention_bias": False, "mlp_bias": False, "rope_theta": c.rope_theta,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "torch_dtype": "float32",
    }
    if c.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": c.rope_scaling, "factor": c.rope_factor}
        if c.rope_scaling == "llama3":
            cfg["rope_scaling"].update(low_freq_factor=c.rope_low_freq_factor,
                                       high_freq_factor=c.rope_high_freq_factor,
                                       original_max_position_embeddings=c.rope_original_max_pos)
    return cfg


def save_hf(weights: FloatWeights, folder: str | os.PathLike[str]) -> Path:
    """Write a Llama-family model as a Hugging Face folder (config.json, model.safetensors,
    float32), permuting query/key rows to Hugging Face's rotary layout."""
    from safetensors.numpy import save_file

    c = weights.config
    cfg = hf_config_dict(c)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": weights.token_embedding,
                                "model.norm.weight": weights.rms_final}
    if not c.shared_classifier:
        t["lm_head.weight"] = weights.wcls
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = weights.rms_att[i]
        t[p + "self_attn.q_proj.weight"] = half_split_rope_rows(np.asarray(weights.wq[i]), c.n_heads)
        t[p + "self_attn.k_proj.weight"] = half_split_rope_rows(np.asarray(weights.wk[i]), c.n_kv_heads)
        t[p + "self_attn.v_proj.weight"] = weights.wv[i]
        t[p + "self_attn.o_proj.weight"] = weights.wo[i]
        t[p + "post_attention_layernorm.weight"] = weights.rms_ffn[i]
        t[p + "mlp.gate_proj.weight"] = weights.w1[i]
        t[p + "mlp.up_proj.weight"] = weights.w3[i]
        t[p + "mlp.down_proj.weight"] = weights.w2[i]
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}
    save_file(t, str(folder / SINGLE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
