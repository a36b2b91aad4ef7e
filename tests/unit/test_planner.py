"""Planner: round-robin and capability splits, exact-solver gap, re-planning, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.model.hfconfig import STORIES260K, load_model_config
from tpfed.planning import costs
from tpfed.planning.costs import FREE_COORDINATOR
from tpfed.planning.fleet import DeviceSpec, device_from_profile, identical_fleet, load_fleet
from tpfed.planning.plan import Plan
from tpfed.planning.planner import fluid_time, plan, replan

HF = ("llama-2-70b", "mistral-7b", "gpt2", "bert-large")


def dev(name, mem_mb=64.0, gmacs=10.0, latency_ms=0.1, mbps=1000.0, **kw) -> DeviceSpec:
    return DeviceSpec(name, int(mem_mb * 2**20), gmacs * 1e9, latency_ms * 1e-3, mbps * 1e6 / 8, **kw)


def hf(repo_root, name) -> ModelConfig:
    return load_model_config(repo_root / "tests" / "data" / "configs" / f"{name}.json")


# --------------------------------------------------------------------------- costs
def test_q8_bytes_and_unit_costs_match_the_formulas():
    m = STORIES260K  # dim 64, hs 8, group of 2 query heads, hidden 172
    assert costs.q8_bytes(16, 64) == 16 * 64 + 16 * 2 * 2
    assert costs.attn_weight_bytes(m) == costs.q8_bytes(16, 64) + 2 * costs.q8_bytes(8, 64) + costs.q8_bytes(64, 16)
    assert costs.kv_bytes(m, 512) == 2 * 512 * 8 * 4
    assert costs.mlp_range_bytes(m, 32) == 2 * costs.q8_bytes(32, 64) + costs.q8_bytes(64, 32)
    assert costs.block_widths(m) == [32, 32, 32, 32, 32, 12]
    # the frames the coordinator really sends and receives
    from tpfed.protocol.fastpath import encode_activation, encode_partial

    from tpfed.compute.kernels import quantize_q8_0

    x = quantize_q8_0(np.ones(m.dim, np.float32))
    assert costs.act_frame_bytes(m) == len(encode_activation(0, 0, 0, x.qs, x.d))
    assert costs.partial_frame_bytes(m) == len(encode_partial(0, 0, 0, np.ones(m.dim, np.float32)))


# --------------------------------------------------------------------------- round-robin
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9])
def test_round_robin_any_count(n):
    p = plan(STORIES260K, identical_fleet(n), strategy="round-robin")
    p.validate()
    names = [f"peer-{i + 1}" for i in range(n)]
    B = costs.n_blocks(STORIES260K)
    for layer in range(STORIES260K.n_layers):
        groups, ranges = p.owners(layer)
        assert groups == [names[g % n] for g in range(STORIES260K.n_groups)]
        starts = [a for a, _, _ in ranges]
        assert starts == sorted(starts) and all(a % 32 == 0 for a in starts)
        per_dev = {d: sum(b - a for a, b, o in ranges if o == d) for d in names}
        # contiguous, even split of 32-column blocks: block counts differ by at most one
        blocks = [costs.ceil_div(c, 32) for c in per_dev.values()]
        assert max(blocks) - min(blocks) <= 1 and sum(blocks) == B
    assert p.round_robin_makespan_ms == pytest.approx(p.makespan_ms)
    # a device beyond the group count that gets no MLP block either holds nothing and is named
    held = {d.name for d in p.devices}
    assert held | {name for name, _ in p.excluded} == set(names)
    assert all(names.index(name) >= STORIES260K.n_groups for name, _ in p.excluded)
    assert len(held) >= min(n, B)


def test_round_robin_refuses_a_device_that_cannot_hold_its_share():
    fleet = [dev("big", 64), dev("tiny", 0.05)]
    with pytest.raises(PlanError, match=r"'tiny' cannot hold its share: needs \d+ bytes .* has \d+ bytes"):
        plan(STORIES260K, fleet, strategy="round-robin")


def test_unknown_strategy_and_empty_fleet():
    with pytest.raises(PlanError, match="unknown strategy"):
        plan(STORIES260K, identical_fleet(2), strategy="random")
    with pytest.raises(PlanError, match="empty fleet"):
        plan(STORIES260K, [], strategy="capability")


# --------------------------------------------------------------------------- capability
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 12, 40])
def test_capability_any_count_uniform(n):
    p = plan(STORIES260K, identical_fleet(n, "laptop"), strategy="capability")
    p.validate()
    assert p.makespan_ms >= p.ideal_ms * (1 - 1e-9)
    # capability counts the narrow last block (172 = 5 * 32 + 12) as a full one, so it may
    # trail round-robin by a few columns' worth of compute on identical devices
    assert p.makespan_ms <= p.round_robin_makespan_ms * (1 + 1e-3)


def test_capability_gives_faster_devices_more():
    fleet = [dev("fast", gmacs=40), dev("slow", gmacs=10)]
    m = ModelConfig(dim=512, hidden_dim=2048, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=100, seq_len=64)
    # the device-side model alone: with the default coordinator the slow device's 0.08 ms of
    # an MLP stage's compute saves less than one more partial costs, and it is left out
    p = plan(m, fleet, strategy="capability", coordinator=FREE_COORDINATOR)
    p.validate()
    fast, slow = p.device("fast"), p.device("slow")
    assert fast.mlp_columns > 3 * slow.mlp_columns
    assert fast.kv_units > slow.kv_units
    assert p.makespan_ms < p.round_robin_makespan_ms


def test_capability_excludes_tiny_and_far_devices_with_reasons():
    fleet = [dev("desk", gmacs=40), dev("crumb", mem_mb=0.002), dev("far", latency_ms=500)]
    p = plan(STORIES260K, fleet, strategy="capability")
    p.validate()
    reasons = dict(p.excluded)
    assert [d.name for d in p.devices] == ["desk"]
    assert reasons["crumb"].startswith("cannot hold one unit")
    assert reasons["far"].startswith("too slow or too far to help")


def test_memory_forces_heterogeneous_layers():
    m = STORIES260K
    block = costs.mlp_range_bytes(m, 32)
    # a fast device with room for three MLP blocks in all, next to a slow one with plenty
    fleet = [dev("big", mem_mb=64, gmacs=0.05), dev("small", mem_mb=3.5 * block / 0.9 / 2**20, gmacs=100)]
    p = plan(m, fleet, strategy="capability")
    p.validate()
    small = p.device("small")
    assert len(small.layers) == 3 < m.n_layers
    assert small.memory_bytes <= small.memory_limit_bytes
    assert p.makespan_ms < plan(m, fleet[:1], strategy="capability").makespan_ms


def test_not_enough_memory_is_a_plan_error():
    with pytest.raises(PlanError, match="not enough memory"):
        plan(STORIES260K, [dev("a", mem_mb=0.3), dev("b", mem_mb=0.3)], strategy="capability")


fleet_strategy = st.lists(
    st.tuples(
        st.floats(0.05, 4.0),  # memory MiB
        st.floats(0.01, 100.0),  # GMAC/s
        st.floats(0.0, 20.0),  # latency ms
        st.floats(0.1, 1000.0),  # Mbit/s
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet_strategy, st.sampled_from(["round-robin", "capability"]), st.integers(8, 512))
def test_any_fleet_gives_a_valid_plan_or_a_clear_error(spec, strategy, seq_len):
    fleet = [dev(f"d{i}", *t) for i, t in enumerate(spec)]
    try:
        p = plan(STORIES260K, fleet, strategy=strategy, seq_len=seq_len)
    except PlanError as exc:
        assert str(exc)
        return
    p.validate()  # every group/column owned once, memory within limits
    assert p.makespan_ms >= p.ideal_ms * (1 - 1e-6)
    assert {d.name for d in p.devices} | {n for n, _ in p.excluded} == {d.name for d in fleet}


# --------------------------------------------------------------------------- exact solver
def exact_makespan_ms(m: ModelConfig, fleet: list[DeviceSpec], seq_len: int, margin: float) -> float:
    """Optimal plan under the planner's cost model, by mixed-integer programming."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    uc = costs.UnitCosts.of(m, seq_len)
    assert m.hidden_dim % 32 == 0
    N, L, G, B = len(fleet), m.n_layers, m.n_groups, m.hidden_dim // 32
    speed = np.array([d.effective_macs for d in fleet])
    link = np.array([d.stage_link_s(uc.stage_bytes) for d in fleet]) * 1e3
    ta = uc.attn_macs / speed * 1e3
    tb = 32 * uc.col_macs / speed * 1e3
    cap = np.floor(np.array([d.memory_bytes for d in fleet]) * (1 - margin))
    # variables: a[d,li], m[d,li], ya[d,li], ym[d,li], Ta[li], Tm[li]
    nv = 4 * N * L + 2 * L

    def a(d, li): return d * L + li
    def mm(d, li): return N * L + d * L + li
    def ya(d, li): return 2 * N * L + d * L + li
    def ym(d, li): return 3 * N * L + d * L + li
    def Ta(li): return 4 * N * L + li
    def Tm(li): return 4 * N * L + L + li

    rows, lo, hi = [], [], []

    def add(coefs, low, high):
        r = np.zeros(nv)
        for i, c in coefs:
            r[i] += c
        rows.append(r)
        lo.append(low)
        hi.append(high)

    for li in range(L):
        add([(a(d, li), 1) for d in range(N)], G, G)
        add([(mm(d, li), 1) for d in range(N)], B, B)
        for d in range(N):
            add([(a(d, li), 1), (ya(d, li), -G)], -np.inf, 0)
            add([(mm(d, li), 1), (ym(d, li), -B)], -np.inf, 0)
            add([(Ta(li), 1), (ya(d, li), -link[d]), (a(d, li), -ta[d])], 0, np.inf)
            add([(Tm(li), 1), (ym(d, li), -link[d]), (mm(d, li), -tb[d])], 0, np.inf)
    for d in range(N):
        add([(a(d, li), uc.attn_bytes) for li in range(L)] + [(mm(d, li), uc.block_bytes) for li in range(L)],
            -np.inf, cap[d])
    c = np.zeros(nv)
    c[4 * N * L:] = 1.0
    integrality = np.concatenate([np.ones(4 * N * L), np.zeros(2 * L)])
    ub = np.concatenate([np.full(N * L, G), np.full(N * L, B), np.ones(2 * N * L), np.full(2 * L, np.inf)])
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nv), ub), options={"time_limit": 20})
    assert res.status == 0, res.message
    return float(res.fun)


