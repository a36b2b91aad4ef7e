#!/usr/bin/env python3
"""Write a llama2.c checkpoint (legacy format, ``export.py --version 0``) of random weights.

    tools/make_random_llama.py --dim 1024 --hidden 2816 --layers 8 --heads 16 --kv-heads 8 \\
        --vocab 512 --seq-len 512 --seed 0 OUT.bin

For benchmarks and tests of models larger than stories260K without downloading one: the file
loads with ``tpfed.model.llama2c.load_llama2c`` and runs in llama2.c's ``run``. The classifier
is shared with the embedding (positive vocab_size in the header), so a vocab of 512 pairs with
stories260K's ``tok512.bin``.

Weights are float32 ``N(0, 1) * gain / sqrt(fan_in)`` (``--gain`` 1.6; ``--scale S`` gives every
tensor the fixed standard deviation S instead, e.g. the usual 0.02), drawn in file order from one
``numpy.random.default_rng(seed)`` stream, so a seed always gives the same bytes; norms are 1.
Why not 0.02: with a fixed small scale the attention is nearly uniform and the shared
classifier favours the current token, so greedy text of a wide model repeats one token ("time
time time ..."); scaled by fan-in, the text changes from token to token (gibberish, but not
degenerate) at every width. The two
legacy RoPE tables hold llama2.c's values (cos and sin of ``pos * 10000^(-2i/head_size)``);
loaders ignore them. Tensors are written one layer at a time (memory stays at one matrix).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def check_geometry(dim: int, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int,
                   seq_len: int) -> None:
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) < 1:
        raise ValueError("every size must be >= 1")
    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv-heads {kv_heads}")
    if (dim // heads) % 2:
        raise ValueError(f"head size {dim // heads} must be even (RoPE rotates pairs)")


def write_random_llama(path: str | Path, *, dim: int, hidden: int, layers: int, heads: int,
                       kv_heads: int, vocab: int, seq_len: int, seed: int = 0,
                       scale: float | None = None, gain: float = 1.6) -> int:
    """Write the checkpoint; returns its size in bytes."""
    check_geometry(dim, hidden, layers, heads, kv_heads, vocab, seq_len)
    rng = np.random.default_rng(seed)
    head_size = dim // heads
    q_dim, kv_dim = heads * head_size, kv_heads * head_size
    path = Path(path)
    tmp = path.with_name(path.name + ".part")

    def normal(f, shape: tuple[int, ...]) -> None:
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(scale if scale is not None else gain / np.sqrt(shape[-1]))
        f.write(a.astype("<f4", copy=False).tobytes())

    def ones(f, n: int) -> None:
        f.write(np.ones(n, "<f4").tobytes())

    with open(tmp, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len))
        normal(f, (vocab, dim))  # token embedding, also the classifier
        ones(f, layers * dim)  # rms_att
        for shape in ((q_dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, q_dim)):  # wq wk wv wo
            for _ in range(layers):
                normal(f, shape)
        ones(f, layers * dim)  # rms_ffn
        for shape in ((hidden, dim), (dim, hidden), (hidden, dim)):  # w1 w2 w3
            for _ in range(layers):
                normal(f, shape)
        ones(f, dim)  # rms_final
        freqs = 1.0 / (10000.0 ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size))
        angles = np.outer(np.arange(seq_len, dtype=np.float64), freqs)
        f.write(np.cos(angles).astype("<f4").tobytes())
        f.write(np.sin(angles).astype("<f4").tobytes())
    tmp.replace(path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=_positive, required=True)
    ap.add_argument("--hidden", type=_positive, required=True, help="MLP hidden dimension")
    ap.add_argument("--layers", type=_positive, required=True)
    ap.add_argument("--heads", type=_positive, required=True)
    ap.add_argument("--kv-heads", type=_positive, help="KV heads (default: --heads)")
    ap.add_argument("--vocab", type=_positive, default=512, help="vocabulary size (512)")
    ap.add_argument("--seq-len", type=_positive, default=512, help="context length (512)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (0)")
    ap.add_argument("--gain", type=float, default=1.6,
                    help="weights are N(0,1) * gain / sqrt(fan_in) (1.6)")
    ap.add_argument("--scale", type=float,
                    help="a fixed standard deviation for every weight instead of --gain")
    ap.add_argument("out", help="checkpoint to write")
    args = ap.parse_args(argv)
    try:
        size = write_random_llama(args.out, dim=args.dim, hidden=args.hidden, layers=args.layers,
                                  heads=args.heads, kv_heads=args.kv_heads or args.heads,
                                  vocab=args.vocab, seq_len=args.seq_len, seed=args.seed,
                                  scale=args.scale, gain=args.gain)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"{args.out}: {size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
