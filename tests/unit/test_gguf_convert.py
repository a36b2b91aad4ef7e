"""stories260K converted to a Hugging Face folder and to GGUF loads to llama2.c's weights,
logits and text; GGUF tensor types; the vocabulary embedded in GGUF."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

from tpfed.errors import ModelError
from tpfed.model.formats import detect_format, load_float_model
from tpfed.model.gguf_io import load_gguf, write_gguf
from tpfed.model.hf import load_hf, save_hf
from tpfed.model.reference import FloatTransformer
from tpfed.model.tokenizer import Tokenizer

KNOWN = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
PROMPT = "Once upon a time"


def text_of(model, steps: int = 40) -> str:
    tok = model.tokenizer
    f = FloatTransformer(model.weights)
    out = tok.encode(PROMPT)
    n = len(out)
    for pos in range(n + steps - 1):
        logits = f.forward(out[pos], pos)
        if pos + 1 >= len(out):
            out.append(int(np.argmax(logits)))
    return tok.decode(out)


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return load_float_model(stories260k_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def converted(stories, stories260k_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    save_hf(stories.weights, d / "hf")
    shutil.copy(stories260k_dir / "tok512.bin", d / "hf" / "tokenizer.bin")
    write_gguf(stories.weights, d / "s.gguf", stories.tokenizer)
    write_gguf(stories.weights, d / "s-q8.gguf", stories.tokenizer, tensor_type="Q8_0")
    write_gguf(stories.weights, d / "s-f16.gguf", stories.tokenizer, tensor_type="F16")
    return d


def test_llama2c_text(stories):
    assert stories.format == "llama2c"
    assert text_of(stories).startswith(KNOWN)


@pytest.mark.parametrize("name", ["hf", "s.gguf"])
def test_conversions_are_exact(stories, converted, name):
    m = load_float_model(converted / name)
    assert m.format == ("hf" if name == "hf" else "gguf")
    assert m.config.dim == 64 and m.config.n_kv_heads == 4 and m.config.vocab_size == 512
    want = stories.weights.tensors()
    got = m.weights.tensors()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ids = stories.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(FloatTransformer(m.weights).forward_many(ids, 0),
                                  FloatTransformer(stories.weights).forward_many(ids, 0))
    assert text_of(m).startswith(KNOWN)


def test_gguf_vocabulary_encodes_as_llama2c(stories, converted):
    tok = load_float_model(converted / "s.gguf").tokenizer
    ref = stories.tokenizer
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.byte_offset) == (1, 2, 3)
    for text in [PROMPT, "Lily's dog ran\nhome — fast! 42 ünïcödé 🐶", ""]:
        ids = ref.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids) == ref.decode(ids)


def test_gguf_q8_0_blocks_are_kept(stories, converted):
    w = load_gguf(converted / "s-q8.gguf")
    wq = np.asarray(stories.weights.wq[2])
    blocks = w.q8_0["wq.2"]
    assert blocks.scales.dtype == np.float16 and blocks.qs.dtype == np.int8
    assert blocks.qs.shape == (64, 2, 32)
    np.testing.assert_array_equal(w.wq[2], blocks.dequantize())
    # Q8_0 of the float matrix, computed independently: amax/127 scale, round to nearest.
    x = wq.reshape(64, 2, 32)
    d = np.abs(x).max(axis=-1) / 127
    np.testing.assert_allclose(blocks.scales.astype(np.float32), d, rtol=1e-3)
    assert np.abs(w.wq[2] - wq).max() <= np.abs(wq).max() / 127
    # w2 rows (172 wide) are not whole blocks: kept F32.
    assert "w2.0" not in w.q8_0
    np.testing.assert_array_equal(w.w2[0], stories.weights.w2[0])
    m = load_float_model(converted / "s-q8.gguf")
    ids = stories.tokenizer.encode(PROMPT)
    a = FloatTransformer(m.weights).forward_many(ids, 0)
    b = FloatTransformer(stories.weights).forward_many(ids, 0)
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_gguf_f16(stories, converted):
    w = load_gguf(converted / "s-f16.gguf")
    np.testing.assert_array_equal(w.w1[1], np.asarray(stories.weights.w1[1]).astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K", "BF16"])
def test_gguf_dequantised_types(tmp_path, stories, qtype):
    """A GGUF whose matrices are Q4_0/Q4_K/Q6_K/BF16 loads dequantised (the gguf package's
    helpers), close to the float weights."""
    src = stories.weights
    t = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    dim = 256  # Q4_K / Q6_K blocks are 256 wide
    rng = np.random.default_rng(0)
    mat = (rng.standard_normal((8, dim)) * 0.1).astype(np.float32)
    path = tmp_path / f"m-{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(16)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(dim)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    del src, block
    if qtype in ("Q4_K", "Q6_K"):  # the gguf package dequantises these but cannot quantise
        q = _random_k_blocks(qtype, 8, dim, rng)
        mat = gguf.quants.dequantize(q, t)
    else:
        q = gguf.quants.quantize(mat, t)
    w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=t)
    for name, shape in [("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("output_norm", (dim,))]:
        w.add_tensor(f"blk.0.{name}.weight" if name != "output_norm" else "output_norm.weight",
                     np.ones(shape, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        w.add_tensor(f"blk.0.{name}.weight", np.eye(dim, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = load_gguf(path)
    assert loaded.token_embedding.shape == (8, dim)
    err = np.abs(loaded.token_embedding - mat).max() / np.abs(mat).max()
    assert err < {"Q4_0": 0.15, "Q4_K": 0.15, "Q6_K": 0.04, "BF16": 0.01}[qtype]
    assert loaded.q8_0 == {}


def _random_k_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid K-quant rows: random quants and sub-scales, sane fp16 super-block scales."""
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == "Q4_K":  # d, dmin, scales[12], qs[128]
        blocks[:, :, 0:2] = d
        blocks[:, :, 2:4] = d
    else:  # ql[128], qh[64], scales[16] (int8), d
        blocks[:, :, 208:210] = d
    return blocks.reshape(rows, -1)