SMALL = ModelConfig(dim=128, hidden_dim=256, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=64, seq_len=64)


def _small_fleets():
    rng = np.random.default_rng(7)
    m = SMALL
    layer_bytes = m.n_groups * costs.attn_unit_bytes(m, m.seq_len) + costs.mlp_range_bytes(m, m.hidden_dim)
    for _ in range(8):
        n = int(rng.integers(2, 5))
        yield [
            dev(f"d{i}", mem_mb=float(rng.uniform(0.4, 2.5)) * layer_bytes / 2**20,
                gmacs=float(rng.choice([0.05, 0.2, 1.0, 5.0])), latency_ms=float(rng.uniform(0.0, 0.5)),
                mbps=float(rng.choice([10.0, 100.0, 1000.0])))
            for i in range(n)
        ]


def test_capability_is_close_to_the_exact_optimum():
    gaps = []
    for fleet in _small_fleets():
        try:
            exact = exact_makespan_ms(SMALL, fleet, SMALL.seq_len, 0.1)
        except AssertionError:
            continue  # infeasible instance (not enough memory in total)
        try:  # the MILP is the device-side model: a coordinator that costs nothing
            p = plan(SMALL, fleet, strategy="capability", coordinator=FREE_COORDINATOR)
        except PlanError:
            gaps.append(float("inf"))
            continue
        p.validate()
        assert p.makespan_ms >= exact * (1 - 1e-6)  # the MILP really is a lower bound
        assert exact >= p.ideal_ms * (1 - 1e-6)  # and the fluid ideal is below both
        gaps.append(p.makespan_ms / exact - 1)
    print(f"capability vs exact MILP on {len(gaps)} small fleets: gaps {[f'{g:.3f}' for g in gaps]}")
    assert len(gaps) >= 5
    assert max(gaps) <= 0.25
    assert float(np.mean(gaps)) <= 0.10


