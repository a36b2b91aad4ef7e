"""Fleet simulator: analytic single-device case, scaling, and 10^4 devices."""

from __future__ import annotations

import time

import pytest

from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.model.hfconfig import STORIES260K
from tpfed.planning import costs
from tpfed.planning.fleet import DeviceSpec, identical_fleet
from tpfed.planning.planner import plan
from tpfed.planning.simulator import CoordinatorSpec, plot, simulate

COORD = CoordinatorSpec(int8_macs=20e9, ops_per_s=2e9, bandwidth_Bps=100e6, per_frame_s=3e-6)


def test_one_device_equals_compute_plus_link_time():
    m = STORIES260K
    d = DeviceSpec("solo", 1 << 30, 2e9, 0.4e-3, 10e6)
    p = plan(m, [d], strategy="round-robin")
    tokens = 3
    r = simulate(p, [d], coordinator=COORD, tokens=tokens)
    act, part = costs.act_frame_bytes(m), costs.partial_frame_bytes(m)
    stage_fixed = (6 * m.dim / COORD.ops_per_s  # norm + quantise
                   + COORD.per_frame_s + act / COORD.bandwidth_Bps  # send on the coordinator NIC
                   + d.latency_s + act / d.bandwidth_Bps  # activation over the link
                   + d.latency_s + part / d.bandwidth_Bps  # partial back
                   + COORD.per_frame_s + part / COORD.bandwidth_Bps + m.dim / COORD.ops_per_s)  # receive + sum
    head = m.dim / COORD.ops_per_s + m.vocab_size * m.dim / COORD.int8_macs + (
        6 * m.dim + 3 * m.vocab_size) / COORD.ops_per_s
    for t in range(tokens):
        ctx = t + 1
        compute = m.n_layers * (m.n_groups * costs.attn_macs(m, ctx) + m.hidden_dim * costs.mlp_col_macs(m)) / d.int8_macs
        expected = 2 * m.n_layers * stage_fixed + compute + head
        assert r.token_ms[t] == pytest.approx(expected * 1e3, rel=1e-9)
    assert r.tokens_per_s == pytest.approx(tokens / (sum(r.token_ms) / 1e3))
    assert sum(r.breakdown_ms.values()) == pytest.approx(sum(r.token_ms) / tokens)
    assert r.bytes_per_token == 2 * m.n_layers * (act + part)
    assert 0 < r.utilisation["solo"] < 1


def test_more_devices_are_faster_until_link_bound():
    # compute-heavy layers on slow devices with fast links: splitting pays off at first, then the
    # coordinator's per-frame cost and NIC serialisation take over
    m = ModelConfig(dim=1024, hidden_dim=4096, n_layers=4, n_heads=16, n_kv_heads=16, vocab_size=1000, seq_len=128)
    rates = {}
    for n in (1, 2, 4, 8, 16, 64, 256):
        fleet = [DeviceSpec(f"d{i}", 1 << 30, 0.5e9, 50e-6, 1e9) for i in range(n)]
        p = plan(m, fleet, strategy="capability")
        rates[n] = simulate(p, fleet, coordinator=COORD, tokens=2).tokens_per_s
    assert rates[1] < rates[2] < rates[4] < rates[8] < rates[16]
    assert rates[256] < 1.5 * rates[64]  # gains flatten out: link- and coordinator-bound
    assert rates[16] > 5 * rates[1]


def test_ten_thousand_devices():
    m = ModelConfig(dim=256, hidden_dim=32 * 10_000, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=256,
                    seq_len=64, mlp_matrices=2, arch="gpt2")
    fleet = identical_fleet(10_000, "phone-mid")
    p = plan(m, fleet, strategy="round-robin")
    assert len(p.devices) == 10_000
    t = time.perf_counter()
    r = simulate(p, fleet, tokens=2)
    elapsed = time.perf_counter() - t
    assert r.tokens_per_s > 0 and len(r.utilisation) == 10_000
    assert r.bytes_per_token >= r.min_bytes_per_token
    assert elapsed < 30  # generous: a correctness check that it scales, not a benchmark


def test_plot_writes_a_png(tmp_path):
    fleet = identical_fleet(3, "laptop")
    p = plan(STORIES260K, fleet, strategy="capability")
    r = simulate(p, fleet, tokens=2)
    out = tmp_path / "sim.png"
    plot(p, r, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs():
    fleet = identical_fleet(2)
    p = plan(STORIES260K, fleet, strategy="round-robin")
    with pytest.raises(PlanError, match="does not have"):
        simulate(p, fleet[:1])
    with pytest.raises(PlanError, match="tokens"):
        simulate(p, fleet, tokens=0)
    with pytest.raises(PlanError, match="seq_len"):
        simulate(p, fleet, tokens=STORIES260K.seq_len + 1)
