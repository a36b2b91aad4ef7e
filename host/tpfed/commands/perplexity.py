"""``tpfed perplexity``: teacher-forced quality of the int8 model split across peers, against
the float32 reference: perplexity of both and top-1 agreement."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NAME = "perplexity"
HELP = ("Perplexity of a text file under the int8 model split across peers, and top-1 agreement "
        "with the float32 reference (teacher-forced).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="model (default: stories260K)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the model's own)")
    parser.add_argument("--peers", default="local:2", metavar="SPEC",
                        help="peers as for tpfed run (default local:2); 'none' runs the int8 "
                             "forward in this process")
    parser.add_argument("--strategy", choices=("round-robin", "capability"), default="round-robin",
                        help="how units are split: round-robin (default) or by measured capability")
    parser.add_argument("--deadline", type=float, default=5.0, metavar="SECONDS",
                        help="a peer silent this long is lost (default 5)")
    parser.add_argument("--max-tokens", type=int, default=0, metavar="N",
                        help="stop after N predicted tokens (0: the whole file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("file", help="UTF-8 text; blank lines separate documents (each starts with BOS)")


def documents(text: str, encode: Callable[[str], list[int]], seq_len: int) -> list[list[int]]:
    """Token windows of at most ``seq_len``: each paragraph (blank-line separated) encoded with
    BOS, long ones cut into consecutive windows."""
    out: list[list[int]] = []
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        ids = encode(para)
        for i in range(0, len(ids) - 1, seq_len):
            chunk = ids[i:i + seq_len]
            if len(chunk) >= 2:
                out.append(chunk)
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class Quality:
    """Teacher-forced comparison over ``tokens`` predictions."""

    tokens: int = 0
    nll: float = 0.0  # summed negative log-likelihood, int8
    nll_ref: float = 0.0  # the same for the float32 reference
    agree: int = 0  # positions where int8 and float32 pick the same top-1 token
    per_doc: list[int] = field(default_factory=list)

    def add(self, logits: np.ndarray, ref_logits: np.ndarray, targets: Sequence[int]) -> None:
        t = np.asarray(targets)
        lp, lr = _log_softmax(logits), _log_softmax(ref_logits)
        rows = np.arange(t.size)
        self.nll -= float(lp[rows, t].sum())
        self.nll_ref -= float(lr[rows, t].sum())
        self.agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        self.tokens += int(t.size)
        self.per_doc.append(int(t.size))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def perplexity_ref(self) -> float:
        return math.exp(self.nll_ref / self.tokens) if self.tokens else float("nan")

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "perplexity": round(self.perplexity, 4),
                "perplexity_f32": round(self.perplexity_ref, 4),
                "top1_agreement": round(self.agreement, 5), "documents": len(self.per_doc)}


def evaluate(int8_logits: Callable[[list[int]], np.ndarray], float_weights, docs: Iterable[list[int]],
             max_tokens: int = 0) -> Quality:
    """``int8_logits(ids)`` gives the (len(ids), vocab) logits of a window fed from position 0;
    the float32 reference runs on ``float_weights``."""
    from tpfed.model.reference import FloatTransformer

    ref = FloatTransformer(float_weights)
    q = Quality()
    for ids in docs:
        if max_tokens and q.tokens >= max_tokens:
            break
        if max_tokens:
            ids = ids[: max_tokens - q.tokens + 1]
        ref.reset()
        ref_logits = ref.forward_many(ids[:-1], 0)
        q.add(int8_logits(ids[:-1]), ref_logits, ids[1:])
    return q


def local_int8_logits(model) -> Callable[[list[int]], np.ndarray]:
    """Teacher-forced logits from the single-process int8 forward of a Q8Model."""
    from tpfed.compute.int8_forward import Int8Transformer

    m = Int8Transformer(model)

    def run(ids: list[int]) -> np.ndarray:
        m.reset()
        return np.stack([m.forward(int(t), p).copy() for p, t in enumerate(ids)])

    return run


def run(args: argparse.Namespace) -> int:
    from tpfed.errors import TpfedError
    from tpfed.runtime import aio
    from tpfed.runtime.session import Fleet, RunOptions, _q8_of, load_loaded

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TpfedError(f"cannot read {args.file}: {exc}") from None
    loaded = load_loaded(args.model, args.tokenizer)
    c = loaded.config
    if not c.causal:
        raise TpfedError(f"{c.arch} is an encoder: perplexity needs a decoder")
    if loaded.tokenizer is None:
        raise TpfedError("this model comes without a tokenizer: give --tokenizer")
    docs = documents(text, lambda s: loaded.tokenizer.encode(s, bos=True), c.seq_len)
    if not docs:
        raise TpfedError(f"{args.file}: no text to score")
    q8, tok = _q8_of(loaded)
    if args.peers == "none":
        quality = evaluate(local_int8_logits(q8), loaded.weights, docs, args.max_tokens)
    else:
        longest = max(len(d) for d in docs)
        opts = RunOptions(peers=args.peers, model=args.model, steps=min(longest, c.seq_len),
                          strategy=args.strategy, deadline_s=args.deadline)

        async def go():
            async with Fleet(opts, model=(q8, tok),
                             on_status=lambda m: print(f"tpfed: {m}", file=sys.stderr)) as fleet:
                coord = fleet.coord
                rows: dict[tuple[int, ...], np.ndarray] = {}
                for ids in docs:
                    coord.reset()
                    out = []
                    for p, t in enumerate(ids[:-1]):
                        out.append((await coord.forward_async(int(t), p)).copy())
                    rows[tuple(ids[:-1])] = np.stack(out)
                return rows

        if args.max_tokens:
            kept, n = [], 0
            for d in docs:
                if n >= args.max_tokens:
                    break
                d = d[: args.max_tokens - n + 1]
                kept.append(d)
                n += len(d) - 1
            docs = kept
        table = aio.run(go())
        quality = evaluate(lambda ids: table[tuple(ids)], loaded.weights, docs, args.max_tokens)
    if args.json:
        print(json.dumps(quality.to_json()))
    else:
        print(f"{quality.tokens} tokens in {len(quality.per_doc)} windows: perplexity "
              f"{quality.perplexity:.4f} (int8), {quality.perplexity_ref:.4f} (float32); top-1 "
              f"agreement with float32 {100 * quality.agreement:.2f}%")
    return 0
