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


def model_config_from_hf(cfg: Any, name: str = "model") -> ModelConfig:
    """Map a Hugging Face config dict to :class:`ModelConfig`."""
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
    try:
        return ModelConfig(
            **values,
            norm_eps=float(eps),
            rope_theta=float(cfg.get("rope_theta") or 10000.0),
            shared_classifier=bool(cfg.get("tie_word_embeddings", not gated)),
            mlp_matrices=3 if gated else 2,
            arch=arch,
            name=name,
        )
    except ValueError as exc:
        raise ModelError(f"{name}: {exc}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    """A model's geometry from a llama2.c ``.bin`` checkpoint or a Hugging Face config.json.

    A directory is searched for ``config.json``. Raises :class:`ModelError` on anything else.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: no such model file (give a llama2.c .bin or a config.json)")
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
