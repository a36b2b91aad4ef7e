"""One entry point for every model format, detected from the path.

- ``"hf"``: a Hugging Face folder (``config.json`` + safetensors), or its config.json or a
  ``.safetensors`` file inside it;
- ``"gguf"``: a file starting with the GGUF magic (or a folder holding exactly one ``.gguf``);
- ``"llama2c"``: a llama2.c ``.bin`` checkpoint (or a folder holding one, as ``tpfed run`` has
  always taken).

:func:`load_float_model` returns the float weights, the config and the tokenizer (when the
model comes with one), or raises one :class:`ModelError` naming what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tpfed.errors import ModelError
from tpfed.model.config import ModelConfig
from tpfed.model.weights import FloatWeights

FORMATS = ("hf", "gguf", "llama2c")
LLAMA2C_TOKENIZERS = ("tokenizer.bin", "tok512.bin")


@dataclass(frozen=True)
class LoadedModel:
    format: str
    path: Path  # the model file, or the Hugging Face folder
    weights: FloatWeights
    tokenizer: object | None  # Tokenizer or JsonTokenizer
    pooling: str = "mean"  # sentence embeddings (encoders): "mean" or "cls"
    normalize: bool = True

    @property
    def config(self) -> ModelConfig:
        return self.weights.config


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The format of ``path`` and the path to load (the folder for Hugging Face models)."""
    from tpfed.model.gguf_io import is_gguf

    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if len(ggufs) > 1:
            raise ModelError(f"{path}: several GGUF files ({', '.join(p.name for p in ggufs)}); name one")
        bins = sorted(p for p in path.glob("*.bin") if p.name not in LLAMA2C_TOKENIZERS)
        if len(bins) == 1:
            return "llama2c", bins[0]
        if bins:
            raise ModelError(f"{path}: several model files ({', '.join(p.name for p in bins)}); name one")
        if any(path.glob("*.safetensors")):
            raise ModelError(f"{path}: safetensors weights but no config.json beside them")
        raise ModelError(f"{path}: no model here (a Hugging Face folder with config.json, a .gguf or a llama2.c .bin)")
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    if path.name == "config.json" or path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        if not (path.parent / "config.json").is_file():
            raise ModelError(f"{path}: no config.json beside it")
        return "hf", path.parent
    if is_gguf(path):
        return "gguf", path
    if path.suffix == ".gguf":
        raise ModelError(f"{path}: named .gguf but does not start with the GGUF magic")
    if path.suffix == ".json":
        raise ModelError(f"{path}: a JSON file that is not a model's config.json")
    return "llama2c", path


def load_float_model(path: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load any supported model as float weights, with its tokenizer (``tokenizer`` overrides
    the one found with the model)."""
    fmt, where = detect_format(path)
    pooling, normalize = "mean", True
    if fmt == "hf":
        from tpfed.model.hf import load_hf

        weights = load_hf(where)
        tok = load_tokenizer(tokenizer, weights.config) if tokenizer else _hf_tokenizer(where, weights.config)
        if not weights.config.causal:
            pooling, normalize = sentence_pooling(where)
    elif fmt == "gguf":
        from tpfed.model.gguf_io import load_gguf, load_gguf_tokenizer

        weights = load_gguf(where)
        tok = load_tokenizer(tokenizer, weights.config) if tokenizer else load_gguf_tokenizer(where)
    else:
        from tpfed.model.llama2c import load_llama2c

        weights = FloatWeights.from_llama2c(load_llama2c(where))
        tok = load_tokenizer(tokenizer, weights.config) if tokenizer else _llama2c_tokenizer(where.parent, weights.config)
    if tok is not None and tok.vocab_size > weights.config.vocab_size:
        raise ModelError(f"{where}: tokenizer has {tok.vocab_size} tokens, more than the model's {weights.config.vocab_size}")
    return LoadedModel(fmt, where, weights, tok, pooling, normalize)


def load_tokenizer(path: str | os.PathLike[str], config: ModelConfig | None = None):
    """A tokenizer file of any kind: ``tokenizer.json``, a GGUF file's vocabulary, or a
    llama2.c ``tokenizer.bin``."""
    from tpfed.model.gguf_io import is_gguf, load_gguf_tokenizer
    from tpfed.model.tokenizer import Tokenizer
    from tpfed.model.tokenizer_json import JsonTokenizer

    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        bos, eos = (config.bos_id, config.eos_id) if config else (-1, -1)
        return JsonTokenizer.load(path, bos_id=bos, eos_id=eos)
    if is_gguf(path):
        tok = load_gguf_tokenizer(path)
        if tok is None:
            raise ModelError(f"{path}: GGUF file without a vocabulary")
        return tok
    return Tokenizer.load(path, config.vocab_size if config and config.arch == "llama" else None)


def _hf_tokenizer(folder: Path, config: ModelConfig):
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / "tokenizer.json", config)
    return _llama2c_tokenizer(folder, config)


def _llama2c_tokenizer(folder: Path, config: ModelConfig):
    from tpfed.model.tokenizer import Tokenizer

    for name in LLAMA2C_TOKENIZERS:
        if (folder / name).is_file():
            return Tokenizer.load(folder / name, config.vocab_size)
    return None


def sentence_pooling(folder: Path) -> tuple[str, bool]:
    """Pooling and normalisation from a sentence-transformers folder (``modules.json``,
    ``1_Pooling/config.json``); mean pooling with L2 normalisation when it says nothing."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return "mean", True
    try:
        modules = json.loads(modules_path.read_text())
        kinds = [str(m.get("type", "")) for m in modules]
        normalize = any(k.endswith("Normalize") for k in kinds)
        pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        pooling = "mean"
        if pool_dir is not None and (folder / pool_dir / "config.json").is_file():
            cfg = json.loads((folder / pool_dir / "config.json").read_text())
            mode = cfg.get("pooling_mode")
            if mode is None:
                mode = next((k[len("pooling_mode_"):] for k, v in cfg.items()
                             if k.startswith("pooling_mode_") and v is True), "mean_tokens")
            pooling = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}.get(mode, "")
            if not pooling:
                raise ModelError(f"{folder}: sentence-transformers pooling {mode!r} is not supported (mean, cls)")
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ModelError(f"{modules_path}: not a readable sentence-transformers configuration ({exc})") from None
    return pooling, normalize
