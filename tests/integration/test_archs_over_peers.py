"""Every architecture split across local peer processes (the C core over UDP, sealed frames):
the share flags in ASSIGN and the shares (biases, plain GELU MLP, sliding window, RoPE table,
learned positions), the encoder's KV stage. Int8 over peers gives the single-process int8
result; stories260K as HF and GGUF gives the llama2.c file's text; BERT's embedding matches
sentence-transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tpfed.cli import main
from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.model.formats import load_float_model

DATA = Path(__file__).resolve().parents[1] / "data"
HF = DATA / "hf"
REPO = Path(__file__).resolve().parents[2]


def _local_greedy(q8: Q8Model, prompt: list[int], n: int) -> list[int]:
    t = Int8Transformer(q8)
    ids, out = list(prompt), []
    for pos in range(len(prompt) + n - 1):
        logits = t.forward(ids[pos], pos)
        if pos >= len(prompt) - 1:
            out.append(int(np.argmax(logits)))
            if pos + 1 >= len(ids):
                ids.append(out[-1])
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_int8_over_three_peers_is_the_single_process_result(arch, capsys):
    ref = json.loads((HF / arch / "reference.json").read_text())
    prompt, n = ref["prompt"], len(ref["greedy"])
    rc = main(["run", "--model", str(HF / arch), "--peers", "local:3", "--prompt-ids",
               ",".join(map(str, prompt)), "--steps", str(len(prompt) + n - 1), "--ignore-eos", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)["generated_ids"]
    want = _local_greedy(Q8Model.from_weights(load_float_model(HF / arch).weights), prompt, n)
    assert got == want


def test_bert_embedding_over_two_peers_matches_sentence_transformers(capsys):
    ref = json.loads((HF / "bert" / "reference.json").read_text())
    want = np.load(HF / "bert" / "reference.npz")["embeddings"]
    for text, e in zip(ref["texts"], want, strict=True):
        assert main(["embed", "--model", str(HF / "bert"), "--peers", "local:2", "--json", text]) == 0
        v = np.array(json.loads(capsys.readouterr().out)["embedding"])
        assert main(["embed", "--model", str(HF / "bert"), "--json", text]) == 0
        local = np.array(json.loads(capsys.readouterr().out)["embedding"])
        assert v.shape == e.shape and float(v @ e) >= 0.999
        np.testing.assert_allclose(v, local, atol=1e-5)  # the same units; only summation order


def test_stories260k_hf_and_gguf_over_three_peers_give_llama2c_text(stories260k_dir, tmp_path, capsys):
    hf, gguf = tmp_path / "hf", tmp_path / "s.gguf"
    for to, out in (("hf", hf), ("gguf", gguf)):
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_model.py"), "--to", to,
                        str(stories260k_dir / "stories260K.bin"), str(out)], check=True,
                       capture_output=True)
    texts = []
    for path in (stories260k_dir / "stories260K.bin", hf, gguf):
        tok = ["--tokenizer", str(stories260k_dir / "tok512.bin")] if path != gguf else []
        assert main(["run", "--model", str(path), *tok, "--peers", "local:3", "--steps", "128",
                     "--json", "Once upon a time"]) == 0
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1] == texts[2]
    assert texts[0].startswith("Once upon a time, there was a little girl named Lily.")
