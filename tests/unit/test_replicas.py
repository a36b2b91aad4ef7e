"""Replicas: every unit on K devices with identical shares (planning, re-planning, simulation)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.model.hfconfig import STORIES260K, load_model_config
from tpfed.planning import costs
from tpfed.planning.fleet import DeviceSpec, device_from_profile, identical_fleet, load_fleet
from tpfed.planning.plan import LayerShare, Plan, share_bytes
from tpfed.planning.planner import plan, replan
from tpfed.planning.simulator import simulate

M = ModelConfig(dim=512, hidden_dim=2048, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=100, seq_len=128)


def dev(name, mem_mb=64.0, gmacs=10.0, latency_ms=0.1, mbps=1000.0, **kw) -> DeviceSpec:
    return DeviceSpec(name, int(mem_mb * 2**20), gmacs * 1e9, latency_ms * 1e-3, mbps * 1e6 / 8, **kw)


def share_weight_bytes(m: ModelConfig, layers: dict[int, LayerShare]) -> int:
    return sum(len(s.kv_groups) * costs.attn_weight_bytes(m)
               + sum(costs.mlp_range_bytes(m, b - a) for a, b in s.mlp_ranges) for s in layers.values())


def check_sets(p: Plan, k: int) -> None:
    p.validate()
    names = [d.name for d in p.devices]
    assert [n for s in p.replica_sets for n in s] == names  # members next to each other, sets in plan order
    for s in p.replica_sets:
        assert 1 <= len(s) <= k
        first = p.device(s[0])
        assert all(p.device(n).layers == first.layers for n in s[1:])


# --------------------------------------------------------------------------- plan
@pytest.mark.parametrize("strategy", ["round-robin", "capability"])
def test_one_replica_is_todays_plan(strategy):
    fleet = [dev("a", gmacs=20), dev("b"), dev("c", gmacs=5)]
    p = plan(M, fleet, strategy=strategy)
    q = plan(M, fleet, strategy=strategy, replicas=1)
    a, b = p.to_dict(), q.to_dict()
    a.pop("plan_ms"), b.pop("plan_ms")
    assert a == b
    assert p.replicas == 1 and p.replica_sets == [[d.name] for d in p.devices] and not p.replicated
    for layer in range(M.n_layers):
        groups, ranges = p.owners(layer)
        assert p.owner_sets(layer, "attn") == [[n] for n in dict.fromkeys(d.name for d in p.devices
                                                                           if d.name in groups)]
        assert p.owner_sets(layer, 1) == [[n] for n in dict.fromkeys(d.name for d in p.devices
                                                                      if any(o == d.name for *_, o in ranges))]


@pytest.mark.parametrize("strategy", ["round-robin", "capability"])
@pytest.mark.parametrize("k", [2, 3])
def test_every_unit_on_k_identical_members(strategy, k):
    fleet = [dev(f"d{i}", gmacs=5 + i % 3) for i in range(7)]
    p = plan(M, fleet, strategy=strategy, replicas=k)
    check_sets(p, k)
    assert p.replicas == k and p.replicated
    assert all(len(s) == k for s in p.replica_sets)
    in_sets = {n for s in p.replica_sets for n in s}
    # the remainder (7 mod k) and sets given nothing are named with a reason
    assert in_sets | {n for n, _ in p.excluded} == {d.name for d in fleet}
    assert sum("in no replica set" in why for _, why in p.excluded) == 7 % k
    for layer in range(M.n_layers):
        for stage in ("attn", "mlp"):
            sets = p.owner_sets(layer, stage)
            assert sets and all(s in p.replica_sets for s in sets)
            assert sets == sorted(sets, key=p.replica_sets.index)  # plan order
    # the shares of the sets sum to the model, once
    total = sum(share_weight_bytes(M, p.set_share(i).layers) for i in range(len(p.replica_sets)))
    assert total == costs.model_weight_bytes(M)
    doc = json.loads(json.dumps(p.to_dict()))
    assert Plan.from_dict(doc) == p


def test_sets_are_made_of_alike_devices_and_ordered_by_fleet():
    fleet = [dev("slow-1", gmacs=1), dev("fast-1", gmacs=50), dev("slow-2", gmacs=1), dev("fast-2", gmacs=50),
             dev("mid", gmacs=0.5), dev("crumb", mem_mb=0.001)]
    p = plan(M, fleet, strategy="round-robin", replicas=2)
    check_sets(p, 2)
    assert p.replica_sets == [["slow-1", "slow-2"], ["fast-1", "fast-2"]]
    why = dict(p.excluded)
    assert "in no replica set" in why["mid"] and "would help with 1 more device like it" in why["mid"]
    assert "cannot hold one unit" in why["crumb"]


def test_not_enough_memory_for_k_copies_is_one_clear_error():
    m = STORIES260K
    need = costs.model_weight_bytes(m) + m.n_layers * m.n_groups * costs.kv_bytes(m, m.seq_len)
    fleet = [DeviceSpec(f"d{i}", int(need / 0.9 / 2.5), 1e9, 1e-4, 1e8) for i in range(4)]
    plan(m, fleet, strategy="capability")  # one copy fits on 4
    with pytest.raises(PlanError, match=r"not enough memory for 2 replicas: .* MiB per copy missing.*"
                                        r"one copy fits \(replicas 1\)"):
        plan(m, fleet, strategy="capability", replicas=2)
    with pytest.raises(PlanError, match="5 replicas need at least 5 devices"):
        plan(m, fleet, strategy="capability", replicas=5)
    with pytest.raises(PlanError, match="replicas must be a positive integer"):
        plan(m, fleet, replicas=0)


def test_validate_catches_unlike_members_and_units_on_two_sets():
    p = plan(M, identical_fleet(4), strategy="round-robin", replicas=2)
    p.validate()
    bad = dataclasses.replace(p, devices=[dataclasses.replace(d) for d in p.devices])
    s = bad.devices[1].layers[0]
    bad.devices[1].layers = {**bad.devices[1].layers, 0: LayerShare(s.kv_groups[:-1], s.mlp_ranges)}
    bad.devices[1].memory_bytes = share_bytes(M, p.seq_len, bad.devices[1].layers)
    with pytest.raises(PlanError, match="does not hold the same units"):
        bad.validate()
    split = dataclasses.replace(p, replica_sets=[[n] for s in p.replica_sets for n in s])
    with pytest.raises(PlanError, match="owners"):
        split.validate()
    missing = dataclasses.replace(p, replica_sets=p.replica_sets[:1])
    with pytest.raises(PlanError, match="in no replica set"):
        missing.validate()


def test_table_shows_the_sets():
    from rich.console import Console

    p = plan(STORIES260K, identical_fleet(3), strategy="capability", replicas=2)
    console = Console(record=True, width=200)
    console.print(p.table())
    text = console.export_text()
    assert "1 replica set of 2" in text and "set" in text and "excluded peer-3: in no replica set" in text


# --------------------------------------------------------------------------- re-plan
def test_losing_a_replica_moves_nothing():
    fleet = [dev(f"d{i}", gmacs=5 + 5 * (i // 2)) for i in range(6)]
    p = plan(M, fleet, strategy="capability", replicas=2)
    check_sets(p, 2)
    gone = p.replica_sets[0][0]
    q = replan(p, [d for d in fleet if d.name != gone])
    check_sets(q, 2)
    assert q.moved_bytes == 0 and q.moves == []
    assert q.replica_sets[0] == p.replica_sets[0][1:]
    for d in q.devices:
        assert d.layers == p.device(d.name).layers
    assert q.replicas == 2


def test_losing_a_whole_set_moves_its_units_to_every_member_of_the_receivers():
    fleet = [dev(f"d{i}", gmacs=5 + 5 * (i // 2)) for i in range(6)]
    p = plan(M, fleet, strategy="capability", replicas=2)
    lost = p.replica_sets[0]
    q = replan(p, [d for d in fleet if d.name not in lost])
    check_sets(q, 2)
    lost_bytes = share_weight_bytes(M, p.set_share(0).layers)
    assert lost_bytes > 0
    assert q.moved_bytes == 2 * lost_bytes  # each unit to both members of its new set
    assert all(mv.src is None for mv in q.moves)
    assert q.moved_bytes == p.diff(q).moved_bytes
    for d in q.devices:  # survivors keep what they had
        old = p.device(d.name).layers
        for li, s in old.items():
            assert set(s.kv_groups) <= set(d.layers[li].kv_groups)


def test_a_newcomer_fills_a_short_set_and_receives_its_whole_share():
    fleet = [dev(f"d{i}", gmacs=10) for i in range(4)]
    p = plan(M, fleet, strategy="capability", replicas=2)
    gone = p.replica_sets[-1][0]
    q = replan(p, [d for d in fleet if d.name != gone])
    assert q.moved_bytes == 0
    r = replan(q, [*[d for d in fleet if d.name != gone], dev("new", gmacs=10)])
    check_sets(r, 2)
    j = next(i for i, s in enumerate(r.replica_sets) if "new" in s)
    assert len(r.replica_sets[j]) == 2
    mate = next(n for n in r.replica_sets[j] if n != "new")
    assert r.moved_bytes == share_weight_bytes(M, r.device("new").layers) > 0
    assert {mv.dst for mv in r.moves} == {"new"} and {mv.src for mv in r.moves} == {mate}


def test_a_newcomer_with_no_short_set_is_a_set_of_its_own():
    fleet = [dev(f"d{i}", gmacs=5) for i in range(4)]
    p = plan(M, fleet, strategy="capability", replicas=2)
    q = replan(p, [*fleet, dev("new", gmacs=40)])
    check_sets(q, 2)
    assert ["new"] in q.replica_sets
    assert {mv.dst for mv in q.moves} == {"new"} and q.moved_bytes > 0
    assert q.makespan_ms < p.makespan_ms
    # a second newcomer joins it: the singleton set is short of 2
    r = replan(q, [*fleet, dev("new", gmacs=40), dev("newer", gmacs=40)])
    check_sets(r, 2)
    assert ["new", "newer"] in r.replica_sets
    assert {mv.dst for mv in r.moves} == {"newer"}
    assert r.moved_bytes == share_weight_bytes(M, r.device("new").layers)


def test_replan_same_fleet_moves_nothing_with_replicas():
    fleet = identical_fleet(4, "laptop")
    p = plan(STORIES260K, fleet, strategy="capability", replicas=2)
    q = replan(p, fleet)
    check_sets(q, 2)
    assert q.moved_bytes == 0 and q.replica_sets == p.replica_sets


# --------------------------------------------------------------------------- simulation
def test_the_first_partial_of_a_set_ends_the_stage():
    """A straggling replica does not slow the token: its set-mate's partial is taken."""
    m = M
    fast = [dev("a", gmacs=10), dev("b", gmacs=10)]
    p = plan(m, fast, strategy="round-robin", replicas=2)
    assert p.replica_sets == [["a", "b"]]
    both = simulate(p, fast, tokens=2)
    straggler = [fast[0], dataclasses.replace(fast[1], int8_macs=0.5e9)]
    with_straggler = simulate(p, straggler, tokens=2)
    alone = plan(m, straggler[1:], strategy="round-robin")
    slow_alone = simulate(alone, straggler[1:], tokens=2)
    assert with_straggler.token_ms[-1] == pytest.approx(both.token_ms[-1], rel=0.02)
    assert slow_alone.token_ms[-1] > 5 * with_straggler.token_ms[-1]
    # both replicas computed, twice the frames went out and came back, one partial per set is the floor
    assert with_straggler.utilisation["b"] > 0 and with_straggler.utilisation["a"] > 0
    single = simulate(plan(m, fast[:1], strategy="round-robin"), fast[:1], tokens=2)
    assert both.bytes_per_token == 2 * single.bytes_per_token
    assert both.min_bytes_per_token == single.min_bytes_per_token
    assert sum(both.breakdown_ms.values()) == pytest.approx(sum(both.token_ms) / 2)


