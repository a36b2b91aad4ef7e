"""Bad Hugging Face folders fail with one ModelError that says what is wrong; config parsing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tpfed.errors import ModelError, TpfedError
from tpfed.model.formats import load_float_model
from tpfed.model.hfconfig import model_config_from_hf

HF = Path(__file__).resolve().parents[1] / "data" / "hf"


@pytest.fixture
def llama(tmp_path) -> Path:
    d = tmp_path / "llama"
    shutil.copytree(HF / "llama", d)
    return d


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def fails(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as info:
        load_float_model(path)
    assert isinstance(info.value, TpfedError)
    assert "\n" not in str(info.value)


def test_missing_files(llama):
    (llama / "model.safetensors").rename(llama / "pytorch_model.bin")
    fails(llama, r"no model\.safetensors.*PyTorch pickles are not read")
    (llama / "config.json").unlink()
    (llama / "pytorch_model.bin").unlink()
    (llama / "x.safetensors").write_bytes(b"")
    fails(llama, "safetensors weights but no config.json")


def test_truncated_safetensors(llama):
    data = (llama / "model.safetensors").read_bytes()
    (llama / "model.safetensors").write_bytes(data[: len(data) - 1000])
    fails(llama, "not a valid safetensors file")
    (llama / "model.safetensors").write_bytes(b"garbage")
    fails(llama, "not a valid safetensors file")


def test_missing_shard(tmp_path):
    d = tmp_path / "mistral"
    shutil.copytree(HF / "mistral", d)
    (d / "model-00002-of-00002.safetensors").unlink()
    fails(d, "names shard model-00002-of-00002.safetensors, which is missing")


def test_missing_tensor_and_wrong_shape(llama):
    t = load_file(str(llama / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(llama / "model.safetensors"))
    fails(llama, r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing")
    edit_config(llama, intermediate_size=64)
    fails(llama, r"has shape \(96, 64\), expected \(64, 64\)")


def test_non_finite(llama):
    t = load_file(str(llama / "model.safetensors"))
    t["model.norm.weight"][3] = np.nan
    save_file(t, str(llama / "model.safetensors"))
    fails(llama, "rms_final holds NaN")


@pytest.mark.parametrize(("changes", "match"), [
    ({"model_type": "t5", "architectures": ["T5Model"]}, "architecture 't5' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "RoPE scaling 'yarn'"),
    ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "lacks or mistypes"),
])
def test_unsupported_configs(llama, changes, match):
    edit_config(llama, **changes)
    fails(llama, match)


def test_bad_config_json(llama):
    (llama / "config.json").write_text("{not json")
    fails(llama, "not a readable config.json")


def test_rope_spellings_agree():
    base = json.loads((HF / "llama" / "config.json").read_text())
    new = model_config_from_hf(base, strict=True)
    old = dict(base)
    params = dict(old.pop("rope_parameters"))
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    assert model_config_from_hf(old, strict=True) == new
    assert (new.rope_scaling, new.rope_factor, new.rope_original_max_pos) == ("llama3", 4.0, 32)


def test_planning_stays_lenient():
    """tpfed plan takes shapes of architectures that cannot run yet."""
    cfg = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "vocab_size": 10, "max_position_embeddings": 16, "intermediate_size": 96,
           "rope_scaling": {"type": "longrope", "factor": 2.0}}
    m = model_config_from_hf(cfg)
    assert m.mlp_matrices == 3 and m.rope_scaling == ""
    with pytest.raises(ModelError):
        model_config_from_hf(cfg, strict=True)


def test_qwen2_sliding_window_flags():
    cfg = json.loads((HF / "qwen2" / "config.json").read_text())
    assert model_config_from_hf(cfg, strict=True).sliding_window == 0
    cfg.pop("layer_types", None)
    cfg.update(use_sliding_window=True, max_window_layers=0, sliding_window=7)
    assert model_config_from_hf(cfg, strict=True).sliding_window == 7
    cfg.update(max_window_layers=1)
    with pytest.raises(ModelError, match="mixing sliding-window"):
        model_config_from_hf(cfg, strict=True)
