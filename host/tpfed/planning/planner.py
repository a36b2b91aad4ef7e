"""Split a model over a fleet: round-robin, by capability, and re-planning after a join or leave.

Cost model (shared with :mod:`tpfed.planning.simulator` through :mod:`tpfed.planning.costs`): every layer has two
stages separated by the coordinator's sum, attention then MLP. A device taking part in a stage
pays one round trip on its own link (activation out, partial back: two one-way latencies plus
the bytes over its bandwidth) plus its compute at its (derated) MAC/s. The stage lasts as long as
its slowest participant; the predicted time per token (``makespan``) is the sum over layers of
both stages. Attention MACs are taken at the mean context of a full sequence.

Capability planning, per stage:

- attention: KV groups are indivisible and identical, so handing them out one "slot" at a time
  (one group in every layer) to the device that would finish it soonest is optimal for identical
  jobs on machines of different speed; a device short of memory takes a slot for only some
  layers and the next device takes the rest;
- MLP: 32-column blocks; the smallest stage time T such that the devices, each taking the blocks
  it can finish by T (and no more than its remaining memory allows), cover every block of every
  layer, found by bisection over T;
- a device's units are spread over layers cyclically, so each layer gets exactly its units and a
  device holds floor or ceil of its average in each layer; when memory allows fewer units than
  layers, the device holds only some layers (heterogeneous layer assignment).

Devices that cannot hold a single unit, or that would not finish even one block within the
stage time the others achieve, are left out and named in ``Plan.excluded``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.planning import costs
from tpfed.planning.fleet import DeviceSpec
from tpfed.planning.plan import (
    DeviceShare,
    Plan,
    block_bytes_array,
    diff_owners,
    owner_matrices,
    shares_from_owners,
)

STRATEGIES = ("round-robin", "capability")
MiB = float(1 << 20)


@dataclass
class FleetArrays:
    """The per-device numbers the planner needs, as arrays."""

    names: list[str]
    speed: np.ndarray  # effective MAC/s
    link: np.ndarray  # seconds per stage (round trip + stage bytes over bandwidth)
    cap: np.ndarray  # memory limit in bytes (after the margin)

    @classmethod
    def of(cls, devices: Sequence[DeviceSpec], uc: costs.UnitCosts, margin: float) -> FleetArrays:
        if not devices:
            raise PlanError("cannot plan for an empty fleet")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise PlanError(f"device name {dup!r} appears twice in the fleet")
        return cls(
            names=names,
            speed=np.array([d.effective_macs for d in devices], dtype=np.float64),
            link=np.array([d.stage_link_s(uc.stage_bytes) for d in devices], dtype=np.float64),
            cap=np.array([math.floor(d.memory_bytes * (1.0 - margin)) for d in devices], dtype=np.int64),
        )


@dataclass
class Evaluation:
    makespan_s: float
    busy_s: np.ndarray  # per device
    memory: np.ndarray  # per device, bytes
    attn_stage_s: np.ndarray  # per layer
    mlp_stage_s: np.ndarray  # per layer


class _Ctx:
    """Everything derived from (model, seq_len, fleet) that the strategies share."""

    def __init__(self, model: ModelConfig, devices: Sequence[DeviceSpec], seq_len: int, margin: float):
        if not 0.0 <= margin < 1.0:
            raise PlanError(f"memory margin must be in [0, 1), got {margin}")
        if seq_len <= 0:
            raise PlanError(f"sequence length must be positive, got {seq_len}")
        self.model, self.seq_len, self.margin = model, seq_len, margin
        self.uc = costs.UnitCosts.of(model, seq_len)
        self.fa = FleetArrays.of(devices, self.uc, margin)
        self.L, self.G, self.B = model.n_layers, model.n_groups, self.uc.n_blocks
        self.N = len(devices)
        self.widths = np.array(costs.block_widths(model), dtype=np.float64)
        self.bbytes = block_bytes_array(model)
        self.wa = self.uc.attn_macs  # MACs of one group
        self.wb = costs.QK * self.uc.col_macs  # MACs of one full block
        # per (layer, block) entry of an owner matrix, flattened: its columns and its bytes
        self._wcols = np.tile(self.widths, self.L)
        self._wbytes = np.tile(self.bbytes.astype(np.float64), self.L)

    def evaluate(self, gown: np.ndarray, bown: np.ndarray) -> Evaluation:
        L, N = self.L, self.N
        speed, link = self.fa.speed, self.fa.link
        rows = np.arange(L)[:, None] * N
        gkey = (gown + rows).ravel()
        if gown.size and gown.min() < 0:
            gkey = gkey[gown.ravel() >= 0]
        cnt = np.bincount(gkey, minlength=L * N).reshape(L, N).astype(np.float64)
        ta = cnt * (self.wa / speed) + (cnt > 0) * link
        bflat = bown.ravel()
        bkey = (bown + rows).ravel()
        wcols, wbytes = self._wcols, self._wbytes
        if bflat.size and bflat.min() < 0:
            ok = bflat >= 0
            bkey, bflat, wcols, wbytes = bkey[ok], bflat[ok], wcols[ok], wbytes[ok]
        cols = np.bincount(bkey, weights=wcols, minlength=L * N).reshape(L, N)
        tm = cols * (self.uc.col_macs / speed) + (cols > 0) * link
        mem = cnt.sum(axis=0).astype(np.int64) * self.uc.attn_bytes
        mem += np.bincount(bflat, weights=wbytes, minlength=N).astype(np.int64)
        sa, sm = ta.max(axis=1), tm.max(axis=1)
        return Evaluation(float(sa.sum() + sm.sum()), ta.sum(axis=0) + tm.sum(axis=0), mem, sa, sm)

    def round_robin_makespan_s(self) -> float:
        """Makespan of the round-robin split: every layer is split alike, so one layer's two
        stages times the number of layers."""
        N, G, B = self.N, self.G, self.B
        speed, link = self.fa.speed, self.fa.link
        cnt = np.bincount(np.arange(G) % N, minlength=N).astype(np.float64)
        bounds = (np.arange(N + 1, dtype=np.int64) * B) // N
        row = np.repeat(np.arange(N, dtype=np.int64), np.diff(bounds))
        cols = np.bincount(row, weights=self.widths, minlength=N)
        ta = cnt * (self.wa / speed) + (cnt > 0) * link
        tm = cols * (self.uc.col_macs / speed) + (cols > 0) * link
        return float(self.L * (ta.max() + tm.max()))

    def ideal_s(self) -> float:
        """Per-token lower bound of the cost model: each stage's work spread fluidly over all
        devices (no memory limit, no indivisible units), a device paying its link time only if
        it takes part. Memory is left out because a relaxation that keeps it but makes every
        layer alike is not a bound: the optimum may give a device only some layers."""
        attn = fluid_time(self.G * self.wa, self.fa.link, self.fa.speed)
        mlp = fluid_time(self.model.hidden_dim * self.uc.col_macs, self.fa.link, self.fa.speed)
        return self.L * (attn + mlp)

    def ideal_compute_s(self) -> float:
        return self.L * (self.G * self.wa + self.model.hidden_dim * self.uc.col_macs) / float(self.fa.speed.sum())

    def round_robin_owners(self) -> tuple[np.ndarray, np.ndarray]:
        L, G, B, N = self.L, self.G, self.B, self.N
        gown = np.tile(np.arange(G, dtype=np.int64) % N, (L, 1))
        bounds = (np.arange(N + 1, dtype=np.int64) * B) // N
        row = np.repeat(np.arange(N, dtype=np.int64), np.diff(bounds))
        return gown, np.tile(row, (L, 1))

    def min_unit_bytes(self) -> int:
        return int(min(self.uc.attn_bytes, self.bbytes.min()))


def fluid_time(work: float, link: np.ndarray, speed: np.ndarray) -> float:
    """Smallest T with sum over devices of max(0, T - link) * speed >= work: the work spread
    over the devices with no granularity and no memory limit, each one used paying its link."""
    order = np.argsort(link, kind="stable")
    lk, sp = link[order], speed[order]
    t = (work + np.cumsum(lk * sp)) / np.cumsum(sp)
    nxt = np.append(lk[1:], np.inf)
    k = int(np.argmax((t >= lk - 1e-15) & (t <= nxt + 1e-15)))
    return float(t[k])


def _bisect_min(feasible, lo: np.ndarray, hi: np.ndarray, iters: int = 48) -> np.ndarray:
    """Elementwise smallest t in [lo, hi] with feasible(t) (feasible(hi) must hold; monotone)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = feasible(mid)
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return hi


