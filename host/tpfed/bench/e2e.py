"""``tpfed bench e2e``: end-to-end greedy generation on any llama2.c checkpoint, measured in one run.

The baseline is the single-process int8 forward (:class:`tpfed.compute.int8_forward.Int8Transformer`,
the same kernels, no network), run on one thread, as each peer process of the distributed runs
computes on one thread. Then the same greedy generation runs across each requested number of
local peer processes over loopback UDP; for each the benchmark reports tokens/s, the ratio to
the baseline (peers tok/s / single-process tok/s), the per-token overhead against it, and wire
bytes per token against the protocol's minimum (per stage and participating device: the Q8_0
activation out and a float32 partial back).

``llama2c_run`` adds a second baseline measured in the same run: a llama2.c ``run`` binary the
user built (``gcc -O3 -o run run.c -lm``: float32, one thread), given the same checkpoint,
tokenizer, prompt and number of positions at temperature 0; its own "achieved tok/s" line is
reported (it times from the second position on, with millisecond resolution).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.errors import TpfedError
from tpfed.model.sampling import Sampler
from tpfed.model.tokenizer import Tokenizer
from tpfed.runtime import aio
from tpfed.runtime.session import RunOptions, generate_local, load_model, run

PROMPT = "Once upon a time"
SINGLE_PROCESS_THREADS = 1
"""Threads of the single-process baseline: Int8Transformer calls every kernel on the calling
thread (matmul_q8_0_f32's row splitting is off), like one peer process."""

_ACHIEVED = re.compile(rb"achieved tok/s:\s*([0-9.eE+-]+)")


@dataclass
class E2EPoint:
    peers: int
    tokens_per_s: float
    vs_single_process: float
    ms_per_token: float
    overhead_ms_per_token: float
    wire_bytes_per_token: float
    min_wire_bytes_per_token: float
    wire_ratio: float
    same_text_as_single: bool


def single_process_tps(q8: Q8Model, tok: Tokenizer, steps: int, repeat: int,
                       prompt: str = PROMPT) -> tuple[float, list[int]]:
    """Greedy positions/s of the single-process int8 forward on one thread (best of ``repeat``)."""
    best = 0.0
    tokens: list[int] = []
    for _ in range(repeat):
        model = Int8Transformer(q8)
        t0 = time.perf_counter()
        tokens, n = generate_local(model, tok, prompt, steps, Sampler(0.0))
        best = max(best, n / (time.perf_counter() - t0))
    return best, tokens


def llama2c_run_tps(binary: str | os.PathLike[str], model: Path, tokenizer: Path, steps: int,
                    repeat: int, prompt: str = PROMPT, timeout_s: float = 600.0) -> float:
    """Best "achieved tok/s" of a llama2.c ``run`` binary over ``repeat`` runs."""
    exe = Path(binary)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise TpfedError(f"--llama2c-run: {exe} is not an executable file")
    best = 0.0
    for _ in range(repeat):
        cmd = [str(exe), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", prompt]
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TpfedError(f"--llama2c-run: {exe} failed: {exc}") from None
        m = _ACHIEVED.search(r.stderr)
        if r.returncode != 0 or m is None:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise TpfedError(f"--llama2c-run: {exe} exited {r.returncode} without an "
                             f"'achieved tok/s' line ({tail[0]})")
        best = max(best, float(m.group(1)))
    return best


def run_e2e_bench(peer_counts: tuple[int, ...] = (1, 2, 4), steps: int = 256, repeat: int = 3,
                  model: str | None = None, tokenizer: str | None = None,
                  llama2c_run: str | None = None) -> dict:
    from tpfed.model.fetch import locate_model

    files = locate_model(model, tokenizer)
    q8, tok = load_model(str(files.model), str(files.tokenizer))
    steps = min(steps, q8.config.seq_len)
    base_tps, base_tokens = single_process_tps(q8, tok, steps, repeat)
    l2c_tps = (llama2c_run_tps(llama2c_run, files.model, files.tokenizer, steps, repeat)
               if llama2c_run else None)
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
            peers=n, tokens_per_s=round(s.tokens_per_s, 1),
            vs_single_process=round(s.tokens_per_s / base_tps, 4), ms_per_token=round(ms, 3),
            overhead_ms_per_token=round(ms - 1000.0 / base_tps, 3),
            wire_bytes_per_token=round(s.wire_bytes_per_token, 1),
            min_wire_bytes_per_token=round(s.min_wire_bytes_per_token, 1),
            wire_ratio=round(s.wire_bytes_per_token / s.min_wire_bytes_per_token, 4),
            same_text_as_single=best.tokens == base_tokens,
        ))
    c = q8.config
    result = {
        "model": files.model.stem,
        "model_path": str(files.model),
        "tokenizer_path": str(files.tokenizer),
        "geometry": {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
                     "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
                     "seq_len": c.seq_len},
        "steps": steps,
        "prompt": PROMPT,
        "single_process_threads": SINGLE_PROCESS_THREADS,
        "single_process_tokens_per_s": round(base_tps, 1),
        "points": [asdict(p) for p in points],
    }
    if l2c_tps is not None:
        result["llama2c_run"] = str(llama2c_run)
        result["llama2c_run_tokens_per_s"] = round(l2c_tps, 1)
        result["single_process_vs_llama2c_run"] = round(base_tps / l2c_tps, 4)
    return result
