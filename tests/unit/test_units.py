"""The C compute units (tpfed_units.h) against the same arithmetic composed from the single
kernels in Python: bit-exact, for any set of groups and ranges, and refusing bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from tpfed.compute._native import ffi, lib

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import (
    Q8Tensor,
    attention_f32,
    matmul_q8_0_f32,
    quantize_q8_0,
    rope_f32,
    swiglu_f32,
)
from tpfed.compute.share import AttentionShard, MlpShard


@pytest.fixture(scope="module")
def q8(stories260k_dir):
    return Q8Model.load(stories260k_dir / "stories260K.bin")


def _acts(dim: int, n: int, seed: int) -> list[Q8Tensor]:
    rng = np.random.default_rng(seed)
    return [quantize_q8_0(rng.standard_normal(dim, dtype=np.float32)) for _ in range(n)]


def _attention_composed(q8, layer, groups, xs):
    """The attention share's partial at each position, from the single kernels."""
    c = q8.config
    hs, gq = c.head_size, c.group_q_dim
    units = [q8.attention_unit(layer, g) for g in groups]
    kc = np.zeros((len(xs), len(groups), hs), np.float32)
    vc = np.zeros_like(kc)
    outs = []
    for pos, x in enumerate(xs):
        total = None
        for i, u in enumerate(units):
            q = rope_f32(matmul_q8_0_f32(u.wq, x), hs, pos, c.rope_theta)
            kc[pos, i] = rope_f32(matmul_q8_0_f32(u.wk, x), hs, pos, c.rope_theta)
            vc[pos, i] = matmul_q8_0_f32(u.wv, x)
            att = attention_f32(q.reshape(c.group_size, hs), kc[:, i], vc[:, i], pos)
            part = matmul_q8_0_f32(u.wo, quantize_q8_0(att.reshape(gq)))
            total = part.copy() if total is None else total + part
        outs.append(total)
    return outs, kc, vc


@pytest.mark.parametrize("groups", [(0,), (1, 3), (0, 1, 2, 3)])
def test_attention_units_match_composed_kernels(q8, groups):
    xs = _acts(q8.config.dim, 12, seed=len(groups))
    want, kc, vc = _attention_composed(q8, 2, groups, xs)
    shard = AttentionShard(q8.config, 2, groups, [q8.attention_unit(2, g) for g in groups])
    for pos, x in enumerate(xs):
        np.testing.assert_array_equal(shard.forward(x, pos), want[pos])
    for i in range(len(groups)):
        k, v = shard.kv_cache(i)
        np.testing.assert_array_equal(k[: len(xs)], kc[:, i])
        np.testing.assert_array_equal(v[: len(xs)], vc[:, i])


@pytest.mark.parametrize("ranges", [((0, 172),), ((32, 64), (128, 172)), ((0, 32), (64, 96))])
def test_mlp_units_match_composed_kernels(q8, ranges):
    c = q8.config
    shard = MlpShard(c, 4, ranges, [q8.mlp_unit(4, a, b) for a, b in ranges])
    for x in _acts(c.dim, 5, seed=7):
        total = None
        for a, b in ranges:
            u = q8.mlp_unit(4, a, b)
            h = swiglu_f32(matmul_q8_0_f32(u.w1, x), matmul_q8_0_f32(u.w3, x))
            part = matmul_q8_0_f32(u.w2, quantize_q8_0(h))
            total = part.copy() if total is None else total + part
        np.testing.assert_array_equal(shard.forward(x), total)


def test_units_refuse_inconsistent_arguments(q8):
    c = q8.config
    units = ffi.new("tpfed_attention_unit[]", 1)
    kc = np.zeros((8, c.head_size), np.float32)
    x = _acts(c.dim, 1, seed=0)[0]
    scratch = np.zeros(4096, np.float32)
    out = np.zeros(c.dim, np.float32)

    def call(pos=0, n_units=1, seq_len=8, kv_stride=c.head_size, scratch_bytes=scratch.nbytes):
        return lib.attention_units_forward(
            ffi.from_buffer("float[]", out), units, n_units, ffi.from_buffer("float[]", kc),
            ffi.from_buffer("float[]", kc), kv_stride, x._pqs, x._pd, c.dim, c.head_size,
            c.group_size, pos, seq_len, c.rope_theta, ffi.from_buffer("float[]", scratch),
            scratch_bytes)

    assert call() == -1  # units point nowhere
    u = q8.attention_unit(0, 0)
    for name in ("wq", "wk", "wv", "wo"):
        t = getattr(u, name)
        m = getattr(units[0], name)
        m.qs, m.d = t._pqs, t._pd
        m.rows, m.cols = t.shape
    assert call() == 0
    assert call(pos=8) == -1 and call(pos=-1) == -1
    assert call(n_units=0) == -1
    assert call(kv_stride=c.head_size - 1) == -1
    need = lib.attention_units_scratch_bytes(c.dim, c.head_size, c.group_size, 8)
    assert need <= scratch.nbytes
    assert call(scratch_bytes=need) == 0
    out.fill(7.0)
    kc_before = kc.copy()
    assert call(pos=1, scratch_bytes=need - 1) == -1  # too little scratch: refused untouched
    assert (out == 7.0).all() and np.array_equal(kc, kc_before)
    units[0].wo.rows = c.dim - 1
    assert call() == -1
    small = np.zeros(4, np.float32)
    mu = ffi.new("tpfed_mlp_unit[]", 1)
    w = q8.mlp_unit(0, 0, 32)
    for name in ("w1", "w3", "w2"):
        t = getattr(w, name)
        m = getattr(mu[0], name)
        m.qs, m.d = t._pqs, t._pd
        m.rows, m.cols = t.shape
    assert lib.mlp_units_forward(ffi.from_buffer("float[]", out), mu, 1, x._pqs, x._pd, c.dim,
                                 ffi.from_buffer("float[]", small), small.nbytes) == -1
