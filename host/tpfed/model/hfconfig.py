"""Model geometry for planning: from a llama2.c checkpoint header or a Hugging Face
``config.json`` (Llama, Mistral, GPT-2, BERT and other models using the same keys).

Only the shape matters to the planner and the simulator, so a config.json is enough to plan a
model whose weights are not at hand (Llama-2-70B over a hundred devices, say).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig

STORIES260K = ModelConfig(
    dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512,
    name="stories260K",
)
"""The header of /work/shared/models/stories260K/stories260K.bin (the default model)."""

GATED = {"llama", "mistral", "mixtral", "qwen2", "gemma", "phi3"}
"""model_type values whose MLP is gated (w1, w3, w2: three matrices)."""


def _first(cfg: dict, keys: tuple[str, ...], where: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is not None:
        return default
    raise ModelError(f"{where}: config.json has none of {', '.join(keys)}")


SUPPORTED = ("llama", "mistral", "qwen2", "gpt2", "bert")
"""Architectures with weights loaders and a float reference (``load_float_model``)."""

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu": "gelu"}


def _token_id(v: Any) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else -1


def rope_settings(cfg: dict, name: str = "model") -> dict[str, Any]:
    """RoPE theta and scaling from either the older keys (top-level ``rope_theta``,
    ``rope_scaling``) or the newer ``rope_parameters``, as :class:`ModelConfig` fields."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelError(f"{name}: rope_parameters / rope_scaling must be JSON objects")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError(f"{name}: per-layer-type rope_parameters are not supported")
    merged = {**scaling, **params}
    kind = str(merged.get("rope_type") or merged.get("type") or "default")
    theta = merged.get("rope_theta", cfg.get("rope_theta")) or 10000.0
    if float(merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ModelError(f"{name}: partial rotary embeddings (partial_rotary_factor) are not supported")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3"):
        raise ModelError(f"{name}: RoPE scaling {kind!r} is not supported (default, linear and llama3 are)")
    try:
        out.update(rope_scaling=kind, rope_factor=float(merged["factor"]))
        if kind == "llama3":
            out.update(
                rope_low_freq_factor=float(merged["low_freq_factor"]),
                rope_high_freq_factor=float(merged["high_freq_factor"]),
                rope_original_max_pos=int(merged.get("original_max_position_embeddings")
                                          or cfg.get("max_position_embeddings")),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{name}: RoPE scaling {kind!r} lacks or mistypes {exc}") from None
    return out


def _architecture(cfg: dict, model_type: str, values: dict, name: str, strict: bool) -> dict[str, Any]:
    """The architecture fields of :class:`ModelConfig` for a supported model_type."""
    def fail(msg: str) -> dict[str, Any]:
        if strict:
            raise ModelError(f"{name}: {msg}")
        return {}

    act_name = str(cfg.get("hidden_act") or cfg.get("activation_function") or "")
    activation = _ACTIVATIONS.get(act_name)
    if activation is None and act_name:
        return fail(f"activation {act_name!r} is not supported ({', '.join(_ACTIVATIONS)} are)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != values["dim"] // values["n_heads"]:
        return fail(f"head_dim {head_dim} differs from hidden_size / num_attention_heads; not supported")
    out: dict[str, Any] = {"bos_id": _token_id(cfg.get("bos_token_id")),
                           "eos_id": _token_id(cfg.get("eos_token_id"))}
    if model_type in ("llama", "mistral", "qwen2"):
        if activation not in (None, "silu"):
            return fail(f"{model_type} with activation {act_name!r} is not supported (silu is)")
        out.update(rope_settings(cfg, name))
        bias = bool(cfg.get("attention_bias", False))
        out.update(qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
        window = cfg.get("sliding_window")
        if model_type == "qwen2":
            layer_types = cfg.get("layer_types") or [
                "sliding_attention" if cfg.get("use_sliding_window") and i >= (cfg.get("max_window_layers") or 0)
                else "full_attention" for i in range(values["n_layers"])]
            if len(set(layer_types)) > 1:
                return fail("layers mixing sliding-window and full attention are not supported")
            if layer_types and layer_types[0] != "sliding_attention":
                window = None
        if window:
            out["sliding_window"] = int(window)
        return out
    if model_type == "gpt2":
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
            return fail("GPT-2 attention scaling other than 1/sqrt(head size) is not supported")
        out.update(norm="layer", activation=activation or "gelu_tanh", qkv_bias=True, o_bias=True,
                   mlp_bias=True, position="learned")
        return out
    if model_type == "bert":
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            return fail(f"BERT position_embedding_type {cfg.get('position_embedding_type')!r} is not supported")
        if cfg.get("is_decoder"):
            return fail("BERT as a decoder is not supported")
        out.update(norm="layer", norm_position="post", activation=activation or "gelu", qkv_bias=True,
                   o_bias=True, mlp_bias=True, position="learned", causal=False,
                   type_vocab_size=int(cfg.get("type_vocab_size") or 0))
        return out
    return fail(f"architecture {model_type or 'unknown'!r} is not supported ({', '.join(SUPPORTED)} are)")


def model_config_from_hf(cfg: Any, name: str = "model", strict: bool = False) -> ModelConfig:
    """Map a Hugging Face config dict to :class:`ModelConfig`.

    For planning (the default) any model with the usual shape keys is accepted, and the
    architecture fields are filled where the model type is one tpfed runs. With ``strict``
    (loading weights) an architecture or feature tpfed cannot run is a :class:`ModelError`.
    """
    if not isinstance(cfg, dict):
        raise ModelError(f"{name}: config.json must hold a JSON object")
    model_type = str(cfg.get("model_type", "")).lower()
    if not model_type:
        archs = cfg.get("architectures") or []
        model_type = str(archs[0]).lower() if archs else ""
    dim = _first(cfg, ("hidden_size", "n_embd", "d_model"), name)
    heads = _first(cfg, ("num_attention_heads", "n_head"), name)
    kv_heads = _first(cfg, ("num_key_value_heads",), name, default=heads)
    layers = _first(cfg, ("num_hidden_layers", "n_layer"), name)
    vocab = _first(cfg, ("vocab_size",), name)
    seq_len = _first(cfg, ("max_position_embeddings", "n_positions", "n_ctx"), name)
    gated = model_type in GATED or any(a in model_type for a in GATED)
    if model_type.startswith("gpt2") or "n_embd" in cfg:
        hidden = cfg.get("n_inner") or 4 * dim
        arch = "gpt2"
    else:
        hidden = _first(cfg, ("intermediate_size", "n_inner"), name)
        arch = "llama" if gated else (model_type or "unknown")
    values = {"dim": dim, "hidden_dim": hidden, "n_heads": heads, "n_kv_heads": kv_heads,
              "n_layers": layers, "vocab_size": vocab, "seq_len": seq_len}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelError(f"{name}: {key} must be an integer, got {v!r}")
    eps = _first(cfg, ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"), name, default=1e-5)
    if model_type in SUPPORTED:
        arch = model_type
    try:
        extra = _architecture(cfg, model_type if model_type in SUPPORTED else arch, values, name, strict)
    except ModelError:
        if strict:
            raise
        extra = {}
    if not extra:
        extra = {"rope_theta": float(cfg.get("rope_theta") or 10000.0)}
    try:
        return ModelConfig(
            **values,
            norm_eps=float(eps),
            shared_classifier=bool(cfg.get("tie_word_embeddings", not gated)),
            mlp_matrices=3 if gated else 2,
            arch=arch,
            name=name,
            **extra,
        )
    except ValueError as exc:
        raise ModelError(f"{name}: {exc}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    """A model's geometry from a llama2.c ``.bin`` checkpoint, a GGUF file (its header only), a
    Hugging Face config.json, or a folder holding one of them (as ``tpfed run --model`` takes). Raises :class:`ModelError` on anything else.
    """
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix != ".json"):
        from tpfed.model.formats import detect_format

        fmt, where = detect_format(path)
        if fmt == "hf":
            path = where / "config.json"
        elif fmt == "gguf":
            from tpfed.model.gguf_io import _config, _reader

            return _config(_reader(where), where)
        else:
            path = where
    if not path.is_file():
        raise ModelError(f"{path}: no such model file (give a llama2.c .bin, a GGUF file or a config.json)")
    if path.suffix == ".json":
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: not a readable config.json ({exc})") from None
        name = path.parent.name if path.name == "config.json" else path.stem
        return model_config_from_hf(cfg, name=name)
    from tpfed.model.llama2c import HEADER_BYTES, expected_file_size, parse_header

    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    config = parse_header(header, name=path.stem)
    size = path.stat().st_size
    if size != expected_file_size(config):
        raise ModelError(
            f"{path}: {size} bytes, but its header describes a {expected_file_size(config)}-byte checkpoint"
        )
    return config
