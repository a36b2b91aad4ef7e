"""Sampling: argmax, multinomial and nucleus sampling as llama2.c does them, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from tpfed.model.sampling import Sampler, sample_mult, sample_topp


def test_greedy_takes_the_first_maximum():
    s = Sampler(temperature=0.0)
    assert s.sample(np.array([0.1, 3.0, 3.0, -1.0], np.float32)) == 1


def test_multinomial_follows_the_cdf():
    probs = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    assert [sample_mult(probs, c) for c in (0.0, 0.099, 0.1, 0.29, 0.31, 0.61, 0.999)] == [0, 0, 1, 1, 2, 3, 3]


def test_topp_keeps_the_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    # sorted: 1 (0.5), 3 (0.3) -> cumulative 0.8 > 0.7: nucleus {1, 3}; r = coin * 0.8
    assert sample_topp(probs, 0.7, 0.0) == 1
    assert sample_topp(probs, 0.7, 0.62) == 1  # r = 0.496 < 0.5
    assert sample_topp(probs, 0.7, 0.63) == 3  # r = 0.504
    assert sample_topp(probs, 0.7, 0.9999) == 3
    # top_p above the total mass of all but one token keeps everything
    assert sample_topp(probs, 0.99, 0.999) == 0


def test_seeded_and_distributed_like_softmax():
    logits = np.log(np.array([0.1, 0.6, 0.3], np.float32))
    a = Sampler(temperature=1.0, top_p=1.0, seed=42)
    b = Sampler(temperature=1.0, top_p=1.0, seed=42)
    xs = [a.sample(logits) for _ in range(20000)]
    assert xs == [b.sample(logits) for _ in range(20000)]
    freq = np.bincount(xs, minlength=3) / len(xs)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.015)
    # top-p 0.5 keeps only the 0.6 token
    c = Sampler(temperature=1.0, top_p=0.5, seed=1)
    assert {c.sample(logits) for _ in range(200)} == {1}
    # a low temperature sharpens towards the argmax
    d = Sampler(temperature=0.05, top_p=1.0, seed=3)
    assert {d.sample(logits) for _ in range(200)} == {1}


def test_bad_parameters():
    with pytest.raises(ValueError):
        Sampler(temperature=-1.0)
    with pytest.raises(ValueError):
        Sampler(temperature=float("nan"))