def _cyclic_owners(counts: np.ndarray, order: Sequence[int], n_layers: int, per_layer: int) -> np.ndarray:
    """Owner matrix (L x per_layer) from per-device unit totals laid out cyclically over layers:
    unit i of the sequence goes to layer i mod L, slot i // L. Each layer gets exactly
    ``per_layer`` units and device d holds floor or ceil of counts[d] / L in each layer."""
    seq = np.repeat(np.asarray(order, dtype=np.int64), counts[np.asarray(order, dtype=np.int64)])
    if seq.size != n_layers * per_layer:
        raise AssertionError(f"internal: {seq.size} units for {n_layers} x {per_layer}")
    return seq.reshape(per_layer, n_layers).T.copy()


def _attention_slots(ctx: _Ctx, cap_units: np.ndarray) -> list[tuple[int, int]]:
    """Greedy slots: repeatedly give the next group (one per layer) to the device that would
    finish it soonest. Returns the sequence of (device, units) stretches."""
    L, G = ctx.L, ctx.G
    speed, link = ctx.fa.speed, ctx.fa.link
    per = ctx.wa / speed
    heap = [(link[d] + per[d], d) for d in np.flatnonzero(cap_units >= 1).tolist()]
    heapq.heapify(heap)
    taken = np.zeros(ctx.N, dtype=np.int64)
    slots = np.zeros(ctx.N, dtype=np.int64)
    need = L * G
    seq: list[tuple[int, int]] = []
    while need > 0:
        if not heap:
            raise PlanError(
                f"not enough memory for attention: {need} of {L * G} KV-group units "
                f"({ctx.uc.attn_bytes} bytes each with the KV cache) have no device with room"
            )
        _, d = heapq.heappop(heap)
        u = int(min(L, cap_units[d] - taken[d], need))
        taken[d] += u
        slots[d] += 1
        need -= u
        seq.append((d, u))
        if cap_units[d] - taken[d] >= 1 and slots[d] < G:
            heapq.heappush(heap, (link[d] + (slots[d] + 1) * per[d], d))
    return seq


