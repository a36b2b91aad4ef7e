"""Units, shards and the layer-share wire format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpfed.compute.int8_forward import Q8Model
from tpfed.compute.kernels import matmul_q8_0_f32, quantize_q8_0, swiglu_f32
from tpfed.compute.share import (
    HEADER,
    AttentionShard,
    DeviceShards,
    MlpShard,
    ShardError,
    ShareSet,
    kv_cache_nbytes,
    parse_layer_share,
    serialize_layer_share,
    share_nbytes,
)
from tpfed.model.config import ModelConfig


@pytest.fixture(scope="module")
def q8(stories260k_dir) -> Q8Model:
    return Q8Model.load(stories260k_dir / "stories260K.bin")


def activations(c: ModelConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [quantize_q8_0(rng.standard_normal(c.dim).astype(np.float32)) for _ in range(n)]


def att_shard(q8, layer, groups):
    return AttentionShard(q8.config, layer, groups, [q8.attention_unit(layer, g) for g in groups])


def mlp_shard(q8, layer, ranges):
    return MlpShard(q8.config, layer, ranges, [q8.mlp_unit(layer, a, b) for a, b in ranges])


def test_attention_groups_sum_to_the_whole(q8):
    c = q8.config
    full = att_shard(q8, 2, range(c.n_groups))
    parts = [att_shard(q8, 2, [g]) for g in range(c.n_groups)]
    pair = [att_shard(q8, 2, [0, 3]), att_shard(q8, 2, [1, 2])]
    for pos, x in enumerate(activations(c, 20)):
        want = full.forward(x, pos).copy()
        np.testing.assert_allclose(sum(p.forward(x, pos).copy() for p in parts), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sum(p.forward(x, pos).copy() for p in pair), want, rtol=1e-6, atol=1e-6)
    # a single group's cache is the matching slice of the full shard's cache, bit for bit
    k_full, v_full = full.kv_cache(3)
    k_one, v_one = parts[3].kv_cache(0)
    np.testing.assert_array_equal(k_full, k_one)
    np.testing.assert_array_equal(v_full, v_one)


def test_mlp_ranges_sum_to_the_whole(q8):
    c = q8.config
    full = mlp_shard(q8, 1, [(0, c.hidden_dim)])
    splits = [
        [(0, 32), (32, 64), (64, 96), (96, 128), (128, 160), (160, 172)],
        [(0, 96), (96, 172)],
        [(32, 64), (128, 172)],
    ]
    shards = [mlp_shard(q8, 1, s) for s in splits]
    rest = mlp_shard(q8, 1, [(0, 32), (64, 128)])  # complement of splits[2]
    for x in activations(c, 10, seed=1):
        want = full.forward(x).copy()
        for s in shards[:2]:
            np.testing.assert_allclose(s.forward(x), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(shards[2].forward(x) + rest.forward(x), want, rtol=1e-6, atol=1e-6)
    # per-range quantisation of the hidden activation is the full vector's, bit for bit
    x = activations(c, 1, seed=2)[0]
    L = q8.layers[1]
    h1 = matmul_q8_0_f32(L.w1, x)
    h = swiglu_f32(h1, matmul_q8_0_f32(L.w3, x))
    whole = quantize_q8_0(h)
    for a, b in splits[0]:
        part = quantize_q8_0(np.ascontiguousarray(h[a:b]))
        np.testing.assert_array_equal(part.qs, whole.qs[a:b])
        np.testing.assert_array_equal(part.d, whole.d[a // 32 : (b + 31) // 32])


def test_outputs_are_reused(q8):
    s = att_shard(q8, 0, [1])
    m = mlp_shard(q8, 0, [(0, 64)])
    x = activations(q8.config, 1)[0]
    assert s.forward(x, 0) is s.forward(x, 1)
    assert m.forward(x) is m.forward(x)


@pytest.mark.parametrize("ranges", [[(0, 50)], [(16, 64)], [(0, 64), (32, 96)], [(64, 32)],
                                    [(160, 200)], [(64, 96), (0, 32)], [(5, 5)]])
def test_bad_ranges(q8, ranges):
    with pytest.raises(ShardError):
        mlp_shard(q8, 0, ranges)
    with pytest.raises(ShardError):
        share_nbytes(q8.config, 0, ranges)


@pytest.mark.parametrize("groups", [[4], [-1], [1, 1], [2, 1]])
def test_bad_groups(q8, groups):
    with pytest.raises(ShardError):
        DeviceShards(q8, {0: (groups, ())})


def test_replay_rebuilds_the_cache_exactly(q8):
    c = q8.config
    xs = activations(c, 30, seed=5)
    live = att_shard(q8, 4, [0, 2])
    for pos, x in enumerate(xs[:25]):
        live.forward(x, pos)
    stack_qs = np.stack([x.qs for x in xs[:25]])
    stack_d = np.stack([x.d for x in xs[:25]])
    from tpfed.compute.kernels import Q8Tensor

    fresh = att_shard(q8, 4, [0, 2])
    fresh.replay(Q8Tensor(stack_qs[:10], stack_d[:10]))
    fresh.replay(Q8Tensor(stack_qs[10:], stack_d[10:]), start=10)
    np.testing.assert_array_equal(fresh.key_cache[:25], live.key_cache[:25])
    np.testing.assert_array_equal(fresh.value_cache[:25], live.value_cache[:25])
    for pos in range(25, 30):
        np.testing.assert_array_equal(fresh.forward(xs[pos], pos), live.forward(xs[pos], pos))
    with pytest.raises(ShardError):
        fresh.forward(xs[0], c.seq_len)


SPLITS = [((0, 1, 2, 3), ((0, 172),)), ((1,), ()), ((), ((32, 96),)), ((0, 3), ((0, 32), (160, 172)))]


@pytest.mark.parametrize(("groups", "ranges"), SPLITS)
def test_roundtrip(q8, groups, ranges):
    c = q8.config
    blob = serialize_layer_share(q8, 3, groups, ranges)
    assert len(blob) == share_nbytes(c, groups, ranges) == share_nbytes(c, len(groups), ranges)
    assert len(blob) % 4 == 0
    share = parse_layer_share(blob, c)
    assert (share.layer, share.groups, share.ranges) == (3, tuple(groups), tuple(ranges))
    for g, w in zip(groups, share.attention, strict=True):
        u = q8.attention_unit(3, g)
        for name in ("wq", "wk", "wv", "wo"):
            np.testing.assert_array_equal(getattr(w, name).qs, getattr(u, name).qs)
            np.testing.assert_array_equal(getattr(w, name).d, getattr(u, name).d)
    for (a, b), w in zip(ranges, share.mlp, strict=True):
        u = q8.mlp_unit(3, a, b)
        for name in ("w1", "w3", "w2"):
            np.testing.assert_array_equal(getattr(w, name).qs, getattr(u, name).qs)
            np.testing.assert_array_equal(getattr(w, name).d, getattr(u, name).d)
    # a peer built from the parsed share computes the same bits as one built from the model
    source = ShareSet(c, [share])
    assert source.assignment() == ({3: (tuple(groups), tuple(ranges))} if groups or ranges else {})
    peer = DeviceShards(source, {3: (groups, ranges)})
    local = DeviceShards(q8, {3: (groups, ranges)})
    for pos, x in enumerate(activations(c, 5)):
        for fn in ("attention",):
            a, b = getattr(peer, fn)(3, x, pos), getattr(local, fn)(3, x, pos)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        a, b = peer.mlp(3, x), local.mlp(3, x)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_sizes(q8):
    c = q8.config
    # stories260K: gq=16, hs=8 -> per group wq 16x64, wk/wv 8x64, wo 64x16 (one short block)
    per_group = (1024 + 2 * 16 * 2) + 2 * (512 + 2 * 8 * 2) + (1024 + 2 * 64)
    assert share_nbytes(c, [0], ()) == HEADER.size + 4 + per_group
    assert kv_cache_nbytes(c, [0, 1], 512) == 2 * 2 * 512 * 8 * 4
    assert kv_cache_nbytes(c, 3, 100) == 3 * 2 * 100 * 8 * 4
    whole = DeviceShards(q8, q8.full_assignment())
    assert whole.nbytes() == sum(
        share_nbytes(c, range(4), [(0, 172)]) + kv_cache_nbytes(c, 4) for _ in range(c.n_layers))


def _mutate(blob: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_corrupt_shares_are_rejected(q8):
    c = q8.config
    blob = serialize_layer_share(q8, 1, (0, 2), ((32, 64), (160, 172)))
    for cut in (0, 10, HEADER.size, HEADER.size + 3, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ShardError):
            parse_layer_share(blob[:cut], c)
    with pytest.raises(ShardError):
        parse_layer_share(blob + b"\0\0\0\0", c)
    bad = {
        "magic": _mutate(blob, 0, "<4s", b"XXXX"),
        "version": _mutate(blob, 4, "<H", 2),
        "header size": _mutate(blob, 6, "<H", 44),
        "layer": _mutate(blob, 8, "<I", 5),
        "dim": _mutate(blob, 12, "<I", 65),
        "groups count": _mutate(blob, 24, "<H", 3),
        "ranges count": _mutate(blob, 26, "<H", 1),
        "flags": _mutate(blob, 30, "<H", 1),
        "total": _mutate(blob, 32, "<Q", len(blob) + 4),
        "group order": _mutate(blob, 40, "<H", 2),
        "group index": _mutate(blob, 42, "<H", 4),
        "range align": _mutate(blob, 44, "<I", 40),
        "range end": _mutate(blob, 56, "<I", 170),
    }
    for what, b in bad.items():
        with pytest.raises(ShardError):
            parse_layer_share(b, c)
        assert what
    # non-finite scale in the first matrix's scales, and non-zero padding after group table
    first_d = HEADER.size + 4 + 16 + 16 * 64
    with pytest.raises(ShardError, match="non-finite"):
        parse_layer_share(_mutate(blob, first_d, "<H", 0x7C00), c)
    two_group_blob = serialize_layer_share(q8, 1, (1,), ())
    with pytest.raises(ShardError, match="padding"):
        parse_layer_share(_mutate(two_group_blob, HEADER.size + 2, "<H", 7), c)
    other = ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=8, vocab_size=512,
                        seq_len=512)
    with pytest.raises(ShardError, match="another model"):
        parse_layer_share(blob, other)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_header_corruption_never_crashes(q8, data):
    blob = bytearray(serialize_layer_share(q8, 2, (1, 3), ((0, 64),)))
    off = data.draw(st.integers(0, HEADER.size + 4 + 8 - 1))
    val = data.draw(st.integers(0, 255).filter(lambda v: v != blob[off]))
    blob[off] = val
    try:
        share = parse_layer_share(bytes(blob), q8.config)
    except ShardError:
        return
    # Only a field whose every value is legal and size-neutral can change unnoticed: the layer
    # index or a group index (integrity is the sha256 of the transfer's job, not the format's).
    layer_field = range(8, 12)
    group_table = range(HEADER.size, HEADER.size + 4)
    assert off in layer_field or off in group_table, f"byte {off} changed to {val} went unnoticed"
    assert (share.layer, share.groups) != (2, (1, 3))


def _c_share_header(blob: bytes):
    """(status, decoded header, bytes used) of the generated C decoder (what peer.c runs)."""
    from tpfed.compute._native import ffi, lib

    m = ffi.new("tpfed_share_header_t *")
    used = ffi.new("size_t *")
    return lib.tpfed_share_header_decode(ffi.from_buffer(blob), len(blob), m, used), m, used[0]


@pytest.mark.parametrize(("groups", "ranges"), SPLITS)
def test_c_share_header_decoder_agrees_with_shard_py(q8, groups, ranges):
    from tpfed.compute._native import lib

    c = q8.config
    blob = serialize_layer_share(q8, 3, groups, ranges)
    share = parse_layer_share(blob, c)
    rc, h, used = _c_share_header(blob)
    assert rc == lib.TPFED_OK and used == HEADER.size == lib.TPFED_SHARE_HEADER_SIZE
    assert (h.version, h.header_size) == (lib.TPFED_SHARE_VERSION, lib.TPFED_SHARE_HEADER_SIZE)
    assert (h.layer, h.n_groups, h.n_ranges, h.total) == (
        share.layer, len(share.groups), len(share.ranges), len(blob))
    assert (h.dim, h.hidden_dim, h.head_size, h.group_size, h.n_kv_heads, h.flags) == (
        c.dim, c.hidden_dim, c.head_size, c.group_size, c.n_kv_heads, 0)
    # the tables start right after the header on both sides
    assert struct.unpack_from(f"<{len(groups)}H", blob, h.header_size) == share.groups


def test_corrupted_share_header_is_refused_by_c_and_python(q8):
    """Each header field corrupted: shard.py refuses it, and the C decoder either refuses it or
    hands peer.c a field that differs from what it checks against (the constant or ASSIGN)."""
    from tpfed.compute._native import lib

    c = q8.config
    blob = serialize_layer_share(q8, 1, (0, 2), ((32, 64),))
    expect = {"version": lib.TPFED_SHARE_VERSION, "header_size": lib.TPFED_SHARE_HEADER_SIZE,
              "layer": 1, "dim": c.dim, "hidden_dim": c.hidden_dim, "head_size": c.head_size,
              "group_size": c.group_size, "n_groups": 2, "n_ranges": 1,
              "n_kv_heads": c.n_kv_heads, "flags": 0, "total": len(blob)}
    rc, h, _ = _c_share_header(blob)
    assert rc == lib.TPFED_OK and {k: getattr(h, k) for k in expect} == expect
    for i in range(4):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(ShardError, match="not a layer share"):
            parse_layer_share(bytes(bad), c)
        assert _c_share_header(bytes(bad))[0] == lib.TPFED_E_BAD_MAGIC
    for cut in range(HEADER.size):
        with pytest.raises(ShardError, match="truncated"):
            parse_layer_share(blob[:cut], c)
        assert _c_share_header(blob[:cut])[0] == lib.TPFED_E_BAD_PAYLOAD
    # every other byte of the header: one bit flipped lands in exactly one field, which both
    # sides see changed (shard.py refuses all but an in-range layer index, which is legal in
    # isolation and caught against ASSIGN by peer.c and by the caller of parse_layer_share)
    for off in range(4, HEADER.size):
        bad = bytearray(blob)
        bad[off] ^= 0x02
        rc, h, _ = _c_share_header(bytes(bad))
        assert rc == lib.TPFED_OK
        changed = {k for k, v in expect.items() if getattr(h, k) != v}
        assert len(changed) == 1, (off, changed)
        if changed == {"layer"} and h.layer < c.n_layers:
            assert parse_layer_share(bytes(bad), c).layer == h.layer != 1
        else:
            with pytest.raises(ShardError):
                parse_layer_share(bytes(bad), c)
