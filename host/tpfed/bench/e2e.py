"""``tpfed bench e2e``: end-to-end generation on stories260K, measured in one run.

The baseline is the single-process int8 forward (:class:`tpfed.compute.int8_forward.Int8Transformer`, the
same kernels, no network). Then the same greedy generation runs across 1, 2 and 4 local peer
processes over loopback UDP; for each the benchmark reports tokens/s, the per-token overhead
against the baseline, and wire bytes per token against the protocol's minimum (per stage and
participating device: the Q8_0 activation out and a float32 partial back).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.model.sampling import Sampler
from tpfed.model.tokenizer import Tokenizer
from tpfed.runtime import aio
from tpfed.runtime.session import RunOptions, generate_local, run

PROMPT = "Once upon a time"


@dataclass
class E2EPoint:
    peers: int
    tokens_per_s: float
    ms_per_token: float
    overhead_ms_per_token: float
    wire_bytes_per_token: float
    min_wire_bytes_per_token: float
    wire_ratio: float
    same_text_as_single: bool


def single_process_tps(q8: Q8Model, tok: Tokenizer, steps: int, repeat: int) -> tuple[float, list[int]]:
    """Greedy positions/s of the single-process int8 forward (best of ``repeat``)."""
    best = 0.0
    tokens: list[int] = []
    for _ in range(repeat):
        model = Int8Transformer(q8)
        t0 = time.perf_counter()
        tokens, n = generate_local(model, tok, PROMPT, steps, Sampler(0.0))
        best = max(best, n / (time.perf_counter() - t0))
    return best, tokens


def run_e2e_bench(peer_counts: tuple[int, ...] = (1, 2, 4), steps: int = 256,
                  repeat: int = 3, model: str | None = None) -> dict:
    from tpfed.runtime.session import load_model

    q8, tok = load_model(model, None)
    base_tps, base_tokens = single_process_tps(q8, tok, steps, repeat)
    points = []
    for n in peer_counts:
        best = None
        for _ in range(repeat):
            res = aio.run(run(RunOptions(peers=f"local:{n}", prompt=PROMPT, steps=steps),
                                  model=(q8, tok)))
            if best is None or res.stats.tokens_per_s > best.stats.tokens_per_s:
                best = res
        s = best.stats
        ms = 1000.0 / s.tokens_per_s
        points.append(E2EPoint(
            peers=n, tokens_per_s=round(s.tokens_per_s, 1), ms_per_token=round(ms, 3),
            overhead_ms_per_token=round(ms - 1000.0 / base_tps, 3),
            wire_bytes_per_token=round(s.wire_bytes_per_token, 1),
            min_wire_bytes_per_token=round(s.min_wire_bytes_per_token, 1),
            wire_ratio=round(s.wire_bytes_per_token / s.min_wire_bytes_per_token, 4),
            same_text_as_single=best.tokens == base_tokens,
        ))
    return {
        "model": "stories260K",
        "steps": steps,
        "single_process_tokens_per_s": round(base_tps, 1),
        "points": [asdict(p) for p in points],
    }