def _mlp_counts(ctx: _Ctx, cap_blocks: np.ndarray) -> np.ndarray:
    """Blocks per device over all layers for the smallest MLP stage time the memory allows."""
    L, B = ctx.L, ctx.B
    speed, link = ctx.fa.speed, ctx.fa.link
    total = L * B
    cap_blocks = np.minimum(cap_blocks, total)
    if int(cap_blocks.sum()) < total:
        raise PlanError(_memory_message(ctx))
    per = ctx.wb / speed

    def counts(t: float) -> np.ndarray:
        per_layer = np.clip(np.floor((t - link) / per + 1e-9), 0, B).astype(np.int64)
        return np.minimum(per_layer * L, cap_blocks)

    use = cap_blocks > 0
    hi = float(np.max(link[use] + np.ceil(cap_blocks[use] / L) * per[use]))
    lo = float(np.min(link[use] + per[use])) * (1 - 1e-9)
    for _ in range(100):
        if hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if counts(mid).sum() >= total:
            hi = mid
        else:
            lo = mid
    m = counts(hi)
    excess = int(m.sum()) - total
    if excess > 0:
        finish = link + np.ceil(m / L) * per
        for d in np.argsort(-finish, kind="stable").tolist():
            r = min(excess, int(m[d]))
            m[d] -= r
            excess -= r
            if excess == 0:
                break
    return m


def _memory_message(ctx: _Ctx) -> str:
    m, uc = ctx.model, ctx.uc
    need = m.n_layers * (m.n_groups * uc.attn_bytes) + int(ctx.bbytes.sum()) * m.n_layers
    have = int(ctx.fa.cap.sum())
    return (f"not enough memory: {m.name or 'the model'} needs {need / MiB:.1f} MiB (weights + KV cache "
            f"for seq_len {ctx.seq_len}), the fleet offers {have / MiB:.1f} MiB after the "
            f"{ctx.margin:.0%} margin")


