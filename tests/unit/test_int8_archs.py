"""The int8 forward of every architecture (Llama, Mistral, Qwen2, GPT-2, BERT fixtures made by
transformers): close to the float reference, the same for any split of the units, through the
layer-share format too; and the stories260K targets (every format gives llama2.c's text; Q8_0
top-1 agreement with float32 >= 98% on TinyStories-like text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpfed.commands.perplexity import documents, evaluate, local_int8_logits
from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.compute.kernels import quantize_q8_0
from tpfed.compute.share import (
    DeviceShards,
    ShardError,
    ShareSet,
    parse_layer_share,
    serialize_layer_share,
    share_nbytes,
)
from tpfed.model.formats import load_float_model
from tpfed.model.reference import FloatTransformer

DATA = Path(__file__).resolve().parents[1] / "data"
HF = DATA / "hf"
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
ARCHS = [*DECODERS, "bert"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    m = load_float_model(HF / request.param)
    return request.param, m, Q8Model.from_weights(m.weights)


def _split(c, parts: int):
    """``parts`` devices: KV groups and 32-column MLP blocks dealt round-robin."""
    blocks = [(a, min(a + 32, c.hidden_dim)) for a in range(0, c.hidden_dim, 32)]
    out = []
    for d in range(parts):
        out.append({layer: (tuple(range(d, c.n_groups, parts)), tuple(blocks[d::parts]))
                    for layer in range(c.n_layers)})
    return out


class _Split(Int8Transformer):
    """The stage loop with the partials of several devices summed in order."""

    def __init__(self, q8, sources, assignments):
        super().__init__(q8)
        self.devices = [DeviceShards(s, a) for s, a in zip(sources, assignments, strict=True)]

    def reset(self):
        super().reset()
        for d in self.devices:
            d.reset()

    def partials(self, layer, stage, x, pos):
        total = None
        for d in self.devices:
            att, mlp = d.layers.get(layer, (None, None))
            unit = att if stage == 0 else mlp
            if unit is None or (stage == 0 and not unit.groups):
                continue
            if x.qs.ndim == 2:
                p = unit.forward_rows(x, pos) if stage == 0 else unit.forward_rows(x)
            else:
                p = unit.forward(x, pos) if stage == 0 else unit.forward(x)
            total = p.copy() if total is None else total + p
        return total


def _greedy(model, prompt, n):
    model.reset()
    out = list(prompt)
    for pos in range(len(prompt) + n - 1):
        logits = model.forward(out[pos], pos)
        if pos + 1 >= len(out):
            out.append(int(np.argmax(logits)))
    return out[len(prompt):]


def test_int8_is_close_to_float(arch):
    name, m, q8 = arch
    ref = json.loads((HF / name / "reference.json").read_text())
    npz = np.load(HF / name / "reference.npz")
    if name == "bert":
        from tpfed.commands.embed import pool

        for ids, want in zip(ref["text_ids"], npz["embeddings"], strict=True):
            v = pool(Int8Transformer(q8).forward(ids, 0), m.pooling, m.normalize)
            assert float(v @ want) >= 0.999
        return
    q, f = Int8Transformer(q8), FloatTransformer(m.weights)
    ids = [int(t) for t in npz["ids"]]
    agree = sum(int(q.forward(t, p).argmax() == f.forward(t, p).argmax()) for p, t in enumerate(ids))
    assert agree / len(ids) >= 0.75  # random tiny models: flat logits; measured 0.79-0.97


@pytest.mark.parametrize("parts", [2, 3])
def test_any_split_gives_the_single_device_result(arch, parts):
    name, m, q8 = arch
    c = q8.config
    split = _Split(q8, [q8] * parts, _split(c, parts))
    single = Int8Transformer(q8)
    if not c.causal:
        ids = json.loads((HF / name / "reference.json").read_text())["ids"]
        np.testing.assert_allclose(split.forward(ids, 0), single.forward(ids, 0), rtol=1e-4, atol=1e-4)
        return
    prompt = json.loads((HF / name / "reference.json").read_text())["prompt"]
    assert _greedy(split, prompt, 16) == _greedy(single, prompt, 16)


def test_shares_carry_what_the_units_need(arch):
    """Serialised and parsed shares (biases, plain MLPs, RoPE tables, windows, encoders) give
    the coordinator's units bit for bit."""
    name, m, q8 = arch
    c = q8.config
    assignments = _split(c, 2)
    shares = []
    for a in assignments:
        parsed = []
        for layer, (gs, rs) in a.items():
            blob = serialize_layer_share(q8, layer, gs, rs)
            assert len(blob) == share_nbytes(c, gs, rs, q8.params)
            parsed.append(parse_layer_share(blob, c))
        shares.append(ShareSet(c, parsed))
    assert shares[0].params.gated == (c.mlp_matrices == 3)
    from_shares = _Split(q8, shares, assignments)
    from_model = _Split(q8, [q8, q8], assignments)
    if not c.causal:
        ids = json.loads((HF / name / "reference.json").read_text())["ids"]
        np.testing.assert_array_equal(from_shares.forward(ids, 0), from_model.forward(ids, 0))
        return
    for pos, t in enumerate([1, 5, 9, 2, 7, 3]):
        np.testing.assert_array_equal(from_shares.forward(t, pos), from_model.forward(t, pos))