# --------------------------------------------------------------------------- real model shapes
@pytest.mark.parametrize("name", HF)
def test_hf_configs_plan_over_the_lab_fleet(repo_root, name):
    m = hf(repo_root, name)
    fleet = load_fleet(repo_root / "boards" / "fleets" / "lab-100.yaml")
    p = plan(m, fleet, strategy="capability", seq_len=min(m.seq_len, 4096))
    p.validate()
    assert p.makespan_ms >= p.ideal_ms * (1 - 1e-9)
    assert p.makespan_ms < p.round_robin_makespan_ms
    if name == "llama-2-70b":
        # the ideal leaves out memory and the send queue's order; with the coordinator's
        # queues in the model the capability split sits about 11% above it
        assert p.makespan_ms <= 1.15 * p.ideal_ms


def test_hf_config_mapping(repo_root):
    gpt2 = hf(repo_root, "gpt2")
    assert (gpt2.dim, gpt2.hidden_dim, gpt2.n_heads, gpt2.n_kv_heads, gpt2.mlp_matrices) == (768, 3072, 12, 12, 2)
    bert = hf(repo_root, "bert-large")
    assert (bert.dim, bert.hidden_dim, bert.n_layers, bert.mlp_matrices, bert.seq_len) == (1024, 4096, 24, 2, 512)
    mistral = hf(repo_root, "mistral-7b")
    assert (mistral.n_kv_heads, mistral.group_size, mistral.mlp_matrices) == (8, 4, 3)
    llama = hf(repo_root, "llama-2-70b")
    assert (llama.dim, llama.hidden_dim, llama.n_layers, llama.n_groups, llama.shared_classifier) == (
        8192, 28672, 80, 8, False)


