"""Next-token sampling as llama2.c does it: argmax at temperature 0, otherwise softmax of
``logits / temperature`` followed by plain multinomial sampling or, with 0 < top_p < 1,
nucleus sampling. The randomness is a seeded numpy Generator, so a seed gives one text."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tpfed.errors import TpfedError


class SamplingError(TpfedError, ValueError):
    """A sampling setting that makes no sense (negative or NaN temperature, NaN top-p)."""


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be a number >= 0, got {self.temperature}")
        if not np.isfinite(self.top_p):
            raise SamplingError(f"top-p must be a number, got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32)
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        probs = softmax(logits / np.float32(self.temperature))
        coin = float(self.rng.random())
        if self.top_p <= 0 or self.top_p >= 1:
            return sample_mult(probs, coin)
        return sample_topp(probs, self.top_p, coin)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return (e / e.sum()).astype(np.float32)


def sample_mult(probs: np.ndarray, coin: float) -> int:
    """First index whose cumulative probability exceeds ``coin`` (the last on rounding)."""
    cdf = np.cumsum(probs, dtype=np.float32)
    idx = int(np.searchsorted(cdf, np.float32(coin), side="right"))
    return min(idx, probs.size - 1)


def sample_topp(probs: np.ndarray, top_p: float, coin: float) -> int:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    exceeds ``top_p`` and sample within it. Tokens below ``(1 - top_p) / (n - 1)`` cannot be
    in the set and are dropped before sorting (llama2.c's shortcut)."""
    n = probs.size
    cutoff = (1.0 - top_p) / (n - 1)
    cand = np.flatnonzero(probs >= cutoff)
    if cand.size == 0:  # all mass in tokens below the cutoff: fall back to the full set
        cand = np.arange(n)
    # Descending probability; ties by ascending index (a stable sort, deterministic).
    order = cand[np.argsort(-probs[cand], kind="stable")]
    p = probs[order]
    cdf = np.cumsum(p, dtype=np.float32)
    over = np.flatnonzero(cdf > top_p)
    last = int(over[0]) if over.size else order.size - 1
    r = np.float32(coin) * cdf[last]
    idx = int(np.searchsorted(cdf[: last + 1], r, side="right"))
    return int(order[min(idx, last)])