def _capability_owners(ctx: _Ctx, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention first, MLP in the memory left; when memory binds somewhere, also the MLP
    first (with and without room kept for attention) and keep the fastest split. Attention
    units (weights + KV cache) take more memory per MAC than MLP blocks, so where fast memory
    is short it can pay to give it to the MLP and leave attention to slower devices."""
    cap = np.where(usable, ctx.fa.cap, 0)
    total_need = ctx.L * ctx.G * ctx.uc.attn_bytes + int(ctx.bbytes.sum()) * ctx.L
    if int(cap.sum()) < total_need:
        raise PlanError(_memory_message(ctx))
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    error: PlanError | None = None
    for order in ("attention first", "mlp first", "mlp first, attention reserved"):
        try:
            gown, bown, binding = _split(ctx, cap, order)
        except PlanError as exc:
            error = exc
            continue
        span = ctx.evaluate(gown, bown).makespan_s
        if best is None or span < best[0]:
            best = (span, gown, bown)
        if order == "attention first" and not binding:
            break
    if best is None:
        assert error is not None
        raise error
    return best[1], best[2]


def _split(ctx: _Ctx, cap: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray, bool]:
    L, G = ctx.L, ctx.G
    ab, bb = ctx.uc.attn_bytes, int(ctx.bbytes.max())
    if order == "attention first":
        a = _attention(ctx, cap // ab)
        m = _mlp_counts(ctx, (cap - a.units * ab) // bb)
    elif order == "mlp first":
        m = _mlp_counts(ctx, cap // bb)
        a = _attention(ctx, (cap - m * bb) // ab)
    else:
        # leave each device room for its share of the attention in proportion to speed
        reserve = np.ceil(L * G * ab * ctx.fa.speed / ctx.fa.speed.sum()).astype(np.int64)
        m = _mlp_counts(ctx, np.maximum(cap - reserve, 0) // bb)
        a = _attention(ctx, (cap - m * bb) // ab)
    used = a.units * ab + m * bb
    binding = bool((cap - used < max(ab, bb)).any())
    finish = np.where(m > 0, ctx.fa.link + np.ceil(m / L) * (ctx.wb / ctx.fa.speed), 0.0)
    # the last block of a layer may be narrower: lay out the latest finisher last so it gets it
    bown = _cyclic_owners(m, np.argsort(finish, kind="stable").tolist(), L, ctx.B)
    return a.gown, bown, binding


@dataclass
class _Attn:
    units: np.ndarray
    gown: np.ndarray


def _attention(ctx: _Ctx, cap_units: np.ndarray) -> _Attn:
    seq = _attention_slots(ctx, cap_units)
    a = np.zeros(ctx.N, dtype=np.int64)
    for d, u in seq:
        a[d] += u
    flat = np.repeat(np.array([d for d, _ in seq], dtype=np.int64), [u for _, u in seq])
    return _Attn(a, flat.reshape(ctx.G, ctx.L).T.copy())


def _exclusion_reasons(ctx: _Ctx, ev: Evaluation, used: np.ndarray, small: np.ndarray) -> dict[int, str]:
    reasons: dict[int, str] = {}
    stage = float(ev.mlp_stage_s.max()) if ev.mlp_stage_s.size else 0.0
    for d in np.flatnonzero(~used).tolist():
        if small[d]:
            reasons[d] = (f"cannot hold one unit: needs {ctx.min_unit_bytes() / MiB:.3f} MiB, "
                          f"has {ctx.fa.cap[d] / MiB:.3f} MiB after the {ctx.margin:.0%} margin")
        else:
            one = ctx.fa.link[d] + ctx.wb / ctx.fa.speed[d]
            reasons[d] = (f"too slow or too far to help: one 32-column block would take {one * 1e3:.3f} ms "
                          f"(link {ctx.fa.link[d] * 1e3:.3f} ms) against a stage time of {stage * 1e3:.3f} ms")
    return reasons


def _build(ctx: _Ctx, strategy: str, gown: np.ndarray, bown: np.ndarray, reasons: dict[int, str],
           t0: float) -> Plan:
    ev = ctx.evaluate(gown, bown)
    rr = ctx.round_robin_makespan_s()
    shares = shares_from_owners(ctx.model, ctx.N, gown, bown)
    devices: list[DeviceShare] = []
    excluded: list[tuple[str, str]] = []
    for d, layers in enumerate(shares):
        name = ctx.fa.names[d]
        if layers:
            devices.append(DeviceShare(name, layers, int(ev.memory[d]), int(ctx.fa.cap[d]),
                                       float(ev.busy_s[d] * 1e3)))
        else:
            excluded.append((name, reasons.get(d, "given no unit")))
    return Plan(
        model=ctx.model,
        strategy=strategy,
        devices=devices,
        excluded=excluded,
        seq_len=ctx.seq_len,
        makespan_ms=ev.makespan_s * 1e3,
        ideal_ms=ctx.ideal_s() * 1e3,
        round_robin_makespan_ms=rr * 1e3,
        plan_ms=(time.perf_counter() - t0) * 1e3,
        margin=ctx.margin,
        ideal_compute_ms=ctx.ideal_compute_s() * 1e3,
    )


def plan(model: ModelConfig, devices: Sequence[DeviceSpec], strategy: str = "round-robin",
         seq_len: int | None = None, margin: float = 0.1) -> Plan:
    """Split ``model`` over ``devices`` (see the module docstring). Raises :class:`PlanError`
    when no split fits (round-robin: naming the device that cannot hold its share)."""
    t0 = time.perf_counter()
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    ctx = _Ctx(model, devices, seq_len or model.seq_len, margin)
    if strategy == "round-robin":
        gown, bown = ctx.round_robin_owners()
        ev = ctx.evaluate(gown, bown)
        over = np.flatnonzero(ev.memory > ctx.fa.cap)
        if over.size:
            d = int(over[0])
            raise PlanError(
                f"round-robin: device {ctx.fa.names[d]!r} cannot hold its share: needs "
                f"{ev.memory[d]} bytes ({ev.memory[d] / MiB:.2f} MiB), has {ctx.fa.cap[d]} bytes "
                f"({ctx.fa.cap[d] / MiB:.2f} MiB) after the {margin:.0%} margin"
            )
        reasons = {d: "round-robin gives it no unit (more devices than KV groups and MLP blocks)"
                   for d in range(ctx.N)}
        return _build(ctx, strategy, gown, bown, reasons, t0)
    small = ctx.fa.cap < ctx.min_unit_bytes()
    if small.all():
        raise PlanError(f"no device can hold a single unit ({ctx.min_unit_bytes()} bytes)")
    gown, bown = _capability_owners(ctx, ~small)
    ev = ctx.evaluate(gown, bown)
    used = (ev.memory > 0)
    return _build(ctx, strategy, gown, bown, _exclusion_reasons(ctx, ev, used, small), t0)


# --------------------------------------------------------------------------------- re-planning
def replan(old: Plan, devices: Sequence[DeviceSpec], margin: float | None = None) -> Plan:
    """Re-plan after devices joined or left, keeping every unit whose owner is still there.

    Units of devices that left (or that no longer fit a device's memory) go, layer by layer, to
    the device that would finish them soonest; a device new to the plan then takes units from
    the slowest holder of each layer stage for as long as that shortens the stage. Only those
    units move; ``moved_bytes`` and ``moves`` of the result say which and how much.
    """
    t0 = time.perf_counter()
    ctx = _Ctx(old.model, devices, old.seq_len, old.margin if margin is None else margin)
    L, N = ctx.L, ctx.N
    gone = sorted({d.name for d in old.devices} - set(ctx.fa.names))
    all_names = ctx.fa.names + gone
    g0, b0 = owner_matrices(old, all_names)
    gown = np.where(g0 >= N, -1, g0)
    bown = np.where(b0 >= N, -1, b0)
    small = ctx.fa.cap < ctx.min_unit_bytes()
    cap = np.where(small, 0, ctx.fa.cap)
    total_need = L * ctx.G * ctx.uc.attn_bytes + int(ctx.bbytes.sum()) * L
    if int(cap.sum()) < total_need:
        raise PlanError(_memory_message(ctx))
    ev = ctx.evaluate(gown, bown)
    over = np.flatnonzero(ev.memory > cap)
    for d in over.tolist():
        _shed(ctx, gown, bown, d, int(ev.memory[d] - cap[d]))
    if over.size:
        ev = ctx.evaluate(gown, bown)
    mem_left = cap - ev.memory
    _place_orphan_groups(ctx, gown, mem_left)
    _place_orphan_blocks(ctx, gown, bown, mem_left)
    old_names = {d.name for d in old.devices}
    newcomers = [d for d in range(N) if ctx.fa.names[d] not in old_names and not small[d]]
    if newcomers:
        _pull_to_newcomers(ctx, gown, bown, mem_left, newcomers)
    used = np.zeros(N, dtype=bool)
    used[gown[gown >= 0]] = True
    used[bown[bown >= 0]] = True
    result = _build(ctx, old.strategy, gown, bown, {}, t0)
    if result.excluded:
        ev = ctx.evaluate(gown, bown)
        reasons = _exclusion_reasons(ctx, ev, used, small)
        result.excluded = [(n, reasons[ctx.fa.names.index(n)]) for n, _ in result.excluded]
    result.moves = diff_owners(ctx.model, all_names, g0, b0, gown, bown)
    result.moved_bytes = sum(mv.bytes for mv in result.moves)
    result.plan_ms = (time.perf_counter() - t0) * 1e3
    return result


def _shed(ctx: _Ctx, gown: np.ndarray, bown: np.ndarray, d: int, excess: int) -> None:
    """Drop units of device d (MLP blocks of the last layers first, then groups) until it fits."""
    for li in range(ctx.L - 1, -1, -1):
        for b in np.flatnonzero(bown[li] == d)[::-1].tolist():
            if excess <= 0:
                return
            bown[li, b] = -1
            excess -= int(ctx.bbytes[b])
    for li in range(ctx.L - 1, -1, -1):
        for g in np.flatnonzero(gown[li] == d).tolist():
            if excess <= 0:
                return
            gown[li, g] = -1
            excess -= ctx.uc.attn_bytes


def _layer_loads(ctx: _Ctx, own: np.ndarray, li: int, weights: np.ndarray | None) -> np.ndarray:
    row = own[li]
    ok = row >= 0
    w = None if weights is None else weights[ok]
    return np.bincount(row[ok], weights=w, minlength=ctx.N).astype(np.float64)


def _place_orphan_groups(ctx: _Ctx, gown: np.ndarray, mem_left: np.ndarray) -> None:
    speed, link = ctx.fa.speed, ctx.fa.link
    ab = ctx.uc.attn_bytes
    for li in np.flatnonzero((gown < 0).any(axis=1)).tolist():
        cnt = _layer_loads(ctx, gown, li, None)
        for g in np.flatnonzero(gown[li] < 0).tolist():
            finish = np.where(mem_left >= ab, link + (cnt + 1) * ctx.wa / speed, np.inf)
            d = int(np.argmin(finish))
            if not np.isfinite(finish[d]):
                raise PlanError(f"re-plan: no device has room for layer {li} group {g} ({ab} bytes)")
            gown[li, g] = d
            cnt[d] += 1
            mem_left[d] -= ab


def _place_orphan_blocks(ctx: _Ctx, gown: np.ndarray, bown: np.ndarray, mem_left: np.ndarray) -> None:
    """Water-fill every layer's orphan blocks at once: per layer the smallest stage time T at
    which the devices, on top of what they hold, can take them; each device's free memory is
    spread evenly over the layers that need it. Falls back to block-by-block placement when
    that spread leaves a layer short."""
    orphan = bown < 0
    layers = np.flatnonzero(orphan.any(axis=1))
    if not layers.size:
        return
    N, J = ctx.N, layers.size
    k = orphan[layers].sum(axis=1)
    sub = bown[layers]
    ok = sub >= 0
    bidx = np.broadcast_to(np.arange(ctx.B), sub.shape)[ok]
    cols = np.bincount((sub + np.arange(J)[:, None] * N)[ok], weights=ctx.widths[bidx],
                       minlength=J * N).reshape(J, N)
    mb = np.maximum(mem_left, 0) // int(ctx.bbytes.max())
    j = np.arange(J + 1)[:, None]
    quota = ((mb * j[1:]) // J - (mb * j[:-1]) // J).astype(np.float64)
    if (quota.sum(axis=1) < k).any():
        _place_orphan_blocks_seq(ctx, gown, bown, mem_left)
        return
    use = np.flatnonzero(quota.any(axis=0))  # devices with room somewhere
    quota, cols = quota[:, use], cols[:, use]
    per = (costs.QK * ctx.uc.col_macs) / ctx.fa.speed[use]
    base = ctx.fa.link[use] + cols * (ctx.uc.col_macs / ctx.fa.speed[use])

    def fit(t: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((t[:, None] - base) / per + 1e-9), 0, quota)

    # geometric bisection: the bounds may be orders of magnitude apart (a slow device's whole
    # quota against a fast device's one block)
    hi = np.where(quota > 0, base + quota * per, 0).max(axis=1)
    lo = np.where(quota > 0, base + per, np.inf).min(axis=1) * (1 - 1e-9)
    for _ in range(48):
        mid = np.sqrt(lo * hi)
        ok = fit(mid).sum(axis=1) >= k
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    c = fit(hi)
    finish = np.where(c > 0, base + c * per, -np.inf)
    order = np.argsort(-finish, axis=1, kind="stable")
    cs = np.take_along_axis(c, order, axis=1)
    excess = (c.sum(axis=1) - k)[:, None]
    take = np.clip(excess - (np.cumsum(cs, axis=1) - cs), 0, cs)
    np.put_along_axis(c, order, cs - take, axis=1)
    # orphan blocks in layer order get their owners in the same order
    owners = np.repeat(np.tile(use, J), c.astype(np.int64).reshape(-1))
    pos = np.flatnonzero(orphan[layers])
    rows = layers[pos // ctx.B]
    blocks = pos % ctx.B
    bown[rows, blocks] = owners
    mem_left -= np.bincount(owners, weights=ctx.bbytes[blocks], minlength=N).astype(np.int64)


def _place_orphan_blocks_seq(ctx: _Ctx, gown: np.ndarray, bown: np.ndarray, mem_left: np.ndarray) -> None:
    speed, link = ctx.fa.speed, ctx.fa.link
    per_col = ctx.uc.col_macs / speed
    bb = ctx.bbytes
    for li in np.flatnonzero((bown < 0).any(axis=1)).tolist():
        cols = _layer_loads(ctx, bown, li, ctx.widths)
        base = (link + (cols + costs.QK) * per_col).tolist()
        heap = [(base[d], d) for d in range(ctx.N) if mem_left[d] >= bb[0]]
        heapq.heapify(heap)
        cl = cols.tolist()
        for b in np.flatnonzero(bown[li] < 0).tolist():
            while True:
                if not heap:
                    raise PlanError(f"re-plan: no device has room for layer {li} columns {b * costs.QK}..")
                _, d = heapq.heappop(heap)
                if mem_left[d] >= bb[b]:
                    break
            bown[li, b] = d
            mem_left[d] -= bb[b]
            cl[d] += ctx.widths[b]
            if mem_left[d] >= bb[0]:
                heapq.heappush(heap, (link[d] + (cl[d] + costs.QK) * per_col[d], d))


def _pull_to_newcomers(ctx: _Ctx, gown: np.ndarray, bown: np.ndarray, mem_left: np.ndarray,
                       newcomers: list[int]) -> None:
    """Move units from the slowest holders of each layer stage to the newcomers while that
    shortens the stage: attention groups first, then MLP blocks, every layer at once (see
    :func:`_pull_stage`). A newcomer's free memory is spread evenly over the layers."""
    nc = np.zeros(ctx.N, dtype=bool)
    nc[newcomers] = True
    L, N = ctx.L, ctx.N
    rows = np.arange(L)[:, None] * N
    ab = ctx.uc.attn_bytes
    # attention: units are groups (identical)
    ok = gown >= 0
    cnt = np.bincount((gown + rows)[ok], minlength=L * N).reshape(L, N).astype(np.float64)
    quota = _spread(np.where(nc, np.maximum(mem_left, 0) // ab, 0), L)
    take = _pull_stage(cnt, ctx.wa / ctx.fa.speed, 1.0, ctx.fa.link, nc, quota)
    _apply_pull(gown, take, nc)
    mem_left -= (take.sum(axis=0) * ab).astype(np.int64)  # taken (> 0) and freed (< 0)
    # MLP: units are blocks of up to 32 columns; times are counted in columns, a donor sheds
    # whole blocks from its end (counted as full width, so no stage gets longer)
    bkey, wcols = (bown + rows).ravel(), ctx._wcols
    if bown.min() < 0:
        ok = bown.ravel() >= 0
        bkey, wcols = bkey[ok], wcols[ok]
    cols = np.bincount(bkey, weights=wcols, minlength=L * N).reshape(L, N)
    bb = int(ctx.bbytes.max())
    quota = _spread(np.where(nc, np.maximum(mem_left, 0) // bb, 0), L)
    take = _pull_stage(cols, ctx.uc.col_macs / ctx.fa.speed, float(costs.QK), ctx.fa.link, nc, quota)
    donors_before = bown.copy()
    moved = _apply_pull(bown, take, nc)
    moved_bytes = ctx.bbytes[np.nonzero(moved)[1]]
    mem_left -= np.bincount(bown[moved], weights=moved_bytes, minlength=N).astype(np.int64)
    mem_left += np.bincount(donors_before[moved], weights=moved_bytes, minlength=N).astype(np.int64)


def _spread(units: np.ndarray, n_layers: int) -> np.ndarray:
    """(L x N) per-layer quotas that sum to ``units`` per device, as even as possible."""
    j = np.arange(n_layers + 1)[:, None]
    return ((units * j[1:]) // n_layers - (units * j[:-1]) // n_layers).astype(np.float64)


def _pull_stage(load: np.ndarray, per: np.ndarray, unit: float, link: np.ndarray, nc: np.ndarray,
                quota: np.ndarray) -> np.ndarray:
    """Water-filling of one stage over all layers. ``load`` (L x N) is each device's work in
    load units (groups or columns), ``per`` the seconds per load unit, ``unit`` the load of one
    movable unit. Per layer, the smallest stage time T such that the holders that are not
    newcomers can shed whole units down to T and the newcomers (within ``quota`` units) can take
    them and still finish by T. Returns units taken (> 0, newcomers) or shed (< 0, donors) per
    layer and device; all zero in a layer that no move shortens."""
    held = load > 0
    t_now = np.where(held, link + load * per, 0.0)
    cur = t_now.max(axis=1)
    out = np.zeros(load.shape)
    # only layers where some newcomer could finish one more unit before the stage ends now,
    # and only the devices that hold something there or could take something
    helpful = nc & (quota >= 1) & (link + (load + unit) * per < cur[:, None] * (1 - 1e-9))
    rows = np.flatnonzero(helpful.any(axis=1))
    if not rows.size:
        return out
    cols = np.flatnonzero(held[rows].any(axis=0) | helpful[rows].any(axis=0))
    sub = np.ix_(rows, cols)
    out[sub] = _pull_rows(load[sub], per[cols], unit, link[cols], nc[cols], quota[sub],
                          t_now[sub], cur[rows])
    return out


def _pull_rows(load: np.ndarray, per: np.ndarray, unit: float, link: np.ndarray, nc: np.ndarray,
               quota: np.ndarray, t_now: np.ndarray, cur: np.ndarray) -> np.ndarray:
    held = load > 0
    donors = ~nc
    fixed_new = np.where(nc & held, t_now, 0.0).max(axis=1)  # newcomers do not shed
    shed_ok = donors & held

    def plan_at(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        limit = (t[:, None] - link) / per  # load a device can finish by t
        keep = np.maximum(np.floor((limit + 1e-9) / unit) * unit, 0)
        shed = np.where(shed_ok, np.ceil(np.maximum(load - keep, 0) / unit - 1e-9), 0.0)
        room = np.where(nc, np.clip(np.floor((limit - load) / unit + 1e-9), 0, quota), 0.0)
        return shed, room

    def feasible(t: np.ndarray) -> np.ndarray:
        shed, room = plan_at(t)
        return (shed.sum(axis=1) <= room.sum(axis=1)) & (fixed_new <= t)

    t = _bisect_min(feasible, fixed_new.copy(), cur.copy(), iters=36)
    better = t < cur * (1 - 1e-9)
    shed, room = plan_at(t)
    shed[~better] = 0.0
    # hand the shed units to newcomers in order, each up to its room
    total = shed.sum(axis=1, keepdims=True)
    before = np.cumsum(room, axis=1) - room
    take = np.clip(total - before, 0, room)
    return take - shed


def _apply_pull(own: np.ndarray, delta: np.ndarray, nc: np.ndarray) -> np.ndarray:
    """Reassign units in place: each donor gives its last ``-delta`` units of every layer, which
    go in layer order to the newcomers with ``delta > 0``. Returns the mask of moved units."""
    L, U = own.shape
    N = delta.shape[1]
    shed = np.maximum(-delta, 0).astype(np.int64)
    if not shed.any():
        return np.zeros(own.shape, dtype=bool)
    flat = own.reshape(-1)
    key = np.repeat(np.arange(L, dtype=np.int64) * N, U) + flat
    key[flat < 0] = -1
    # rank of each unit among its owner's units in the layer, counted from the end
    order = np.argsort(key, kind="stable")  # positions stay ascending within a key
    k_sorted = key[order]
    first = np.ones(k_sorted.size, dtype=bool)
    first[1:] = k_sorted[1:] != k_sorted[:-1]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, k_sorted.size))
    pos = np.arange(k_sorted.size) - np.repeat(starts, sizes)
    from_end = np.empty(flat.size, dtype=np.int64)
    from_end[order] = np.repeat(sizes, sizes) - 1 - pos
    moved = (key >= 0) & (from_end < shed.reshape(-1)[np.maximum(key, 0)])
    take = np.maximum(delta, 0).astype(np.int64)
    targets = np.repeat(np.tile(np.arange(N), L), take.reshape(-1))
    idx = np.flatnonzero(moved)  # in layer order, as the targets are
    if idx.size != targets.size:
        raise AssertionError(f"internal: {idx.size} units shed, {targets.size} taken")
    flat[idx] = targets
    return moved.reshape(own.shape)