def test_stories260k_checkpoint_header(stories260k_dir):
    m = load_model_config(stories260k_dir / "stories260K.bin")
    assert m == STORIES260K.__class__(**{**STORIES260K.to_dict(), "name": "stories260K"})
    p = plan(m, identical_fleet(3), strategy="capability")
    p.validate()


# --------------------------------------------------------------------------- re-planning
def _units(p: Plan, name: str) -> set:
    d = p.device(name)
    out = set()
    for li, s in d.layers.items():
        out |= {(li, "g", g) for g in s.kv_groups}
        for a, b in s.mlp_ranges:
            out |= {(li, "c", c) for c in range(a, b, 32)}
    return out


def test_replan_after_leave_moves_only_the_lost_units(repo_root):
    m = hf(repo_root, "mistral-7b")
    fleet = load_fleet(repo_root / "boards" / "fleets" / "lab-100.yaml")
    p = plan(m, fleet, strategy="capability", seq_len=2048)
    gone = p.devices[-1].name  # the coordinator's costs keep mistral-7b on a few GPUs
    q = replan(p, [d for d in fleet if d.name != gone])
    q.validate()
    assert gone not in {d.name for d in q.devices}
    lost = p.device(gone)
    assert q.moved_bytes == sum(
        len(s.kv_groups) * costs.attn_weight_bytes(m) + sum(costs.mlp_range_bytes(m, b - a) for a, b in s.mlp_ranges)
        for s in lost.layers.values()
    )
    assert all(mv.src == gone for mv in q.moves)
    for d in p.devices:  # everyone still there keeps everything it had
        if d.name != gone:
            assert _units(p, d.name) <= _units(q, d.name)
    assert q.makespan_ms <= 1.15 * q.ideal_ms
    assert q.moved_bytes == p.diff(q).moved_bytes


