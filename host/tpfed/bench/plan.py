"""Planner benchmark: Llama-2-70B over the 100-device ``lab-100`` fleet, planned and re-planned
after a leave and a join, timed in this run. ``tpfed bench plan --json`` prints :func:`bench_plan`."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from tpfed.model.config import ModelConfig

LLAMA2_70B = ModelConfig(
    dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, seq_len=4096,
    shared_classifier=False, name="llama-2-70b",
)
"""Llama-2-70B's geometry (its Hugging Face config.json)."""


def _fleet_path() -> Path:
    return Path(str(resources.files("tpfed.boards"))) / "fleets" / "lab-100.yaml"


def bench_plan(repeats: int = 5) -> dict:
    """Plan, re-plan after the busiest device leaves, and re-plan after a GPU desktop joins;
    best of ``repeats`` wall times in ms, with the makespan ratios of the last run."""
    from tpfed.planning.fleet import device_from_profile, load_fleet
    from tpfed.planning.planner import plan, replan

    devices = load_fleet(_fleet_path())
    best_plan = best_leave = best_join = float("inf")
    p = q = r = None
    for _ in range(repeats):
        t = time.perf_counter()
        p = plan(LLAMA2_70B, devices, strategy="capability")
        best_plan = min(best_plan, (time.perf_counter() - t) * 1e3)
        busiest = max(p.devices, key=lambda d: d.memory_bytes).name
        remaining = [d for d in devices if d.name != busiest]
        t = time.perf_counter()
        q = replan(p, remaining)
        best_leave = min(best_leave, (time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        r = replan(p, [*devices, device_from_profile("joined-gpu", "desktop-gpu")])
        best_join = min(best_join, (time.perf_counter() - t) * 1e3)
    assert p is not None and q is not None and r is not None
    return {
        "model": LLAMA2_70B.name,
        "fleet": "lab-100",
        "devices": len(devices),
        "devices_used": len(p.devices),
        "excluded": len(p.excluded),
        "plan_ms": best_plan,
        "makespan_ms": p.makespan_ms,
        "ideal_ms": p.ideal_ms,
        "makespan_over_ideal": p.makespan_ms / p.ideal_ms,
        "ideal_compute_ms": p.ideal_compute_ms,
        "round_robin_makespan_ms": p.round_robin_makespan_ms,
        "replan_leave_ms": best_leave,
        "replan_leave_left": busiest,
        "replan_leave_moved_bytes": q.moved_bytes,
        "replan_leave_makespan_over_ideal": q.makespan_ms / q.ideal_ms,
        "replan_join_ms": best_join,
        "replan_join_moved_bytes": r.moved_bytes,
        "replan_join_makespan_over_ideal": r.makespan_ms / r.ideal_ms,
        "targets": {"plan_ms": 50.0, "replan_leave_ms": 50.0, "makespan_over_ideal": 1.10},
        "repeats": repeats,
    }
