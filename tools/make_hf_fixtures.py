#!/usr/bin/env python3
"""Make the small random Hugging Face fixtures under tests/data/hf/ with transformers and torch,
and the reference outputs the tests compare tpfed's float forward against.

    pip install '.[fixtures]'            # torch==2.13.0 (CPU), transformers, sentence-transformers
    python tools/make_hf_fixtures.py     # rewrites tests/data/hf/<arch>/

Each <arch>/ folder is what a user would have: config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json + tokenizer_config.json (a small tokenizer trained
here with the ``tokenizers`` library). Beside them, reference.npz and reference.json hold what
transformers computed (fixed seeds; attn_implementation="eager"):

- ``ids``: a fixed token sequence (the tokenizer's encoding of TEXT), ``logits``: the model's
  logits for it (decoders), or ``hidden``/``token_types`` (BERT);
- ``prompt`` and ``greedy``: 32 tokens from ``generate(do_sample=False)`` (decoders);
- ``texts`` and ``text_ids``: the tokenizer's encodings of a few strings;
- BERT: ``embeddings`` of ``texts`` from sentence-transformers (mean pooling + Normalize), whose
  modules.json / 1_Pooling/ are saved in the folder too.

The models cover: Llama with llama3 RoPE scaling and GQA (float32 weights, untied head), Mistral
with a sliding window shorter than the test sequence (float16, sharded), Qwen2 with q/k/v biases,
linear RoPE scaling written in the older ``rope_theta``/``rope_scaling`` keys and a tied head
(bfloat16), GPT-2 (float16) and BERT (float16). Weights are drawn wider than transformers'
default init so that greedy choices are not near-ties (the margin is checked here).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "hf"
SEED = 1234
TEXT = "Once upon a time, a small robot named Tim found 3 red apples near the big tree."
TEXTS = ["Hello world!", "The cat sat on the warm mat.", "Tim likes apples, bananas and café au lait 42 times.",
         "unseen wordz: zyxq ~ {}"]
TYPES_SPLIT = 6  # BERT: token type 1 from this position on

_WORDS = ["once", "upon", "a", "time", "there", "was", "little", "girl", "boy", "named", "lily", "tim", "ben", "sue", "robot", "cat", "dog", "who", "loved", "play", "outside", "park", "sun", "tree", "big", "small", "red", "blue", "green", "apple", "apples", "ball", "happy", "sad", "friend", "friends", "day", "found", "went", "saw", "said", "the", "and", "to", "with", "in", "on", "of", "near", "under", "very", "one", "two", "three", "ran", "jumped", "smiled", "house", "garden", "bird", "flew", "sky"]


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(SEED)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", "!", "?", ".", ", 3 times.", " 12."])
        lines.append(s)
    return lines + [TEXT] * 5 + TEXTS


def spm_tokenizer(vocab: int):
    """A Llama-2-style tokenizer.json: BPE on '▁'-joined text, byte fallback, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[], limit_alphabet=60)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, 1, 2


def byte_level_tokenizer(vocab: int, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok, {"bos_token": eos, "eos_token": eos}, 0, 0


def wordpiece_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # A vocabulary chosen here rather than by WordPieceTrainer, whose choices vary between runs:
    # every character (alone and as a ##continuation), then the most frequent words.
    from collections import Counter

    words = Counter(w for line in corpus() for w, _ in tok.pre_tokenizer.pre_tokenize_str(
        tok.normalizer.normalize_str(line)))
    chars = sorted({ch for w in words for ch in w})
    pieces = chars + ["##" + ch for ch in chars]
    common = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    pieces += common[: vocab - len(specials) - len(pieces)]
    tok.model = models.WordPiece({t: i for i, t in enumerate(specials + pieces)}, unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok, {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                 "mask_token": "[MASK]"}, -1, -1


def widen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Redraw every parameter (norm weights near 1, the rest ~N(0, 0.2)) at a fixed seed, and
    round it to ``dtype`` so the saved file holds exactly what the model computes with."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() or "ln_" in name:
                value = (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            else:
                value = 0.2 * noise
            p.copy_(value.to(dtype).to(torch.float32))


def decoder_configs(vocab: int) -> dict:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "attn_implementation": "eager"}
    return {
        "llama": (LlamaConfig(**common, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}),
                  torch.float32, "spm"),
        "mistral": (MistralConfig(**common, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                  sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                    torch.float16, "spm"),
        "qwen2": (Qwen2Config(**common, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}),
                  torch.bfloat16, "byte"),
        "gpt2": (GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=None,
                            bos_token_id=0, eos_token_id=0, attn_implementation="eager"),
                 torch.float16, "byte"),
    }