def test_bad_gguf_files(tmp_path, converted):
    data = (converted / "s.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.gguf"):
        load_float_model(cut)
    header_only = tmp_path / "h.gguf"
    header_only.write_bytes(data[:100])
    with pytest.raises(ModelError):
        load_float_model(header_only)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ModelError, match="GGUF magic"):
        load_float_model(fake)
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="architecture 'falcon' is not supported"):
        load_float_model(other)


def test_detect_format(converted, stories260k_dir, tmp_path):
    assert detect_format(converted / "s.gguf") == ("gguf", converted / "s.gguf")
    assert detect_format(converted / "hf")[0] == "hf"
    assert detect_format(stories260k_dir) == ("llama2c", stories260k_dir / "stories260K.bin")
    assert detect_format(stories260k_dir / "stories260K.bin")[0] == "llama2c"
    with pytest.raises(ModelError, match="several GGUF"):
        detect_format(converted)
    with pytest.raises(ModelError, match="no model here"):
        detect_format(tmp_path)


def test_hf_roundtrip_layout(stories, converted):
    """The HF folder holds q/k rows in Hugging Face's half-split rotary layout (what
    transformers' conversion of Meta checkpoints writes), not llama2.c's."""
    from safetensors.numpy import load_file

    raw = load_file(str(converted / "hf" / "model.safetensors"))
    wq = raw["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(wq, stories.weights.wq[0])
    hs = 8
    # HF row j (first half) of head 0 is llama2.c row 2j.
    np.testing.assert_array_equal(wq[:hs // 2], np.asarray(stories.weights.wq[0])[0:hs:2])
    assert load_hf(converted / "hf").config.arch == "llama"