def test_plan_and_simulation_agree_on_lab_100_with_replicas(repo_root):
    m = load_model_config(repo_root / "tests" / "data" / "configs" / "llama-2-70b.json")
    fleet = load_fleet(repo_root / "boards" / "fleets" / "lab-100.yaml")
    p = plan(m, fleet, strategy="capability", replicas=2)
    check_sets(p, 2)
    r = simulate(p, fleet, tokens=8)
    sim_ms = sum(r.token_ms) / len(r.token_ms)
    assert abs(p.makespan_ms / sim_ms - 1) <= 0.10
    assert p.ideal_ms <= p.makespan_ms
    # losing one member of the busiest set costs nothing to move
    gone = p.replica_sets[0][0]
    q = replan(p, [d for d in fleet if d.name != gone])
    assert q.moved_bytes == 0
    q.validate()
    # losing the whole set moves its units, twice (to both members of each receiving set)
    lost = set(p.replica_sets[0])
    w = replan(p, [d for d in fleet if d.name not in lost])
    check_sets(w, 2)
    assert w.moved_bytes == 2 * share_weight_bytes(m, p.set_share(0).layers)


def test_colocated_members_and_device_from_profile():
    fleet = [device_from_profile(f"lap-{i}", "laptop") for i in range(4)]
    from tpfed.planning.costs import CoordinatorSpec

    coord = CoordinatorSpec(colocated=frozenset({"lap-0", "lap-1"}), peer_dispatch_s=1e-4, cores=4.0,
                            peer_frame_s=2e-5)
    p = plan(STORIES260K, fleet, strategy="capability", replicas=2, coordinator=coord)
    check_sets(p, 2)
    r = simulate(p, fleet, coordinator=coord, tokens=2)
    assert r.tokens_per_s > 0
