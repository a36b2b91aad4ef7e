"""``tpfed run --model PATH --prompt-ids ... --weights f32``, ``tpfed embed`` and ``tpfed
perplexity`` in this process (peers: tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpfed.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"
HF = DATA / "hf"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_run_f32_gives_transformers_greedy_ids(arch, capsys):
    ref = json.loads((HF / arch / "reference.json").read_text())
    prompt = ref["prompt"]
    steps = len(prompt) + len(ref["greedy"]) - 1
    rc = main(["run", "--model", str(HF / arch), "--weights", "f32", "--peers", "local:3",
               "--prompt-ids", ",".join(map(str, prompt)), "--steps", str(steps), "--ignore-eos", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == prompt
    assert out["generated_ids"] == ref["greedy"]


def test_prompt_ids_must_be_integers(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--peers", "local:1", "--prompt-ids", "1,x"])


def test_embed_matches_sentence_transformers(capsys):
    ref = json.loads((HF / "bert" / "reference.json").read_text())
    want = np.load(HF / "bert" / "reference.npz")["embeddings"]
    for text, e in zip(ref["texts"], want, strict=True):
        assert main(["embed", "--model", str(HF / "bert"), "--json", text]) == 0
        v = np.array(json.loads(capsys.readouterr().out)["embedding"])
        assert v.shape == e.shape and float(v @ e) >= 0.999


def test_embed_refuses_a_decoder(capsys):
    assert main(["embed", "--model", str(HF / "llama"), "hello"]) == 2
    assert "decoder" in capsys.readouterr().err


def test_perplexity_in_process(stories260k_dir, capsys):
    rc = main(["perplexity", "--model", str(stories260k_dir), "--peers", "none", "--max-tokens", "300",
               "--json", str(DATA / "text" / "tinystories.txt")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 300 and out["top1_agreement"] >= 0.97
    assert 1 < out["perplexity_f32"] < 10 and abs(out["perplexity"] / out["perplexity_f32"] - 1) < 0.02
