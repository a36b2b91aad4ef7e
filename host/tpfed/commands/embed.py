"""``tpfed embed``: a sentence embedding from an encoder (BERT) run in int8, pooled the way the
model's sentence-transformers configuration says (mean or CLS, L2-normalised or not)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

NAME = "embed"
HELP = "Sentence embedding of TEXT with an encoder model (BERT), int8, split across peers."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", required=True,
                        help="a Hugging Face BERT folder (sentence-transformers layout or plain)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (default: the model's own)")
    parser.add_argument("--peers", default="none", metavar="SPEC",
                        help="peers as for tpfed run (local:2, udp://..., emu:1); 'none' (default) "
                             "runs in this process")
    parser.add_argument("--key-file", metavar="PATH", help="the federation key (as for tpfed run)")
    parser.add_argument("--strategy", choices=("round-robin", "capability"), default="round-robin",
                        help="how units are split: round-robin (default) or by measured capability")
    parser.add_argument("--deadline", type=float, default=5.0, metavar="SECONDS",
                        help="a peer silent this long is lost (default 5)")
    parser.add_argument("--weights", choices=("q8_0", "f32"), default="q8_0",
                        help="q8_0 (default) or f32 (the float32 reference, in this process)")
    parser.add_argument("--json", action="store_true", help='print {"embedding": [...], ...}')
    parser.add_argument("text", help="the sentence; - reads standard input")


def pool(hidden: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """(n, dim) hidden states to one (dim,) float32 vector."""
    v = hidden.mean(axis=0, dtype=np.float32) if pooling == "mean" else hidden[0]
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return np.asarray(v, dtype=np.float32)


def embed_local(q8, ids, token_types=None) -> np.ndarray:
    """Hidden states (n, dim) of the int8 encoder in this process."""
    from tpfed.compute.int8_forward import Int8Transformer

    return Int8Transformer(q8).forward(list(ids), 0, token_types).copy()


def embed_peers(q8, tokenizer, ids, args: argparse.Namespace) -> np.ndarray:
    """Hidden states (n, dim) of the int8 encoder split across ``args.peers``: the coordinator
    sends each layer's rows as KV stages first, then as ATTENTION and MLP stages."""
    from tpfed.runtime.aio import run as run_async
    from tpfed.runtime.session import Fleet, RunOptions

    opts = RunOptions(peers=args.peers, steps=len(ids), strategy=getattr(args, "strategy", "round-robin"),
                      deadline_s=getattr(args, "deadline", 5.0), key_file=getattr(args, "key_file", None))

    async def go() -> np.ndarray:
        say = (lambda msg: print(f"tpfed: {msg}", file=sys.stderr)) if not args.json else None
        async with Fleet(opts, model=(q8, tokenizer), on_status=say) as fleet:
            return (await fleet.coord.encode_async(ids)).copy()

    return run_async(go())


def run(args: argparse.Namespace) -> int:
    from tpfed.commands._output import text_argument
    from tpfed.errors import TpfedError
    from tpfed.runtime.session import _q8_of, load_loaded

    text = text_argument(args.text, "the text", all_newlines=True)
    loaded = load_loaded(args.model, args.tokenizer)
    c = loaded.config
    if c.causal:
        raise TpfedError(f"{c.arch} is a decoder; tpfed embed takes an encoder (BERT)")
    if loaded.tokenizer is None:
        raise TpfedError("this model comes without a tokenizer: give --tokenizer")
    ids = loaded.tokenizer.encode(text, bos=True)
    if len(ids) > c.seq_len:
        raise TpfedError(f"the text is {len(ids)} tokens, more than the model's {c.seq_len}")
    if args.weights == "f32":
        from tpfed.model.reference import FloatEncoder

        hidden = FloatEncoder(loaded.weights).hidden_states(ids)
    else:
        q8, _ = _q8_of(loaded)
        if args.peers == "none":
            hidden = embed_local(q8, ids)
        else:
            hidden = embed_peers(q8, loaded.tokenizer, ids, args)
    v = pool(hidden, loaded.pooling, loaded.normalize)
    if args.json:
        print(json.dumps({"embedding": [float(x) for x in v], "dim": int(v.size), "tokens": len(ids),
                          "pooling": loaded.pooling, "normalized": loaded.normalize}))
    else:
        print(" ".join(f"{x:.6f}" for x in v))
    return 0
