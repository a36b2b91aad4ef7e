"""Float forward of Hugging Face models against transformers' own outputs (saved as fixtures by
tools/make_hf_fixtures.py; torch is not needed here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tpfed.model.formats import detect_format, load_float_model
from tpfed.model.reference import FloatEncoder, FloatTransformer

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
RTOL = 1e-5  # max |ours - transformers| / max |transformers|; measured ~2e-6


def fixture(arch: str):
    folder = HF / arch
    return load_float_model(folder), json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")


def greedy(model: FloatTransformer, prompt: list[int], steps: int) -> list[int]:
    out = list(prompt)
    for pos in range(len(prompt) + steps - 1):
        logits = model.forward(out[pos], pos)
        if pos + 1 >= len(out):
            out.append(int(np.argmax(logits)))
    return out[len(prompt):]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", DECODERS)
def test_logits_match_transformers(arch):
    m, ref, npz = fixture(arch)
    assert m.format == "hf" and m.config.arch == arch
    logits = FloatTransformer(m.weights).forward_many(npz["ids"], 0)
    assert logits.shape == npz["logits"].shape
    assert rel_err(logits, npz["logits"]) < RTOL


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_32_match_transformers(arch):
    m, ref, _ = fixture(arch)
    assert greedy(FloatTransformer(m.weights), ref["prompt"], 32) == ref["greedy"]


@pytest.mark.parametrize("arch", DECODERS)
def test_token_by_token_equals_teacher_forced(arch):
    m, _, npz = fixture(arch)
    f = FloatTransformer(m.weights)
    ids = npz["ids"][:12]
    step = np.stack([f.forward(int(t), p) for p, t in enumerate(ids)])
    f.reset()
    np.testing.assert_allclose(step, f.forward_many(ids, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", [*DECODERS, "bert"])
def test_tokenizer_matches_transformers(arch):
    m, ref, _ = fixture(arch)
    tok = m.tokenizer
    for text, ids, decoded in zip(ref["texts"], ref["text_ids"], ref["decoded"], strict=True):
        assert tok.encode(text) == ids
        assert tok.decode(ids) == decoded
    if arch != "bert":
        assert (tok.bos_id, tok.eos_id) == (ref["bos_id"], ref["eos_id"])
        # Streaming pieces give the same text as decoding the whole sequence.
        for text, ids, decoded in zip(ref["texts"], ref["text_ids"], ref["decoded"], strict=True):
            assert tok.decode_bytes(ids).decode("utf-8", errors="replace") == decoded, text


def test_bert_hidden_states_and_sentence_embeddings():
    m, ref, npz = fixture("bert")
    assert (m.pooling, m.normalize) == ("mean", True)
    enc = FloatEncoder(m.weights, m.pooling, m.normalize)
    hidden = enc.hidden_states(npz["ids"], npz["token_types"])
    assert rel_err(hidden, npz["hidden"]) < RTOL
    for ids, want in zip(ref["text_ids"], npz["embeddings"], strict=True):
        got = enc.embed(ids)
        assert float(got @ want / np.linalg.norm(want)) >= 0.9999
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_bert_token_types_matter():
    m, _, npz = fixture("bert")
    enc = FloatEncoder(m.weights)
    a = enc.hidden_states(npz["ids"], npz["token_types"])
    assert rel_err(enc.hidden_states(npz["ids"]), a) > 1e-3


@pytest.mark.parametrize(("arch", "change"), [
    ("mistral", {"sliding_window": 0}),
    ("llama", {"rope_scaling": ""}),
    ("qwen2", {"rope_scaling": ""}),
])
def test_the_fixtures_exercise_what_they_claim(arch, change):
    """Without the sliding window / the RoPE scaling the logits differ: the fixtures test them."""
    m, _, npz = fixture(arch)
    w = dataclasses.replace(m.weights, config=dataclasses.replace(m.config, **change))
    assert rel_err(FloatTransformer(w).forward_many(npz["ids"], 0), npz["logits"]) > 1e-3


def test_fixture_formats():
    """The fixtures cover both config spellings, a sharded checkpoint and every float dtype."""
    raw = {a: json.loads((HF / a / "config.json").read_text()) for a in DECODERS}
    assert "rope_parameters" in raw["llama"] and "rope_scaling" in raw["qwen2"]
    assert (HF / "mistral" / "model.safetensors.index.json").is_file()
    dtypes = set()
    for arch in [*DECODERS, "bert"]:
        for f in (HF / arch).glob("*.safetensors"):
            header = json.loads(f.read_bytes()[8 : 8 + int.from_bytes(f.read_bytes()[:8], "little")])
            dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"F32", "F16", "BF16"}
    assert sum(p.stat().st_size for p in HF.rglob("*") if p.is_file()) < 2_000_000


def test_detect_format_paths():
    assert detect_format(HF / "gpt2") == ("hf", HF / "gpt2")
    assert detect_format(HF / "gpt2" / "config.json") == ("hf", HF / "gpt2")
    assert detect_format(HF / "mistral" / "model.safetensors.index.json") == ("hf", HF / "mistral")