def test_replan_after_join_moves_only_to_the_newcomer():
    m = ModelConfig(dim=512, hidden_dim=2048, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=100, seq_len=128)
    fleet = [dev(f"d{i}", gmacs=5) for i in range(3)]
    p = plan(m, fleet, strategy="capability")
    new = dev("new", gmacs=20)
    q = replan(p, [*fleet, new])
    q.validate()
    assert q.moved_bytes > 0
    assert all(mv.dst == "new" for mv in q.moves)
    assert q.makespan_ms < p.makespan_ms
    fresh = plan(m, [*fleet, new], strategy="capability")
    assert q.moved_bytes < p.diff(fresh).moved_bytes or p.diff(fresh).moved_bytes == 0
    assert q.makespan_ms <= 1.15 * fresh.makespan_ms


def test_replan_same_fleet_moves_nothing():
    fleet = identical_fleet(4, "laptop")
    p = plan(STORIES260K, fleet, strategy="capability")
    q = replan(p, fleet)
    q.validate()
    assert q.moved_bytes == 0 and q.moves == []


# --------------------------------------------------------------------------- data
def test_json_round_trip_save_load_and_diff(tmp_path):
    fleet = [device_from_profile("lap", "laptop"), device_from_profile("desk", "desktop"),
             device_from_profile("ph", "phone-high")]
    p = plan(STORIES260K, fleet, strategy="capability")
    doc = json.loads(json.dumps(p.to_dict()))
    assert Plan.from_dict(doc) == p
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert p.diff(Plan.load(path)).moves == []
    rr = plan(STORIES260K, fleet, strategy="round-robin")
    d = p.diff(rr)
    assert d.moved_bytes > 0 and "moves" in str(d)
    with pytest.raises(PlanError, match="not a tpfed plan"):
        Plan.from_dict({"model": {}})


def test_validate_catches_double_ownership():
    p = plan(STORIES260K, identical_fleet(2), strategy="round-robin")
    d = p.devices[0]
    d.layers[0] = type(d.layers[0])(d.layers[0].kv_groups + (1,), d.layers[0].mlp_ranges)
    with pytest.raises(PlanError):
        p.validate()


def test_table_renders():
    from rich.console import Console

    p = plan(STORIES260K, [dev("a"), dev("crumb", mem_mb=0.001)], strategy="capability")
    console = Console(record=True, width=160)
    console.print(p.table())
    text = console.export_text()
    assert "a" in text and "excluded crumb" in text


def test_fluid_time():
    link = np.array([0.0, 1.0])
    speed = np.array([1.0, 1.0])
    assert fluid_time(0.5, link, speed) == pytest.approx(0.5)  # second device not worth it
    assert fluid_time(3.0, link, speed) == pytest.approx(2.0)  # 2 + 1 = 3


# --------------------------------------------------------------------------- the coordinator's link
def test_plan_and_simulation_agree_on_lab_100(repo_root):
    """The planner counts the coordinator's sends and its receive queue as the simulator does:
    on Llama-2-70B over lab-100 the two agree within 10% (they were 116 vs 984 ms/token)."""
    from tpfed.planning.simulator import simulate

    m = hf(repo_root, "llama-2-70b")
    fleet = load_fleet(repo_root / "boards" / "fleets" / "lab-100.yaml")
    p = plan(m, fleet, strategy="capability")
    p.validate()
    r = simulate(p, fleet, tokens=16)
    sim_ms = sum(r.token_ms) / len(r.token_ms)
    assert abs(p.makespan_ms / sim_ms - 1) <= 0.10
    assert sim_ms < 500  # fewer devices per stage: well under the 984 ms of the old split
    # every excluded device says why and what would make it help
    assert all("would help" in reason or "no device would" in reason for _, reason in p.excluded)


def test_every_extra_device_costs_the_coordinator_a_partial():
    """A stage whose compute is shorter than what one more partial costs the coordinator is
    left to one device; with a free coordinator the same fleet splits it."""
    m = ModelConfig(dim=512, hidden_dim=2048, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=100, seq_len=64)
    fleet = [dev(f"d{i}", gmacs=40) for i in range(4)]
    assert len(plan(m, fleet, strategy="capability").devices) < 4
    assert len(plan(m, fleet, strategy="capability", coordinator=FREE_COORDINATOR).devices) == 4
