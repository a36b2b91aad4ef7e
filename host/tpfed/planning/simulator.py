"""Discrete-event simulation of generation with a plan: what tokens/s a fleet would reach, where
the time goes, and how busy every device is.

Per token, for every layer and each of its two stages (attention, MLP), in order:

1. the coordinator normalises and quantises the residual (``pre_ops`` elementwise operations at
   ``CoordinatorSpec.ops_per_s``);
2. it sends the activation frame to each participant in plan order, one after another on its
   own NIC (``per_frame_s`` of software cost plus the frame over ``bandwidth_Bps`` each);
3. each frame crosses the device's link (one-way latency + frame bytes over the link bandwidth),
   the device computes its units at its (derated) MAC/s, and its partial frame crosses back;
4. the coordinator takes the partials in order of arrival, one at a time (frame over its NIC +
   ``per_frame_s`` + summing ``dim`` floats), and the stage ends when the last one is summed.

Replicas (``Plan.replica_sets`` with more than one member): every member of a set holding part of
a stage is sent the activation and computes (so all their KV caches stay current), every partial
queues for the coordinator's receive in order of arrival, and the stage ends when the first
partial of every set has been received: a slow or late member is covered by a quicker one. A
duplicate arriving after the stage ended is not charged (the coordinator drops it unread at the
next gather).

After the last layer the coordinator runs the final norm, the classifier (vocab x dim MACs at
``CoordinatorSpec.int8_macs``) and sampling. Attention work grows with the position (the context
a token attends over). The same cost functions as the planner (:mod:`tpfed.planning.costs`) are used.

The single-queue recurrences (NIC send order, receive queue) are vectorised with numpy, so a
stage over 10^4 devices costs a few array operations.

Measured coordinators (:func:`tpfed.runtime.calibration.calibrate_coordinator`) replace the generic
throughput figures by the costs of the real code paths on their host: ``stage_s`` (norm,
quantise and encode of one stage), ``send_s`` and ``recv_s`` per frame (everything the host's
CPU does for it: system calls, event loop, reassembly, decode, sum), ``recv_after_s`` (the part
of ``recv_s`` after the link hands the frame over) and ``token_s``. A device's ``latency_s`` is
then read as the coordinator's probe measures it: from the activation leaving the
coordinator's send call to the reply's bytes being handed back by the link, halved; so a
partial's arrival already includes the receive machinery and only ``recv_after_s`` of its
``recv_s`` lies after it on the critical path (the queue runs at ``recv_s`` per frame).

CPU contention. Peers on the coordinator's own host (``CoordinatorSpec.colocated``: the
``--peers local:N`` processes) burn the same cores as the coordinator: per activation their
frame handling (``peer_frame_s``, measured) plus their compute, and their round trips take
``peer_dispatch_s`` longer than the probe saw (an activation is dispatched, a probe echoed). With ``CoordinatorSpec.cores``
set (the cores these processes actually get: the machine's, minus what other programs use), a
stage lasts at least the CPU work of all of them, coordinator included, divided by those
cores: ``stage = max(critical path, (stage_s + k * (send_s + recv_s) + sum of colocated
(peer_frame_s + compute)) / cores)``, and the per-token work of the coordinator (a single
thread) runs at ``min(cores, 1)`` of a core. On loopback with more processes than cores this
bound, not the links, sets the token rate; the difference is reported as "cpu contention" in
the breakdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tpfed.compute.kernels import Q8_BLOCK
from tpfed.errors import PlanError
from tpfed.planning import costs
from tpfed.planning.costs import CoordinatorSpec
from tpfed.planning.fleet import DeviceSpec
from tpfed.planning.plan import Plan
from tpfed.protocol.fastpath import min_stage_bytes


@dataclass
class SimResult:
    tokens: int
    total_s: float
    tokens_per_s: float
    token_ms: list[float]
    """Time of every simulated token."""
    utilisation: dict[str, float]
    """Compute time / wall time per device."""
    compute_s: dict[str, float]
    bytes_per_token: float
    min_bytes_per_token: float
    """Payload floor: dim int8 out and dim f32 back per participant per stage, no scales or headers."""
    breakdown_ms: dict[str, float]
    """Mean per-token time along the critical path of every stage, by cause (sums to the token time)."""
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)
    """The last token: (device, 'attn' | 'mlp', start_s, end_s) of every compute interval."""

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "total_s": self.total_s,
            "tokens_per_s": self.tokens_per_s,
            "token_ms_mean": float(np.mean(self.token_ms)),
            "bytes_per_token": self.bytes_per_token,
            "min_bytes_per_token": self.min_bytes_per_token,
            "breakdown_ms": self.breakdown_ms,
            "utilisation": self.utilisation,
        }


@dataclass
class _Stage:
    idx: np.ndarray  # participants (device indices into the simulated list), in plan order
    fixed: np.ndarray  # MACs that do not depend on the position
    per_ctx: np.ndarray  # MACs per attended position
    kind: str


def _stages(plan: Plan, n_layers: int) -> list[_Stage]:
    m = plan.model
    fixed_a = costs.attn_macs(m, 0.0)
    ctx_a = costs.attn_macs(m, 1.0) - fixed_a
    out: list[_Stage] = []
    for li in range(n_layers):
        ia, fa, ca, im, fm = [], [], [], [], []
        for i, d in enumerate(plan.devices):
            s = d.layers.get(li)
            if s is None:
                continue
            if s.kv_groups:
                ia.append(i)
                fa.append(len(s.kv_groups) * fixed_a)
                ca.append(len(s.kv_groups) * ctx_a)
            if s.mlp_ranges:
                im.append(i)
                fm.append(s.mlp_columns * costs.mlp_col_macs(m))
        out.append(_Stage(np.array(ia, dtype=np.int64), np.array(fa), np.array(ca), "attn"))
        out.append(_Stage(np.array(im, dtype=np.int64), np.array(fm), np.zeros(len(fm)), "mlp"))
    return out


def _queue(arrivals: np.ndarray, service: float, start: float) -> np.ndarray:
    """Finish times of jobs served one at a time in order: x_k = max(a_k, x_{k-1}) + service,
    with x_{-1} = start (closed form via a running maximum)."""
    k = np.arange(arrivals.size)
    a = np.maximum(arrivals, start) if arrivals.size else arrivals
    return np.maximum.accumulate(a - k * service) + (k + 1) * service


def simulate(plan: Plan, devices: Sequence[DeviceSpec], coordinator: CoordinatorSpec | None = None,
             tokens: int = 16, start_pos: int = 0) -> SimResult:
    """Simulate ``tokens`` generated tokens at positions ``start_pos`` .. with ``plan`` on
    ``devices`` (matched to the plan by name)."""
    coord = coordinator or CoordinatorSpec()
    if tokens < 1:
        raise PlanError(f"simulate: tokens must be at least 1, got {tokens}")
    m = plan.model
    by_name = {d.name: d for d in devices}
    missing = [d.name for d in plan.devices if d.name not in by_name]
    if missing:
        raise PlanError(f"simulate: the plan uses devices the fleet does not have: {', '.join(missing[:5])}")
    if start_pos + tokens > plan.seq_len:
        raise PlanError(f"simulate: {start_pos + tokens} positions exceed the plan's seq_len {plan.seq_len}")
    specs = [by_name[d.name] for d in plan.devices]
    n = len(specs)
    speed = np.array([d.effective_macs for d in specs])
    lat = np.array([d.latency_s for d in specs])
    bw = np.array([d.bandwidth_Bps for d in specs])
    act, part = costs.act_frame_bytes(m), costs.partial_frame_bytes(m)
    out_link = lat + act / bw
    back_link = lat + part / bw
    cc = costs.CoordinatorCosts.of(coord, m)
    send_s, recv_s, early_s, pre_s, embed_s, head_s = (cc.send_s, cc.recv_s, cc.early_s, cc.pre_s,
                                                       cc.embed_s, cc.head_s)
    cores = coord.cores
    if cores is not None and not cores > 0:
        raise PlanError(f"simulate: the coordinator's cores must be positive, got {cores}")
    local = np.array([d.name in coord.colocated for d in specs], dtype=bool)
    dispatch = np.where(local, coord.peer_dispatch_s, 0.0)
    serial = 1.0 / min(cores, 1.0) if cores is not None else 1.0  # a single thread's slowdown
    stages = _stages(plan, m.n_layers)
    replicated = plan.replicated
    set_index = {name: i for i, members in enumerate(plan.replica_sets) for name in members}
    set_of = np.array([set_index.get(d.name, -1) for d in plan.devices], dtype=np.int64)
    if (set_of < 0).any():
        raise PlanError("simulate: the plan has a device in no replica set")
    n_sets = len(plan.replica_sets)

    compute = np.zeros(n)
    cats = {"coordinator compute": 0.0, "coordinator send": 0.0, "links": 0.0,
            "device compute": 0.0, "coordinator receive": 0.0, "cpu contention": 0.0}
    bytes_total = 0.0
    min_bytes = 0.0
    token_s: list[float] = []
    timeline: list[tuple[str, str, float, float]] = []
    now = 0.0
    for t in range(tokens):
        ctx = start_pos + t + 1
        t0 = now
        now += embed_s * serial  # embedding lookup
        cats["coordinator compute"] += embed_s * serial
        last = t == tokens - 1
        for st in stages:
            k = st.idx.size
            if k == 0:
                continue
            start = now
            begin = now + pre_s
            send_end = begin + cc.send_offsets(k)
            arrive = send_end + out_link[st.idx]
            macs = st.fixed + st.per_ctx * ctx
            work = macs / speed[st.idx]
            if coord.peer_s_per_mac > 0:  # colocated peers: the cost per MAC measured here
                work = np.where(local[st.idx], macs * coord.peer_s_per_mac, work)
            done = arrive + work + dispatch[st.idx]
            back = done + back_link[st.idx]
            order = np.argsort(back, kind="stable")
            finish = _queue(back[order] - early_s, recv_s, begin)
            if replicated:  # the first partial of every set ends its wait
                groups = set_of[st.idx[order]]
                first = np.full(n_sets, np.inf)
                np.minimum.at(first, groups, finish)
                served = first[np.isfinite(first)]
                end = float(served.max())
                last_pos = int(np.flatnonzero(finish == end)[0])
                sets_in_stage = served.size
            else:
                end = float(finish[-1])
                last_pos = finish.size - 1
                sets_in_stage = k
            if cores is not None:
                mine = local[st.idx]
                cpu = pre_s + (1 if cc.broadcast else k) * send_s + k * recv_s + float(np.sum(coord.peer_frame_s + work[mine]))
                if start + cpu / cores > end:
                    cats["cpu contention"] += start + cpu / cores - end
                    end = start + cpu / cores
            c = int(st.idx[order[last_pos]]) if finish.size else 0
            ci = int(order[last_pos])
            crit_back = float(back[ci])
            cats["coordinator compute"] += pre_s
            cats["coordinator send"] += float(send_end[ci] - begin)
            cats["links"] += float(out_link[c] + back_link[c])
            cats["device compute"] += float(work[ci] + dispatch[c])
            cats["coordinator receive"] += float(finish[last_pos]) - crit_back
            np.add.at(compute, st.idx, work)
            bytes_total += (1 if cc.broadcast else k) * act + k * part
            min_bytes += sets_in_stage * min_stage_bytes(m.dim)
            if last:
                timeline.extend((plan.devices[i].name, st.kind, float(a - t0), float(b - t0))
                                for i, a, b in zip(st.idx.tolist(), arrive.tolist(), done.tolist(), strict=True))
            now = end
        now += head_s * serial
        cats["coordinator compute"] += head_s * serial
        token_s.append(now - t0)
    total = now
    return SimResult(
        tokens=tokens,
        total_s=total,
        tokens_per_s=tokens / total,
        token_ms=[x * 1e3 for x in token_s],
        utilisation={d.name: float(compute[i] / total) for i, d in enumerate(plan.devices)},
        compute_s={d.name: float(compute[i]) for i, d in enumerate(plan.devices)},
        bytes_per_token=bytes_total / tokens,
        min_bytes_per_token=min_bytes / tokens,
        breakdown_ms={k: v * 1e3 / tokens for k, v in cats.items()},
        timeline=timeline,
    )


def plot(plan: Plan, result: SimResult, path: str, max_devices: int = 48) -> None:
    """Who holds what (top) and one token's compute intervals per device (bottom), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpfed.planning.plan import owner_matrices

    names = [d.name for d in plan.devices]
    gown, bown = owner_matrices(plan, names)
    m = plan.model
    # one row per layer: each KV group drawn as wide as the columns its heads produce
    reps = max(1, m.group_q_dim // Q8_BLOCK)
    grid = np.concatenate([np.repeat(gown, reps, axis=1), bown], axis=1).astype(float)
    grid[grid < 0] = np.nan
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), gridspec_kw={"height_ratios": [1, 1.4]})
    ax1.imshow(grid, aspect="auto", interpolation="nearest", cmap="tab20")
    ax1.axvline(gown.shape[1] * reps - 0.5, color="black", linewidth=1)
    ax1.set_xlabel("KV groups | MLP blocks of 32 columns")
    ax1.set_ylabel("layer")
    ax1.set_title(f"{m.name or 'model'}: who holds what ({len(names)} devices, {plan.strategy})")
    busy = sorted(names, key=lambda n: -result.compute_s.get(n, 0.0))[:max_devices]
    row = {n: i for i, n in enumerate(busy)}
    colours = {"attn": "tab:blue", "mlp": "tab:orange"}
    for name, kind, a, b in result.timeline:
        if name in row:
            ax2.broken_barh([(a * 1e3, (b - a) * 1e3)], (row[name] - 0.4, 0.8), color=colours[kind])
    ax2.set_yticks(range(len(busy)))
    ax2.set_yticklabels(busy, fontsize=6)
    ax2.invert_yaxis()
    ax2.set_xlabel("ms into the token (blue: attention, orange: MLP)")
    ax2.set_title(f"one token: {result.token_ms[-1]:.2f} ms; {result.tokens_per_s:.2f} tokens/s")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise PlanError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


__all__ = ["CoordinatorSpec", "SimResult", "plot", "simulate"]