def save_tokenizer(tok, specials: dict, folder: Path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(folder)
    return fast


def text_reference(fast, folder: Path) -> dict:
    return {"texts": TEXTS, "text_ids": [fast(t)["input_ids"] for t in TEXTS],
            "decoded": [fast.decode(fast(t)["input_ids"], skip_special_tokens=True) for t in TEXTS]}


def make_decoder(arch: str, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    cfg, dtype, tok_kind = decoder_configs(384)[arch]
    tok, specials, bos, eos = spm_tokenizer(384) if tok_kind == "spm" else byte_level_tokenizer(
        384, "<|endoftext|>")
    fast = save_tokenizer(tok, specials, folder)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg)
    widen(model, dtype)
    kwargs = {"max_shard_size": "150KB"} if arch == "mistral" else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    if arch == "qwen2":  # the older spelling: top-level rope_theta, rope_scaling
        raw = json.loads((folder / "config.json").read_text())
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = {"type": params.pop("rope_type"), **params}
        (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = fast(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        prompt = ids[:6]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        greedy = out[0].tolist()[len(prompt):]
        # The greedy margins, teacher-forced on the generated sequence.
        full = model(out).logits[0].numpy()[len(prompt) - 1 : -1]
    top2 = np.sort(full, axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    assert len(greedy) == 32, greedy
    assert margin > 1e-3, f"{arch}: greedy near-tie (margin {margin})"
    np.savez_compressed(folder / "reference.npz", ids=np.array(ids, np.int32), logits=logits.astype(np.float32))
    return {"arch": arch, "ids": ids, "prompt": prompt, "greedy": greedy, "min_greedy_margin": margin,
            "bos_id": bos, "eos_id": eos, **text_reference(fast, folder)}


def make_bert(folder: Path) -> dict:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    tok, specials, _, _ = wordpiece_tokenizer(320)
    fast = save_tokenizer(tok, specials, folder)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=128, type_vocab_size=2,
                     attn_implementation="eager")
    torch.manual_seed(SEED)
    model = BertModel(cfg, add_pooling_layer=False)
    widen(model, torch.float16)
    model.to(torch.float16).save_pretrained(folder)
    transformer = Transformer(str(folder), model_kwargs={"dtype": torch.float32, "attn_implementation": "eager"})
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    tmp = folder.with_name(folder.name + ".st")
    st.save(str(tmp))
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling", "2_Normalize"):
        src = tmp / name
        if src.is_dir():
            shutil.copytree(src, folder / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, folder / name)
    shutil.rmtree(tmp)
    emb = st.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    ids = fast(TEXT)["input_ids"]
    types = [0] * TYPES_SPLIT + [1] * (len(ids) - TYPES_SPLIT)
    ref = BertModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = ref(torch.tensor([ids]), token_type_ids=torch.tensor([types])).last_hidden_state[0].numpy()
    np.savez_compressed(folder / "reference.npz", ids=np.array(ids, np.int32), token_types=np.array(types, np.int32),
                        hidden=hidden.astype(np.float32), embeddings=emb.astype(np.float32))
    return {"arch": "bert", "ids": ids, **text_reference(fast, folder)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("archs", nargs="*", default=["llama", "mistral", "qwen2", "gpt2", "bert"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for arch in args.archs:
        folder = args.out / arch
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        ref = make_bert(folder) if arch == "bert" else make_decoder(arch, folder)
        ref["made_with"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        (folder / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{arch}: {size / 1024:.0f} KiB in {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")


if __name__ == "__main__":
    main()
