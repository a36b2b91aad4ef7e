"""Split a model over a fleet: round-robin, by capability, and re-planning after a join or leave.

Cost model (shared with :mod:`tpfed.planning.simulator` through :mod:`tpfed.planning.costs`): every
layer has two stages separated by the coordinator's sum, attention then MLP. In a stage the
coordinator normalises and quantises the residual, sends the activation to each participant in
device order on its own NIC (once, with a broadcast medium), each participant pays one round
trip on its own link plus its compute at its (derated) MAC/s, and the coordinator receives and
sums the partials one at a time in order of arrival. So every device taking part in a stage
costs the coordinator a send and a receive, and N partials of a stage queue on one NIC. The
predicted time per token (``makespan``) is the sum of all stages computed exactly as the
simulator does, plus the coordinator's per-token work (embedding, classifier, sampling).
Attention MACs are taken at the mean context of a full sequence.

Capability planning first cuts the usable devices into teams that each hold a run of whole
layers (:func:`_team_owners`), so that a stage has as few participants as its compute pays for;
within a team, per stage:

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

import dataclasses
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tpfed.compute.kernels import Q8_BLOCK
from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.planning import costs
from tpfed.planning.costs import CoordinatorSpec
from tpfed.planning.fleet import DeviceSpec
from tpfed.planning.plan import (
    DeviceShare,
    Plan,
    block_bytes_array,
    diff_owners,
    owner_matrices,
    replicated_moves,
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
    """Everything derived from (model, seq_len, fleet, coordinator) that the strategies share.

    ``fa.link`` is what the allocation heuristics charge a device per stage it takes part in:
    its wire time (two one-way latencies and the frames over its bandwidth) plus what the
    coordinator spends on it. By default that is the least a participant costs (norm and
    quantise, one send, one receive); ``pen`` replaces the coordinator part per device (a
    team's positional costs, see :func:`_team_pen`). :meth:`evaluate` does not use it: it
    computes every stage exactly as the simulator does."""

    def __init__(self, model: ModelConfig, devices: Sequence[DeviceSpec], seq_len: int, margin: float,
                 coordinator: CoordinatorSpec | None = None, pen: np.ndarray | None = None,
                 replicas: int = 1):
        if not 0.0 <= margin < 1.0:
            raise PlanError(f"memory margin must be in [0, 1), got {margin}")
        if seq_len <= 0:
            raise PlanError(f"sequence length must be positive, got {seq_len}")
        self.model, self.seq_len, self.margin = model, seq_len, margin
        self.devices = list(devices)
        self.coord = coordinator or CoordinatorSpec()
        self.replicas = replicas
        self.cc = costs.CoordinatorCosts.of(self.coord, model)
        if replicas > 1:
            # the devices are replica sets: each participant is K members, every one of which
            # the coordinator sends an activation to and receives a partial from
            cc = self.cc
            self.cc = dataclasses.replace(cc, send_s=cc.send_s * (1 if cc.broadcast else replicas),
                                          recv_s=cc.recv_s * replicas)
        self.uc = costs.UnitCosts.of(model, seq_len)
        self.fa = FleetArrays.of(devices, self.uc, margin)
        self.L, self.G, self.B = model.n_layers, model.n_groups, self.uc.n_blocks
        self.N = len(devices)
        self.wire = self.fa.link.copy()
        self.dispatch = np.array([self.coord.peer_dispatch_s if d.name in self.coord.colocated else 0.0
                                  for d in devices])
        cc = self.cc
        self.ovh = cc.pre_s + cc.send_s + cc.recv_s - cc.early_s  # the least a participant costs
        self.fa.link = self.wire + self.dispatch + (self.ovh if pen is None else pen)
        self.widths = np.array(costs.block_widths(model), dtype=np.float64)
        self.bbytes = block_bytes_array(model)
        self.wa = self.uc.attn_macs  # MACs of one group
        self.wb = Q8_BLOCK * self.uc.col_macs  # MACs of one full block
        # per (layer, block) entry of an owner matrix, flattened: its columns and its bytes
        self._wcols = np.tile(self.widths, self.L)
        self._wbytes = np.tile(self.bbytes.astype(np.float64), self.L)

    def stage_times(self, part: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Duration of every stage (one row each: participants ``part``, their compute seconds
        ``work``) as the simulator computes it: norm and quantise, the activation sent to the
        participants in device order, each one's wire time and compute, and its partial
        queueing for the coordinator's receive in order of arrival."""
        cc = self.cc
        k = part.sum(axis=1)
        send = part * cc.send_s if cc.broadcast else np.cumsum(part, axis=1) * cc.send_s
        back = np.where(part, (cc.pre_s - cc.early_s) + send + (self.wire + self.dispatch) + work, -np.inf)
        back.sort(axis=1)
        n = part.shape[1]
        q = (back + (n - np.arange(n)) * cc.recv_s).max(axis=1) if n else np.zeros(part.shape[0])
        return np.where(k > 0, np.maximum(q, cc.pre_s + k * cc.recv_s), 0.0)

    def stage_times_sets(self, part: np.ndarray, work: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """:meth:`stage_times` for devices in replica sets (members next to each other, set i
        starting at column ``starts[i]``): every participant is sent the activation and returns
        a partial that queues for the coordinator's receive, and the stage ends when the first
        partial of every participating set has been received (later duplicates cost nothing
        more; the simulator does the same)."""
        cc = self.cc
        n = part.shape[1]
        if not n:
            return np.zeros(part.shape[0])
        send = part * cc.send_s if cc.broadcast else np.cumsum(part, axis=1) * cc.send_s
        back = np.where(part, (cc.pre_s - cc.early_s) + send + (self.wire + self.dispatch) + work, np.inf)
        order = np.argsort(back, axis=1, kind="stable")
        a = np.maximum(np.take_along_axis(back, order, axis=1), cc.pre_s)
        k = np.arange(n)
        x = np.maximum.accumulate(a - k * cc.recv_s, axis=1) + (k + 1) * cc.recv_s
        fin = np.empty_like(x)
        np.put_along_axis(fin, order, x, axis=1)
        first = np.minimum.reduceat(fin, starts, axis=1)
        first[~np.isfinite(first)] = 0.0
        return first.max(axis=1)

    def evaluate_sets(self, gown: np.ndarray, bown: np.ndarray, set_of: np.ndarray,
                      starts: np.ndarray) -> Evaluation:
        """The exact cost of a replicated plan: ``gown``/``bown`` hold replica-set indices,
        this context's devices are the sets' members (``set_of[d]`` is device d's set, members
        of a set next to each other from column ``starts[set]``), each computing at its own
        MAC/s on its own link."""
        L, V = self.L, len(starts)
        rows = np.arange(L)[:, None] * V
        ok = gown >= 0
        cnt_v = np.bincount((gown + rows)[ok], minlength=L * V).reshape(L, V).astype(np.float64)
        okb = (bown >= 0).ravel()
        cols_v = np.bincount((bown + rows).ravel()[okb], weights=self._wcols[okb],
                             minlength=L * V).reshape(L, V)
        mem_v = cnt_v.sum(axis=0).astype(np.int64) * self.uc.attn_bytes
        mem_v += np.bincount(bown.ravel()[okb], weights=self._wbytes[okb], minlength=V).astype(np.int64)
        cnt, cols = cnt_v[:, set_of], cols_v[:, set_of]
        speed, wire = self.fa.speed, self.wire
        wa = cnt * (self.wa / speed)
        wm = cols * (self.uc.col_macs / speed)
        sa = self.stage_times_sets(cnt > 0, wa, starts)
        sm = self.stage_times_sets(cols > 0, wm, starts)
        busy = wa.sum(axis=0) + wm.sum(axis=0) + ((cnt > 0).sum(axis=0) + (cols > 0).sum(axis=0)) * wire
        return Evaluation(float(sa.sum() + sm.sum() + self.cc.token_s), busy, mem_v[set_of], sa, sm)

    def evaluate(self, gown: np.ndarray, bown: np.ndarray) -> Evaluation:
        L, N = self.L, self.N
        speed, wire = self.fa.speed, self.wire
        rows = np.arange(L)[:, None] * N
        gkey = (gown + rows).ravel()
        if gown.size and gown.min() < 0:
            gkey = gkey[gown.ravel() >= 0]
        cnt = np.bincount(gkey, minlength=L * N).reshape(L, N).astype(np.float64)
        wa = cnt * (self.wa / speed)
        bflat = bown.ravel()
        bkey = (bown + rows).ravel()
        wcols, wbytes = self._wcols, self._wbytes
        if bflat.size and bflat.min() < 0:
            ok = bflat >= 0
            bkey, bflat, wcols, wbytes = bkey[ok], bflat[ok], wcols[ok], wbytes[ok]
        cols = np.bincount(bkey, weights=wcols, minlength=L * N).reshape(L, N)
        wm = cols * (self.uc.col_macs / speed)
        mem = cnt.sum(axis=0).astype(np.int64) * self.uc.attn_bytes
        mem += np.bincount(bflat, weights=wbytes, minlength=N).astype(np.int64)
        sa, sm = self.stage_times(cnt > 0, wa), self.stage_times(cols > 0, wm)
        busy = wa.sum(axis=0) + wm.sum(axis=0) + ((cnt > 0).sum(axis=0) + (cols > 0).sum(axis=0)) * wire
        return Evaluation(float(sa.sum() + sm.sum() + self.cc.token_s), busy, mem, sa, sm)

    def round_robin_makespan_s(self) -> float:
        return self.evaluate(*self.round_robin_owners()).makespan_s

    def ideal_s(self) -> float:
        """Per-token lower bound of the cost model: each stage's work spread fluidly (no memory
        limit, no indivisible units), bounded two ways: over all devices, each one used paying
        its wire time and the least a participant costs the coordinator; and over any k
        devices, whose partials the coordinator receives one at a time, so the one received
        j-th from last had to arrive j receive times before the end (the fastest devices
        taking the latest slots). Memory is left out because a relaxation that keeps it but
        makes every layer alike is not a bound: the optimum may give a device only some layers."""
        return self.L * (self._fluid_stage(self.G * self.wa)
                         + self._fluid_stage(self.model.hidden_dim * self.uc.col_macs)) + self.cc.token_s

    def _fluid_stage(self, work: float) -> float:
        cc = self.cc
        per_device = fluid_time(work, self.wire + self.dispatch + self.ovh, self.fa.speed)
        s = np.sort(self.fa.speed)[::-1]
        c = float(np.min(self.wire + self.dispatch)) + cc.pre_s + cc.send_s - cc.early_s
        j = np.arange(1, s.size + 1)
        per_k = (work + c * np.cumsum(s) + cc.recv_s * np.cumsum(j * s)) / np.cumsum(s)
        return max(per_device, float(per_k.min()))

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


def _exclusion_reasons(ctx: _Ctx, ev: Evaluation, used: np.ndarray, small: np.ndarray,
                       bown: np.ndarray | None = None) -> dict[int, str]:
    """Why each unused device would not help, and what would make it help (see
    :func:`_why_not`)."""
    reasons: dict[int, str] = {}
    stages = ev.mlp_stage_s[ev.mlp_stage_s > 0]
    stage = float(stages.mean()) if stages.size else 0.0
    # the MAC/s of the devices that hold an MLP stage, on average over the layers
    if bown is not None and bown.size and (bown >= 0).any():
        held = np.zeros((ctx.L, ctx.N), dtype=bool)
        rows, cols = np.nonzero(bown >= 0)
        held[rows, bown[rows, cols]] = True
        holders = float((held * ctx.fa.speed).sum(axis=1).mean())
    else:
        holders = 0.0
    for d in np.flatnonzero(~used).tolist():
        reasons[d] = _why_not(ctx, d, bool(small[d]), stage, holders)
    return reasons


def _why_not(ctx: _Ctx, d: int, small: bool, stage: float, holders: float) -> str:
    """One of three reasons, each with what would change it:

    - memory: it cannot hold the smallest unit;
    - slow or far: one 32-column block (its wire time, the coordinator's frames for it and its
      compute) would take longer than the MLP stages take on average;
    - coordinator-bound: its MAC/s added to those of a stage's holders would save less compute
      than one more device costs the coordinator (an activation sent, a partial received)."""
    ms = 1e3
    if small:
        need = ctx.min_unit_bytes()
        return (f"cannot hold one unit: needs {need / MiB:.3f} MiB, has {ctx.fa.cap[d] / MiB:.3f} MiB "
                f"after the {ctx.margin:.0%} margin; would help with >= {need / (1 - ctx.margin) / MiB:.3f} MiB")
    speed, wire = float(ctx.fa.speed[d]), float(ctx.wire[d] + ctx.dispatch[d])
    ovh = ctx.ovh
    compute = ctx.wb / speed
    one = wire + ovh + compute
    if one >= stage:
        fixes = []
        if stage - ovh - compute > 0:
            fixes.append(f"a link under {(stage - ovh - compute) * ms:.3f} ms")
        if stage - ovh - wire > 0:
            fixes.append(f">= {ctx.wb / (stage - ovh - wire) / speed:.1f}x the MAC/s")
        fix = " or ".join(fixes) if fixes else "a shorter link and more MAC/s"
        return (f"too slow or too far to help: one 32-column block would take {one * ms:.3f} ms (link "
                f"{wire * ms:.3f}, coordinator {ovh * ms:.3f}, compute {compute * ms:.3f}), longer than the "
                f"{stage * ms:.3f} ms an MLP stage takes; would help with {fix}")
    W = ctx.model.hidden_dim * ctx.uc.col_macs
    cost = ctx.cc.send_s + ctx.cc.recv_s
    if holders <= 0:
        return "given no unit"
    saves = W / holders - W / (holders + speed)
    head = (f"its frames cost the coordinator more than its compute saves: adding its {speed / 1e9:.3g} GMAC/s "
            f"to the {holders / 1e9:.4g} GMAC/s holding a layer saves {saves * ms:.3f} ms of an MLP stage, "
            f"one more partial costs {cost * ms:.3f} ms")
    if W / holders > cost:
        need = W / (W / holders - cost) - holders
        return f"{head}; would help with >= {need / speed:.1f}x the MAC/s"
    return f"{head}; no device would: a stage's compute is shorter than one partial's cost"


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
         seq_len: int | None = None, margin: float = 0.1,
         coordinator: CoordinatorSpec | None = None, replicas: int = 1) -> Plan:
    """Split ``model`` over ``devices`` (see the module docstring) for ``coordinator`` (default:
    :class:`CoordinatorSpec`'s figures, a desktop on gigabit Ethernet). Raises
    :class:`PlanError` when no split fits (round-robin: naming the device that cannot hold its
    share).

    ``replicas=K`` places every unit on K devices with identical shares: the devices that can
    hold a unit are sorted by capability and cut into replica sets of K alike devices (the
    remainder is left out, and says why); each set is planned as one device with its weakest
    member's memory and MAC/s and its worst link, and every member gets the set's share. The
    predicted time counts K activations and K partials per set on the coordinator's link, and
    ends each stage when the first partial of every set is in (see :meth:`_Ctx.evaluate_sets`).
    When the sets cannot hold K copies, one :class:`PlanError` says how much is missing."""
    t0 = time.perf_counter()
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise PlanError(f"replicas must be a positive integer, got {replicas!r}")
    ctx = _Ctx(model, devices, seq_len or model.seq_len, margin, coordinator)
    if replicas > 1:
        return _plan_replicated(ctx, strategy, replicas, t0)
    gown, bown, reasons = _owners(ctx, strategy)
    return _build(ctx, strategy, gown, bown, reasons, t0)


def _owners(ctx: _Ctx, strategy: str, what: str = "device") -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Owner matrices of ``strategy`` over ``ctx``'s devices, and why each unused one is out."""
    if strategy == "round-robin":
        gown, bown = ctx.round_robin_owners()
        ev = ctx.evaluate(gown, bown)
        over = np.flatnonzero(ev.memory > ctx.fa.cap)
        if over.size:
            d = int(over[0])
            raise PlanError(
                f"round-robin: {what} {ctx.fa.names[d]!r} cannot hold its share: needs "
                f"{ev.memory[d]} bytes ({ev.memory[d] / MiB:.2f} MiB), has {ctx.fa.cap[d]} bytes "
                f"({ctx.fa.cap[d] / MiB:.2f} MiB) after the {ctx.margin:.0%} margin"
            )
        reasons = {d: "round-robin gives it no unit (more devices than KV groups and MLP blocks)"
                   for d in range(ctx.N)}
        return gown, bown, reasons
    small = ctx.fa.cap < ctx.min_unit_bytes()
    if small.all():
        raise PlanError(f"no device can hold a single unit ({ctx.min_unit_bytes()} bytes)")
    gown, bown = _team_owners(ctx, ~small)
    ev = ctx.evaluate(gown, bown)
    used = (ev.memory > 0)
    return gown, bown, _exclusion_reasons(ctx, ev, used, small, bown)


# --------------------------------------------------------------------------------- replicas
def _set_spec(devices: Sequence[DeviceSpec], name: str, best: bool = False) -> DeviceSpec:
    """A replica set as one device: its smallest memory, its slowest (derated) MAC/s, its
    longest latency and its narrowest bandwidth (``best``: its quickest member's figures, for
    lower bounds)."""
    first = devices[0]
    worst, most = (max, min) if best else (min, max)
    return DeviceSpec(
        name=name,
        memory_bytes=min(d.memory_bytes for d in devices),
        int8_macs=worst(d.effective_macs for d in devices),
        latency_s=most(d.latency_s for d in devices),
        bandwidth_Bps=worst(d.bandwidth_Bps for d in devices),
        device_class=first.device_class,
        transport=first.transport,
    )


def _sets_ideal_s(ctx: _Ctx, sets: list[list[int]]) -> float:
    """Lower bound of a replicated plan's time per token: each set as its quickest member,
    costing the coordinator one activation and one partial (the least a set can cost)."""
    specs = [_set_spec([ctx.devices[i] for i in s], f"set-{v}", best=True) for v, s in enumerate(sets)]
    coord = _set_coordinator(ctx.coord, [[ctx.devices[i] for i in s] for s in sets],
                             [sp.name for sp in specs])
    return _Ctx(ctx.model, specs, ctx.seq_len, ctx.margin, coord).ideal_s()


def _set_coordinator(coord: CoordinatorSpec, sets: Sequence[Sequence[DeviceSpec]],
                     names: Sequence[str]) -> CoordinatorSpec:
    """``coord`` with a set counted as on its host when one of its members is."""
    if not coord.colocated:
        return coord
    extra = {n for n, s in zip(names, sets, strict=True) if any(d.name in coord.colocated for d in s)}
    return dataclasses.replace(coord, colocated=coord.colocated | extra)


def _form_sets(ctx: _Ctx, k: int) -> tuple[list[list[int]], dict[int, str]]:
    """Replica sets of ``k`` alike devices (indices into ``ctx``'s devices): the devices that
    can hold a unit, sorted by MAC/s, then memory, then link, cut into runs of ``k``; each set
    lists its members in fleet order and the sets are ordered by their first member. Returns
    the sets and why each device in none of them is out."""
    small = ctx.fa.cap < ctx.min_unit_bytes()
    usable = np.flatnonzero(~small)
    if usable.size < k:
        raise PlanError(f"{k} replicas need at least {k} devices that can hold a unit "
                        f"({ctx.min_unit_bytes() / MiB:.3f} MiB after the {ctx.margin:.0%} margin); "
                        f"the fleet has {usable.size}")
    order = usable[np.lexsort((ctx.wire[usable], -ctx.fa.cap[usable], -ctx.fa.speed[usable]))]
    n_sets = usable.size // k
    sets = sorted((sorted(order[i * k:(i + 1) * k].tolist()) for i in range(n_sets)), key=lambda m: m[0])
    out: dict[int, str] = {}
    rest = order[n_sets * k:].tolist()
    for d in rest:
        out[d] = (f"in no replica set: the {usable.size} devices that can hold a unit make {n_sets} "
                  f"set{'s' if n_sets != 1 else ''} of {k} and the {len(rest)} least capable "
                  f"{'are' if len(rest) > 1 else 'is'} left over; would help with "
                  f"{k - len(rest)} more device{'s' if k - len(rest) > 1 else ''} like it")
    for d in np.flatnonzero(small).tolist():
        out[d] = _why_not(ctx, d, True, 0.0, 0.0)
    return sets, out


def _replica_memory_message(ctx: _Ctx, vctx: _Ctx, k: int) -> str:
    m = ctx.model
    need = m.n_layers * (m.n_groups * ctx.uc.attn_bytes + int(ctx.bbytes.sum()))
    have = int(vctx.fa.cap.sum())
    one = int(np.where(ctx.fa.cap >= ctx.min_unit_bytes(), ctx.fa.cap, 0).sum())
    msg = (f"not enough memory for {k} replicas: {m.name or 'the model'} needs {need / MiB:.1f} MiB per copy "
           f"(weights + KV cache for seq_len {ctx.seq_len}); its {vctx.N} replica set{'s' if vctx.N != 1 else ''} "
           f"of {k} hold "
           f"{have / MiB:.1f} MiB per copy (a set holds what its smallest member has after the "
           f"{ctx.margin:.0%} margin): {(need - have) / MiB:.1f} MiB per copy missing, at least "
           f"{k * (need - have) / MiB:.1f} MiB more device memory")
    if one >= need:
        msg += "; one copy fits (replicas 1)"
    return msg


def _plan_replicated(ctx: _Ctx, strategy: str, k: int, t0: float) -> Plan:
    sets, out = _form_sets(ctx, k)
    members = [[ctx.devices[i] for i in s] for s in sets]
    vnames = ["+".join(d.name for d in s) for s in members]
    vcoord = _set_coordinator(ctx.coord, members, vnames)
    vctx = _Ctx(ctx.model, [_set_spec(s, n) for s, n in zip(members, vnames, strict=True)],
                ctx.seq_len, ctx.margin, vcoord, replicas=k)
    need = ctx.L * (ctx.G * ctx.uc.attn_bytes + int(ctx.bbytes.sum()))
    if int(np.where(vctx.fa.cap >= vctx.min_unit_bytes(), vctx.fa.cap, 0).sum()) < need:
        raise PlanError(_replica_memory_message(ctx, vctx, k))
    gown, bown, reasons = _owners(vctx, strategy, what="replica set")
    result = _build_sets(ctx, vctx, sets, gown, bown, reasons, out, strategy, t0)
    result.replicas = k
    return result


def _build_sets(ctx: _Ctx, vctx: _Ctx, sets: list[list[int]], gown: np.ndarray, bown: np.ndarray,
                vreasons: dict[int, str], out: dict[int, str], strategy: str, t0: float) -> Plan:
    """The real plan of a plan over replica sets: ``gown``/``bown`` index ``sets`` (lists of
    device indices into ``ctx``), which ``vctx`` planned as one device each; every member gets
    its set's share; ``vreasons`` say why a set holds nothing, ``out`` why a device is in no
    set."""
    flat = [i for s in sets for i in s]
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    set_of = np.repeat(np.arange(len(sets)), sizes)
    rctx = _Ctx(ctx.model, [ctx.devices[i] for i in flat], ctx.seq_len, ctx.margin, ctx.coord)
    ev = rctx.evaluate_sets(gown, bown, set_of, starts)
    rr = rctx.evaluate_sets(*vctx.round_robin_owners(), set_of, starts).makespan_s
    shares = shares_from_owners(ctx.model, len(sets), gown, bown)
    devices: list[DeviceShare] = []
    replica_sets: list[list[str]] = []
    excluded: list[tuple[int, str, str]] = [(d, ctx.fa.names[d], why) for d, why in out.items()]
    for v, layers in enumerate(shares):
        names = [ctx.fa.names[i] for i in sets[v]]
        if not layers:
            why = vreasons.get(v, "given no unit")
            excluded.extend((i, ctx.fa.names[i], f"in replica set {vctx.fa.names[v]}: {why}" if len(names) > 1
                             else why) for i in sets[v])
            continue
        replica_sets.append(names)
        for r in range(int(starts[v]), int(starts[v] + sizes[v])):
            devices.append(DeviceShare(rctx.fa.names[r], dict(layers), int(ev.memory[r]), int(rctx.fa.cap[r]),
                                       float(ev.busy_s[r] * 1e3)))
    excluded.sort()
    return Plan(
        model=ctx.model,
        strategy=strategy,
        devices=devices,
        excluded=[(n, why) for _, n, why in excluded],
        seq_len=ctx.seq_len,
        makespan_ms=ev.makespan_s * 1e3,
        ideal_ms=_sets_ideal_s(ctx, sets) * 1e3,
        round_robin_makespan_ms=rr * 1e3,
        plan_ms=(time.perf_counter() - t0) * 1e3,
        margin=ctx.margin,
        ideal_compute_ms=vctx.ideal_compute_s() * 1e3,
        replica_sets=replica_sets,
    )


# --------------------------------------------------------------------------------- teams
def _team_pen(ctx: _Ctx, k: int) -> np.ndarray:
    """What the coordinator adds to the round trip of the p-th of ``k`` participants (in send
    order) when the partials come back in send order: norm and quantise, p sends (one with a
    broadcast), and k - p + 1 receives (its own and those queued after it)."""
    cc = ctx.cc
    p = np.arange(1, k + 1, dtype=np.float64)
    send = np.full(k, cc.send_s) if cc.broadcast else p * cc.send_s
    return cc.pre_s - cc.early_s + send + (k - p + 1) * cc.recv_s


def _team_layer_s(ctx: _Ctx, team: np.ndarray, pen: np.ndarray) -> float:
    """Estimated time of one layer (both stages) held by ``team`` alone (device indices in send
    order): the MLP spread fluidly, the KV groups handed out one at a time to whoever would
    finish soonest, each device paying its wire time and its positional coordinator costs."""
    base = ctx.wire[team] + ctx.dispatch[team] + pen
    speed = ctx.fa.speed[team]
    mlp = fluid_time(ctx.model.hidden_dim * ctx.uc.col_macs, base, speed)
    per = (ctx.wa / speed).tolist()
    start = base.tolist()
    heap = [(b + q, d) for d, (b, q) in enumerate(zip(start, per, strict=True))]
    heapq.heapify(heap)
    attn = 0.0
    for _ in range(ctx.G):
        f, d = heapq.heappop(heap)
        attn = max(attn, f)
        heapq.heappush(heap, (f + per[d], d))
    return mlp + attn


def _team_owners(ctx: _Ctx, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Capability split that knows each device in a stage costs the coordinator a partial.

    The usable devices, fastest first, are cut into teams of k; each team's time per layer is
    estimated (:func:`_team_layer_s`) with the costs of its positions in the coordinator's send
    and receive queues, and the layers go to the quickest teams first, as many as each team's
    memory holds (a fractional knapsack, in whole layers). The k with the least total wins,
    every k from 1 to all of them being tried; each chosen team then splits its run of layers
    among its members with the capability split (:func:`_capability_owners`), with its
    positional costs in place of the flat per-participant cost so that members earlier in the
    queues get less work. With k = all there is one team: the split of every layer over every
    device that pays."""
    cand = np.flatnonzero(usable)
    order = cand[np.argsort(-ctx.fa.speed[cand], kind="stable")]
    n = order.size
    layer_bytes = ctx.G * ctx.uc.attn_bytes + int(ctx.bbytes.sum())
    unit = max(ctx.uc.attn_bytes, int(ctx.bbytes.max()))
    ks = sorted({*range(1, min(n, 12) + 1), *(k for k in (16, 24, 32, 48, 64) if k < n), n})
    best: tuple[float, list[tuple[np.ndarray, int]]] | None = None
    pens: dict[int, np.ndarray] = {}
    seen: dict[tuple, float] = {}  # teams of alike devices have alike estimates
    base = ctx.wire + ctx.dispatch
    for k in ks:
        teams = [np.sort(order[i:i + k]) for i in range(0, n, k)]
        taus, caps = [], []
        for t in teams:
            key = (ctx.fa.speed[t].tobytes(), base[t].tobytes())
            tau = seen.get(key)
            if tau is None:
                pen = pens.setdefault(t.size, _team_pen(ctx, t.size))
                tau = seen[key] = _team_layer_s(ctx, t, pen)
            taus.append(tau)
            caps.append(max(0, int((int(ctx.fa.cap[t].sum()) - t.size * unit) // layer_bytes)))
        if k == n:
            caps[-1] = ctx.L  # one team: the memory check is the split's own
        left, total, alloc = ctx.L, 0.0, []
        for i in np.argsort(taus, kind="stable").tolist():
            take = min(caps[i], left)
            if take > 0:
                alloc.append((teams[i], take))
                total += take * taus[i]
                left -= take
            if left == 0:
                break
        if left == 0 and (best is None or total < best[0] * (1 - 1e-9)):
            best = (total, alloc)
    if best is not None and (len(best[1]) > 1 or best[1][0][0].size < n):
        try:
            return _assemble_teams(ctx, best[1])
        except PlanError:
            pass  # a team's memory did not split into whole units: one team for all
    return _capability_owners(ctx, usable)


def _assemble_teams(ctx: _Ctx, alloc: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Owner matrices from (team, layers) pairs: runs of layers in the order of each team's
    first device, every run split among its team by the capability split."""
    gown = np.full((ctx.L, ctx.G), -1, dtype=np.int64)
    bown = np.full((ctx.L, ctx.B), -1, dtype=np.int64)
    start = 0
    for team, layers in sorted(alloc, key=lambda a: int(a[0][0])):
        sub = _Ctx(dataclasses.replace(ctx.model, n_layers=layers), [ctx.devices[i] for i in team.tolist()],
                   ctx.seq_len, ctx.margin, ctx.coord, pen=_team_pen(ctx, team.size), replicas=ctx.replicas)
        g, b = _capability_owners(sub, np.ones(team.size, dtype=bool))
        gown[start:start + layers] = team[g]
        bown[start:start + layers] = team[b]
        start += layers
    return gown, bown


# --------------------------------------------------------------------------------- re-planning
def replan(old: Plan, devices: Sequence[DeviceSpec], margin: float | None = None,
           coordinator: CoordinatorSpec | None = None) -> Plan:
    """Re-plan after devices joined or left, keeping every unit whose owner is still there.

    Units of devices that left (or that no longer fit a device's memory) go, layer by layer, to
    the device that would finish them soonest; a device new to the plan then takes units from
    the slowest holder of each layer stage for as long as that shortens the stage. Only those
    units move; ``moved_bytes`` and ``moves`` of the result say which and how much.

    With replica sets (a plan made with ``replicas`` > 1): a set that still has a member keeps
    its units (a lost replica moves nothing); the units of a set with no member left go to the
    other sets as above, every member of a receiving set getting them; a device not in the old
    plan first fills a set short of members whose share it can hold (receiving the whole
    share), else it is a newcomer as above, as a set of its own. ``moves`` has one entry per
    receiving device.
    """
    t0 = time.perf_counter()
    if old.replicas > 1 or old.replicated:
        return _replan_sets(old, devices, margin, coordinator, t0)
    return _replan(old, devices, margin, coordinator, t0)


def _replan(old: Plan, devices: Sequence[DeviceSpec], margin: float | None,
            coordinator: CoordinatorSpec | None, t0: float, replicas: int = 1) -> Plan:
    ctx = _Ctx(old.model, devices, old.seq_len, old.margin if margin is None else margin, coordinator,
               replicas=replicas)
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
    best = None
    masks = _orphan_helpers(ctx, gown, bown, mem_left, small)
    for allowed in masks:
        try:
            room = np.where(allowed, mem_left, 0)
            g1, b1 = gown.copy(), bown.copy()
            _place_orphan_groups(ctx, g1, room)
            _place_orphan_blocks(ctx, g1, b1, room)
        except PlanError:
            continue
        span = ctx.evaluate(g1, b1).makespan_s if len(masks) > 1 else 0.0
        if best is None or span < best[0]:
            best = (span, g1, b1, np.where(allowed, room, mem_left))
    if best is None:
        _place_orphan_groups(ctx, gown, mem_left)
        _place_orphan_blocks(ctx, gown, bown, mem_left)
    else:
        gown[:], bown[:], mem_left = best[1], best[2], best[3]
    # a device the old plan left out stays out; only devices it never saw are newcomers
    old_names = {d.name for d in old.devices} | {n for n, _ in old.excluded}
    newcomers = [d for d in range(N) if ctx.fa.names[d] not in old_names and not small[d]]
    if newcomers:
        _pull_to_newcomers(ctx, gown, bown, mem_left, newcomers)
    used = np.zeros(N, dtype=bool)
    used[gown[gown >= 0]] = True
    used[bown[bown >= 0]] = True
    result = _build(ctx, old.strategy, gown, bown, {}, t0)
    if result.excluded:
        ev = ctx.evaluate(gown, bown)
        reasons = _exclusion_reasons(ctx, ev, used, small, bown)
        result.excluded = [(n, reasons[ctx.fa.names.index(n)]) for n, _ in result.excluded]
    result.moves = diff_owners(ctx.model, all_names, g0, b0, gown, bown)
    result.moved_bytes = sum(mv.bytes for mv in result.moves)
    result.plan_ms = (time.perf_counter() - t0) * 1e3
    return result


def _replan_sets(old: Plan, devices: Sequence[DeviceSpec], margin: float | None,
                 coordinator: CoordinatorSpec | None, t0: float) -> Plan:
    k = max(old.replicas, max((len(s) for s in old.replica_sets), default=1))
    ctx = _Ctx(old.model, devices, old.seq_len, old.margin if margin is None else margin, coordinator)
    index = {n: i for i, n in enumerate(ctx.fa.names)}
    in_old = {n for s in old.replica_sets for n in s}
    members = [[index[n] for n in s if n in index] for s in old.replica_sets]
    share_mem = [old.set_share(j).memory_bytes for j in range(len(old.replica_sets))]
    old_out = dict(old.excluded)
    small = ctx.fa.cap < ctx.min_unit_bytes()
    out: dict[int, str] = {}
    singles: list[int] = []
    idle: list[int] = []
    for i in range(ctx.N):
        name = ctx.fa.names[i]
        if name in in_old:
            continue
        if name in old_out:
            # the old plan left it out: it fills no set and is no newcomer (so a lost replica
            # moves nothing), but in sets of its own it may take units whose sets are all gone
            out[i] = old_out[name]
            if not small[i]:
                idle.append(i)
            continue
        short = [j for j, mem in enumerate(members)
                 if 0 < len(mem) < k and ctx.fa.cap[i] >= share_mem[j]]
        if short:
            sp = ctx.fa.speed[i]
            j = min(short, key=lambda j: (len(members[j]), abs(math.log(sp / ctx.fa.speed[members[j]].min()))))
            members[j].append(i)
        elif small[i]:
            out[i] = _why_not(ctx, i, True, 0.0, 0.0)
        else:
            singles.append(i)
    spare: list[list[int]] = []
    if len(idle) >= k:
        sub = _Ctx(ctx.model, [ctx.devices[i] for i in idle], ctx.seq_len, ctx.margin, ctx.coord)
        spare = [[idle[i] for i in s] for s in _form_sets(sub, k)[0]]
    alive = [j for j, mem in enumerate(members) if mem]
    if not alive and not singles and not spare:
        raise PlanError(f"re-plan: no device of the plan is left and no new one can take its place; "
                        f"{_memory_message(ctx)}")
    old_names = ["+".join(s) for s in old.replica_sets]
    sets = [members[j] for j in alive] + spare + [[i] for i in singles]
    spare_names = ["+".join(ctx.fa.names[i] for i in s) for s in spare]
    vnames = [old_names[j] for j in alive] + spare_names + [ctx.fa.names[i] for i in singles]
    specs = [[ctx.devices[i] for i in s] for s in sets]
    vspecs = [_set_spec(s, n) for s, n in zip(specs, vnames, strict=True)]
    vcoord = _set_coordinator(ctx.coord, specs, vnames)
    vold = dataclasses.replace(
        old, excluded=[(n, "") for n in spare_names], replica_sets=[], moves=[],
        devices=[DeviceShare(n, old.set_share(j).layers, 0, 0, 0.0) for j, n in enumerate(old_names)])
    vplan = _replan(vold, vspecs, ctx.margin, vcoord, t0, replicas=k)
    vctx = _Ctx(ctx.model, vspecs, ctx.seq_len, ctx.margin, vcoord, replicas=k)
    gown, bown = owner_matrices(vplan, vnames)
    vwhy = dict(vplan.excluded)
    spare_members = {i for s in spare for i in s}
    out = {i: why for i, why in out.items() if i not in spare_members}
    result = _build_sets(ctx, vctx, sets, gown, bown, {v: vwhy.get(n, "given no unit") for v, n in enumerate(vnames)},
                         out, old.strategy, t0)
    result.replicas = k
    result.moves = replicated_moves(old, result)
    result.moved_bytes = sum(mv.bytes for mv in result.moves)
    result.plan_ms = (time.perf_counter() - t0) * 1e3
    return result


def _orphan_helpers(ctx: _Ctx, gown: np.ndarray, bown: np.ndarray, mem_left: np.ndarray,
                    small: np.ndarray) -> list[np.ndarray]:
    """Which devices may take the units that lost their owner: one or two candidate masks,
    whichever the re-plan finds quicker. Every device added to a stage costs the coordinator
    a partial, so the devices already holding units come first; the fastest others are added,
    at least as many as memory needs, and as many as the orphans' compute pays for (j
    minimising the orphans' per-layer MACs over the holders' and j helpers' MAC/s plus j
    partials per stage), and one more (a partial that comes back while others still compute
    costs less than that)."""
    holders = np.zeros(ctx.N, dtype=bool)
    holders[gown[gown >= 0]] = True
    holders[bown[bown >= 0]] = True
    g_orphan = int((gown < 0).sum())
    b_orphan = np.nonzero(bown < 0)
    need = g_orphan * ctx.uc.attn_bytes + int(ctx.bbytes[b_orphan[1]].sum())
    everyone = np.ones(ctx.N, dtype=bool)
    if need == 0:
        return [holders]
    unit = max(ctx.uc.attn_bytes, int(ctx.bbytes.max()))
    room_in = float(np.clip(mem_left[holders] - unit, 0, None).sum())
    out = np.flatnonzero(~holders & ~small & (mem_left >= ctx.min_unit_bytes()))
    if not out.size:
        return [everyone]
    out = out[np.argsort(-ctx.fa.speed[out], kind="stable")]
    covers = np.concatenate([[room_in >= need], np.cumsum(np.clip(mem_left[out] - unit, 0, None)) + room_in >= need])
    if not covers.any():
        return [everyone]
    j_min = int(np.argmax(covers))
    layers = max(1, int(((gown < 0).any(axis=1) | (bown < 0).any(axis=1)).sum()))
    work = (g_orphan * ctx.wa + float(ctx.widths[b_orphan[1]].sum()) * ctx.uc.col_macs) / layers
    held = float(ctx.fa.speed[holders].sum()) / max(1.0, float(ctx.L) / layers) if holders.any() else 0.0
    j = np.arange(out.size + 1)
    t = work / (held + np.concatenate([[0.0], np.cumsum(ctx.fa.speed[out])]) + 1e-300) \
        + 2 * j * (ctx.cc.send_s + ctx.cc.recv_s)
    t[:j_min] = np.inf
    best = int(np.argmin(t))
    masks = []
    for jj in sorted({best, min(best + 1, out.size)}):
        m = holders.copy()
        m[out[:jj]] = True
        masks.append(m)
    return masks


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
    per = (Q8_BLOCK * ctx.uc.col_macs) / ctx.fa.speed[use]
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
        base = (link + (cols + Q8_BLOCK) * per_col).tolist()
        heap = [(base[d], d) for d in range(ctx.N) if mem_left[d] >= bb[0]]
        heapq.heapify(heap)
        cl = cols.tolist()
        for b in np.flatnonzero(bown[li] < 0).tolist():
            while True:
                if not heap:
                    raise PlanError(f"re-plan: no device has room for layer {li} columns {b * Q8_BLOCK}..")
                _, d = heapq.heappop(heap)
                if mem_left[d] >= bb[b]:
                    break
            bown[li, b] = d
            mem_left[d] -= bb[b]
            cl[d] += ctx.widths[b]
            if mem_left[d] >= bb[0]:
                heapq.heappush(heap, (link[d] + (cl[d] + Q8_BLOCK) * per_col[d], d))


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
    extra = ctx.cc.send_s + ctx.cc.recv_s  # one more partial in the stage
    take = _pull_stage(cnt, ctx.wa / ctx.fa.speed, 1.0, ctx.fa.link, nc, quota, extra)
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
    take = _pull_stage(cols, ctx.uc.col_macs / ctx.fa.speed, float(Q8_BLOCK), ctx.fa.link, nc, quota, extra)
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
                quota: np.ndarray, extra: float = 0.0) -> np.ndarray:
    """Water-filling of one stage over all layers. ``load`` (L x N) is each device's work in
    load units (groups or columns), ``per`` the seconds per load unit, ``unit`` the load of one
    movable unit. Per layer, the smallest stage time T such that the holders that are not
    newcomers can shed whole units down to T and the newcomers (within ``quota`` units) can take
    them and still finish by T. Returns units taken (> 0, newcomers) or shed (< 0, donors) per
    layer and device; all zero in a layer that no move shortens by more than ``extra`` (what
    the coordinator spends on one more participant)."""
    held = load > 0
    t_now = np.where(held, link + load * per, 0.0)
    cur = t_now.max(axis=1)
    out = np.zeros(load.shape)
    # only layers where some newcomer could finish one more unit before the stage ends now,
    # and only the devices that hold something there or could take something
    helpful = nc & (quota >= 1) & (link + (load + unit) * per < cur[:, None] * (1 - 1e-9) - extra)
    rows = np.flatnonzero(helpful.any(axis=1))
    if not rows.size:
        return out
    cols = np.flatnonzero(held[rows].any(axis=0) | helpful[rows].any(axis=0))
    sub = np.ix_(rows, cols)
    out[sub] = _pull_rows(load[sub], per[cols], unit, link[cols], nc[cols], quota[sub],
                          t_now[sub], cur[rows], extra)
    return out


def _pull_rows(load: np.ndarray, per: np.ndarray, unit: float, link: np.ndarray, nc: np.ndarray,
               quota: np.ndarray, t_now: np.ndarray, cur: np.ndarray, extra: float = 0.0) -> np.ndarray:
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
    better = t < cur * (1 - 1e-9) - extra
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