def test_share_of_another_architecture_is_refused():
    llama = Q8Model.from_weights(load_float_model(HF / "llama").weights)
    gpt2 = load_float_model(HF / "gpt2").config
    blob = serialize_layer_share(llama, 0, (0,), ((0, 32),))
    with pytest.raises(ShardError):
        parse_layer_share(blob, gpt2)


def test_sliding_window_ignores_older_positions():
    m = load_float_model(HF / "mistral")
    q8 = Q8Model.from_weights(m.weights)
    c = q8.config
    assert c.sliding_window > 0
    shards = DeviceShards(q8, q8.full_assignment())
    att = shards.layers[0][0]
    rng = np.random.default_rng(3)
    xs = [quantize_q8_0(rng.standard_normal(c.dim, dtype=np.float32)) for _ in range(c.sliding_window + 4)]
    for p, x in enumerate(xs[:-1]):
        att.forward(x, p)
    pos = len(xs) - 1
    att.key_cache[: pos - c.sliding_window + 1] = 1e3  # outside the window: must not matter
    att.value_cache[: pos - c.sliding_window + 1] = -1e3
    got = att.forward(xs[-1], pos).copy()
    att.reset()
    for p, x in enumerate(xs[:-1]):
        att.forward(x, p)
    np.testing.assert_array_equal(att.forward(xs[-1], pos), got)


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return load_float_model(stories260k_dir)


def test_stories260k_every_format_gives_llama2c_text(stories, stories260k_dir, tmp_path_factory):
    from tpfed.model.gguf_io import write_gguf
    from tpfed.model.hf import save_hf
    from tpfed.model.sampling import Sampler
    from tpfed.runtime.session import generate_local, load_model

    out = tmp_path_factory.mktemp("stories")
    save_hf(stories.weights, out / "hf")
    (out / "hf" / "tokenizer.bin").write_bytes((stories260k_dir / "tok512.bin").read_bytes())
    write_gguf(stories.weights, out / "s.gguf", stories.tokenizer)
    texts = []
    for path in (stories260k_dir / "stories260K.bin", out / "hf", out / "s.gguf"):
        q8, tok = load_model(str(path), None)
        texts.append(generate_local(Int8Transformer(q8), tok, "Once upon a time", 128, Sampler(0.0))[0])
    assert texts[0] == texts[1] == texts[2]


def test_stories260k_q8_agrees_with_float_on_tinystories(stories):
    text = (DATA / "text" / "tinystories.txt").read_text()
    docs = documents(text, lambda s: stories.tokenizer.encode(s, bos=True), stories.config.seq_len)
    q = evaluate(local_int8_logits(Q8Model.from_weights(stories.weights)), stories.weights, docs)
    assert q.tokens >= 1000
    assert q.agreement >= 0.98  # measured 0.9831 over 2190 tokens
    assert abs(q.perplexity / q.perplexity_ref - 1) < 0.01  # 3.9683 vs 3.9639


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_streamed_hf_load_equals_quantising_the_float_model(name, dtype, tmp_path):
    """load_hf_q8 (memory-mapped, 16-bit tensors quantised without a float32 copy, threads)
    gives the same Q8Model as quantising load_hf's float weights."""
    import shutil

    from safetensors.numpy import save_file

    from tpfed.compute.int8_forward import load_hf_q8
    from tpfed.model.hf import _SafetensorsFiles

    src = HF / name
    folder = tmp_path / name
    shutil.copytree(src, folder)
    if dtype != "F32":
        files = _SafetensorsFiles(folder)
        by_file: dict = {}
        for k, (f, *_rest) in files.where.items():
            by_file.setdefault(f, {})[k] = np.array(files.get(k), dtype=np.float32)
        for f, t in by_file.items():
            if dtype == "F16":
                t = {k: v.astype(np.float16) for k, v in t.items()}
            else:  # bfloat16 bits: numpy has no bfloat16, so the file is written by hand
                t = {k: v for k, v in t.items()}
            if dtype == "F16":
                save_file(t, str(f), metadata={"format": "pt"})
            else:
                _save_bf16(t, f)
    a = load_hf_q8(folder, threads=2)
    b = Q8Model.from_weights(load_float_model(folder).weights)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for field in ("wq", "wk", "wv", "w1", "w3", "w2"):
            np.testing.assert_array_equal(getattr(la, field).qs, getattr(lb, field).qs)
            np.testing.assert_array_equal(getattr(la, field).d, getattr(lb, field).d)
        for x, y in zip(la.wo, lb.wo, strict=True):
            np.testing.assert_array_equal(x.qs, y.qs)
        for field in ("rms_att", "rms_ffn", "bq", "bk", "bv"):
            np.testing.assert_array_equal(getattr(la, field), getattr(lb, field))
    np.testing.assert_array_equal(a.wcls.qs, b.wcls.qs)
    np.testing.assert_array_equal(a.token_embedding, b.token_embedding)


def _save_bf16(tensors: dict, path: Path) -> None:
    import struct

    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        raw = (np.ascontiguousarray(v, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    path.write_bytes(struct.pack("<Q", len(hj)) + hj + b"".join(blobs))
