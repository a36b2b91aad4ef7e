"""A plan: which device owns which KV groups and MLP columns of every layer. Plain data the
coordinator consumes; it can be printed, saved, loaded, compared and validated.

Internally the planner works on two owner matrices, ``group_owner[layer, group]`` and
``block_owner[layer, block]`` (device index, -1 for none), and turns them into per-device
:class:`LayerShare` objects; :func:`owner_matrices` goes back the other way.

Replicas. A plan made with ``replicas=K`` groups its devices in *replica sets*
(``Plan.replica_sets``, device names, sets in plan order): every member of a set holds exactly
the same layers, so their partials are bit-identical and the coordinator may take whichever
arrives first while still summing one partial per set in set order. Every unit is held by
exactly one set. ``Plan.devices`` lists the members of each set next to each other, sets in
plan order. With K = 1 every device is its own set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpfed.compute.kernels import Q8_BLOCK
from tpfed.errors import PlanError
from tpfed.model.config import ModelConfig
from tpfed.planning import costs


@dataclass(frozen=True)
class LayerShare:
    """What one device holds of one layer: whole KV groups and hidden-column ranges [start, end)
    (start a multiple of 32; end a multiple of 32 or hidden_dim)."""

    kv_groups: tuple[int, ...]
    mlp_ranges: tuple[tuple[int, int], ...]

    @property
    def mlp_columns(self) -> int:
        return sum(e - s for s, e in self.mlp_ranges)


@dataclass
class DeviceShare:
    name: str
    layers: dict[int, LayerShare]
    memory_bytes: int
    memory_limit_bytes: int
    busy_ms: float
    """Predicted busy time per token: compute plus link time of every stage it takes part in."""

    @property
    def kv_units(self) -> int:
        return sum(len(s.kv_groups) for s in self.layers.values())

    @property
    def mlp_columns(self) -> int:
        return sum(s.mlp_columns for s in self.layers.values())


@dataclass(frozen=True)
class Move:
    """One unit (a KV group, or a run of MLP columns) that changes owner between two plans."""

    layer: int
    kind: str  # "kv" or "mlp"
    unit: tuple[int, ...]  # (group,) or (start, end)
    src: str | None  # None: the previous owner left the fleet
    dst: str
    bytes: int  # Q8_0 weight bytes to push (a moved KV cache is rebuilt by replay, not sent)

    def __str__(self) -> str:
        what = f"group {self.unit[0]}" if self.kind == "kv" else f"columns {self.unit[0]}-{self.unit[1]}"
        return f"layer {self.layer} {what}: {self.src or '(gone)'} -> {self.dst} ({self.bytes} B)"


@dataclass
class PlanDiff:
    moves: list[Move]
    joined: list[str]
    left: list[str]

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)

    def __str__(self) -> str:
        head = f"{len(self.moves)} moves, {self.moved_bytes} bytes"
        if self.joined:
            head += f"; joined: {', '.join(self.joined)}"
        if self.left:
            head += f"; left: {', '.join(self.left)}"
        return "\n".join([head, *(f"  {m}" for m in self.moves)])


def share_bytes(model: ModelConfig, seq_len: int, layers: dict[int, LayerShare]) -> int:
    """What a device allocates for its shares: Q8_0 weights of its units + f32 KV caches."""
    attn = costs.attn_unit_bytes(model, seq_len)
    total = 0
    for s in layers.values():
        total += len(s.kv_groups) * attn
        for a, b in s.mlp_ranges:
            total += costs.mlp_range_bytes(model, b - a)
    return total


def block_bytes_array(model: ModelConfig) -> np.ndarray:
    """Q8_0 bytes of every MLP block of a layer (read-only; cached per model)."""
    return _block_bytes(model)


@functools.lru_cache(maxsize=32)
def _block_bytes(model: ModelConfig) -> np.ndarray:
    nb = costs.n_blocks(model)
    out = np.full(nb, costs.mlp_range_bytes(model, min(Q8_BLOCK, model.hidden_dim)), dtype=np.int64)
    out[-1] = costs.mlp_range_bytes(model, costs.block_widths(model)[-1])
    out.flags.writeable = False
    return out


def shares_from_owners(
    model: ModelConfig, n_devices: int, group_owner: np.ndarray, block_owner: np.ndarray
) -> list[dict[int, LayerShare]]:
    """Per-device ``{layer: LayerShare}`` from the owner matrices (each range maximal)."""
    L, B = block_owner.shape
    G = group_owner.shape[1]
    hidden = model.hidden_dim
    # KV groups: keyed by device * L + layer, groups ascending within a key
    gflat = group_owner.reshape(-1)
    gi = np.flatnonzero(gflat >= 0)
    gkey = gflat[gi] * L + gi // G
    o = np.argsort(gkey, kind="stable")
    groups: dict[int, list[int]] = {}
    for k, g in zip(gkey[o].tolist(), (gi[o] % G).tolist(), strict=True):
        lst = groups.get(k)
        if lst is None:
            groups[k] = [g]
        else:
            lst.append(g)
    # MLP column ranges: maximal runs of one owner within a layer, in column order
    flat = block_owner.reshape(-1)
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::B] = True
    idx = np.flatnonzero(starts)
    ends = np.append(idx[1:], flat.size)
    own = flat[idx]
    keep = own >= 0
    idx, ends, own = idx[keep], ends[keep], own[keep]
    li = idx // B
    col_a = (idx - li * B) * Q8_BLOCK
    col_b = np.minimum((ends - li * B) * Q8_BLOCK, hidden)
    ranges: dict[int, list[tuple[int, int]]] = {}
    for k, r in zip((own * L + li).tolist(), zip(col_a.tolist(), col_b.tolist(), strict=True), strict=True):
        lst = ranges.get(k)
        if lst is None:
            ranges[k] = [r]
        else:
            lst.append(r)
    out: list[dict[int, LayerShare]] = [{} for _ in range(n_devices)]
    empty: tuple = ()
    for k in sorted(groups.keys() | ranges.keys()):
        d, layer = divmod(k, L)
        g = groups.get(k)
        r = ranges.get(k)
        out[d][layer] = LayerShare(tuple(g) if g else empty, tuple(r) if r else empty)
    return out


def owner_matrices(plan: Plan, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``group_owner`` (L x G) and ``block_owner`` (L x B) with indices into ``names``; units
    held by a device not in ``names`` get -1."""
    return _owner_matrices(plan, {n: i for i, n in enumerate(names)}, plan.devices)


def set_owner_matrices(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`owner_matrices`, with the index of the replica set holding each unit."""
    by_name = {d.name: d for d in plan.devices}
    firsts = [by_name[s[0]] for s in plan.replica_sets]
    return _owner_matrices(plan, {d.name: i for i, d in enumerate(firsts)}, firsts)


def _owner_matrices(plan: Plan, index: dict[str, int], devices: Sequence[DeviceShare]
                    ) -> tuple[np.ndarray, np.ndarray]:
    m = plan.model
    B = costs.n_blocks(m)
    gown = np.full((m.n_layers, m.n_groups), -1, dtype=np.int64)
    bown = np.full((m.n_layers, B), -1, dtype=np.int64)
    g_pos: list[int] = []
    g_dev: list[int] = []
    r_start: list[int] = []
    r_end: list[int] = []
    r_dev: list[int] = []
    G = m.n_groups
    for dev in devices:
        i = index.get(dev.name, -1)
        for li, s in dev.layers.items():
            if s.kv_groups:
                g_pos.extend(li * G + g for g in s.kv_groups)
                g_dev.extend([i] * len(s.kv_groups))
            for a, b in s.mlp_ranges:
                r_start.append(li * B + a // Q8_BLOCK)
                r_end.append(li * B + costs.ceil_div(b, Q8_BLOCK))
                r_dev.append(i)
    if g_pos:
        gown.reshape(-1)[np.array(g_pos)] = np.array(g_dev)
    if r_start:
        s0, e0 = np.array(r_start), np.array(r_end)
        lens = e0 - s0
        pos = np.repeat(s0 - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        bown.reshape(-1)[pos] = np.repeat(np.array(r_dev), lens)
    return gown, bown


def diff_owners(m: ModelConfig, names: Sequence[str], g0: np.ndarray, b0: np.ndarray,
                g1: np.ndarray, b1: np.ndarray) -> list[Move]:
    """Units whose owner differs between two owner-matrix pairs (indices into ``names``)."""
    attn_w = costs.attn_weight_bytes(m)
    moves: list[Move] = []
    gl, gg = np.nonzero((g0 != g1) & (g1 >= 0))
    for li, g, a, b in zip(gl.tolist(), gg.tolist(), g0[gl, gg].tolist(), g1[gl, gg].tolist(), strict=True):
        moves.append(Move(li, "kv", (g,), names[a] if a >= 0 else None, names[b], attn_w))
    changed = (b0 != b1) & (b1 >= 0)
    nb = b0.shape[1]
    flat_c, flat0, flat1 = changed.reshape(-1), b0.reshape(-1), b1.reshape(-1)
    same_next = (flat0[1:] == flat0[:-1]) & (flat1[1:] == flat1[:-1])
    starts = flat_c.copy()
    starts[1:] &= ~flat_c[:-1] | ~same_next
    starts[::nb] = flat_c[::nb]
    ends = flat_c.copy()
    ends[:-1] &= ~flat_c[1:] | ~same_next
    ends[nb - 1::nb] = flat_c[nb - 1::nb]
    si, ei = np.flatnonzero(starts), np.flatnonzero(ends)
    if not si.size:
        return moves
    cum = np.concatenate([[0], np.cumsum(block_bytes_array(m))])
    li = si // nb
    b_first = si - li * nb
    b_end = ei - li * nb + 1
    nbytes = cum[b_end] - cum[b_first]
    col_a = b_first * Q8_BLOCK
    col_b = np.minimum(b_end * Q8_BLOCK, m.hidden_dim)
    for layer, a, b, src, dst, size in zip(li.tolist(), col_a.tolist(), col_b.tolist(), flat0[si].tolist(),
                                           flat1[si].tolist(), nbytes.tolist(), strict=True):
        moves.append(Move(layer, "mlp", (a, b), names[src] if src >= 0 else None, names[dst], size))
    return moves


def replicated_moves(old: Plan, new: Plan) -> list[Move]:
    """What every device of ``new`` has to receive: the units it holds in ``new`` and did not
    hold in ``old`` (a device new to a replica set receives the set's whole share). ``src`` is
    a device that held the unit in ``old`` and is still in ``new`` (None: none is)."""
    m = new.model
    gs0, bs0 = set_owner_matrices(old)
    gs1, bs1 = set_owner_matrices(new)
    still = {d.name for d in new.devices}
    labels: list[str | None] = [next((n for n in s if n in still), None) for s in old.replica_sets]
    old_set = {n: i for i, s in enumerate(old.replica_sets) for n in s}
    dst = len(labels)
    out: list[Move] = []
    for j, members in enumerate(new.replica_sets):
        g1 = np.where(gs1 == j, dst, -1)
        b1 = np.where(bs1 == j, dst, -1)
        by_old: dict[int, list[str]] = {}
        for n in members:
            by_old.setdefault(old_set.get(n, -1), []).append(n)
        for i, group in by_old.items():
            g0 = np.where((gs0 == i) & (i >= 0), dst, gs0)
            b0 = np.where((bs0 == i) & (i >= 0), dst, bs0)
            moves = diff_owners(m, [*labels, group[0]], g0, b0, g1, b1)
            out.extend(mv if n == group[0] else dataclasses.replace(mv, dst=n) for n in group for mv in moves)
    return out


def _stage_kind(stage: str | int) -> str:
    name = getattr(stage, "name", stage)
    if isinstance(name, str):
        key = name.lower()
        if key in ("attn", "attention"):
            return "attn"
        if key == "mlp":
            return "mlp"
    elif isinstance(stage, int) and stage in (0, 1):
        return "attn" if stage == 0 else "mlp"
    raise ValueError(f"stage must be 'attn' or 'mlp' (or 0 / 1), got {stage!r}")


@dataclass
class Plan:
    model: ModelConfig
    strategy: str
    devices: list[DeviceShare]
    excluded: list[tuple[str, str]]
    seq_len: int
    makespan_ms: float
    """Predicted device-side time per token: per layer, the slowest attention holder plus the
    slowest MLP holder, each with its compute and one round trip on its own link."""
    ideal_ms: float
    """Lower bound of the same model: every stage's work spread fluidly over all devices (no
    memory limit, no indivisible units), each device paying its link time if it takes part."""
    round_robin_makespan_ms: float
    """The round-robin split of the same devices under the same model (memory not checked)."""
    plan_ms: float
    margin: float = 0.1
    ideal_compute_ms: float = 0.0
    """Total MACs / total MAC/s of all devices, links ignored (the issue's simplest ideal)."""
    moved_bytes: int = 0
    moves: list[Move] = field(default_factory=list)
    replicas: int = 1
    """How many devices the plan asked to hold every unit (``plan(..., replicas=K)``); a set
    may have fewer members after a re-plan (members lost) or more never."""
    replica_sets: list[list[str]] = field(default_factory=list)
    """Device names grouped in replica sets, sets in plan order, members in the order of
    ``devices``; every member holds identical layers. Empty on construction means one set per
    device (filled in by ``__post_init__``)."""

    def __post_init__(self) -> None:
        if not self.replica_sets:
            self.replica_sets = [[d.name] for d in self.devices]

    # ----------------------------------------------------------------- queries
    @property
    def replicated(self) -> bool:
        """Whether some replica set has more than one member."""
        return any(len(s) > 1 for s in self.replica_sets)

    def set_of(self, name: str) -> int:
        """Index (in ``replica_sets``) of the set ``name`` belongs to."""
        for i, members in enumerate(self.replica_sets):
            if name in members:
                return i
        raise KeyError(name)

    def owner_sets(self, layer: int, stage: str | int) -> list[list[str]]:
        """The replica sets holding part of ``stage`` of ``layer``, in plan order. ``stage`` is
        ``"attn"`` (or ``"attention"``, or ``Stage.ATTENTION`` == 0) or ``"mlp"`` (``Stage.MLP``
        == 1). The coordinator sends the stage's activation to every member of these sets and
        sums one partial per set in this order."""
        if not 0 <= layer < self.model.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.model.n_layers - 1}")
        kind = _stage_kind(stage)
        by_name = {d.name: d for d in self.devices}
        out: list[list[str]] = []
        for members in self.replica_sets:
            s = by_name[members[0]].layers.get(layer)
            if s is not None and (s.kv_groups if kind == "attn" else s.mlp_ranges):
                out.append(list(members))
        return out

    def device(self, name: str) -> DeviceShare:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def owners(self, layer: int) -> tuple[list[str], list[tuple[int, int, str]]]:
        """Owner of every KV group of ``layer`` (by group index) and its column ranges in
        order as ``(start, end, device)``."""
        if not 0 <= layer < self.model.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.model.n_layers - 1}")
        groups: list[str | None] = [None] * self.model.n_groups
        ranges: list[tuple[int, int, str]] = []
        for d in self.devices:
            s = d.layers.get(layer)
            if s is None:
                continue
            for g in s.kv_groups:
                groups[g] = d.name
            ranges.extend((a, b, d.name) for a, b in s.mlp_ranges)
        ranges.sort()
        return [g or "" for g in groups], ranges

    def set_share(self, index: int) -> DeviceShare:
        """What every member of replica set ``index`` holds (its first member's share)."""
        return self.device(self.replica_sets[index][0])

    def utilisation(self) -> dict[str, float]:
        return {d.name: (d.busy_ms / self.makespan_ms if self.makespan_ms > 0 else 0.0) for d in self.devices}

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`PlanError` unless every KV group and every hidden column of every
        layer has exactly one owner, ranges are aligned, and every device's memory is what its
        shares take and within its limit."""
        m = self.model
        L, G, H = m.n_layers, m.n_groups, m.hidden_dim
        gcount = np.zeros((L, G), dtype=np.int64)
        ccount = np.zeros((L, H + 1), dtype=np.int64)  # difference array over columns
        names = set()
        for d in self.devices:
            if d.name in names:
                raise PlanError(f"plan: device {d.name!r} appears twice")
            names.add(d.name)
            for li, s in d.layers.items():
                if not 0 <= li < L:
                    raise PlanError(f"plan: {d.name} holds layer {li}, model has {L}")
                for g in s.kv_groups:
                    if not 0 <= g < G:
                        raise PlanError(f"plan: {d.name} holds group {g} of layer {li}, model has {G}")
                    gcount[li, g] += 1
                for a, b in s.mlp_ranges:
                    if not (0 <= a < b <= H and a % Q8_BLOCK == 0 and (b % Q8_BLOCK == 0 or b == H)):
                        raise PlanError(f"plan: {d.name} layer {li}: bad column range [{a}, {b})")
                    ccount[li, a] += 1
                    ccount[li, b] -= 1
            need = share_bytes(m, self.seq_len, d.layers)
            if need != d.memory_bytes:
                raise PlanError(f"plan: {d.name} is said to use {d.memory_bytes} bytes, its shares take {need}")
            if need > d.memory_limit_bytes:
                raise PlanError(f"plan: {d.name} needs {need} bytes, its limit is {d.memory_limit_bytes}")
        if self.replicated or len(self.replica_sets) != len(self.devices):
            gcount, ccount = self._validate_sets(gcount, ccount)
        bad = np.argwhere(gcount != 1)
        if bad.size:
            li, g = bad[0]
            raise PlanError(f"plan: layer {li} group {g} has {gcount[li, g]} owners (needs exactly 1)")
        cols = np.cumsum(ccount, axis=1)[:, :H]
        bad = np.argwhere(cols != 1)
        if bad.size:
            li, c = bad[0]
            raise PlanError(f"plan: layer {li} column {c} has {cols[li, c]} owners (needs exactly 1)")

    def _validate_sets(self, gcount: np.ndarray, ccount: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replica sets partition the devices and their members hold identical layers; returns
        the unit counts with each set counted once."""
        by_name = {d.name: d for d in self.devices}
        seen: set[str] = set()
        for i, members in enumerate(self.replica_sets):
            if not members:
                raise PlanError(f"plan: replica set {i} is empty")
            for n in members:
                if n not in by_name:
                    raise PlanError(f"plan: replica set {i} names {n!r}, which the plan does not hold")
                if n in seen:
                    raise PlanError(f"plan: device {n!r} is in two replica sets")
                seen.add(n)
            first = by_name[members[0]]
            for n in members[1:]:
                if by_name[n].layers != first.layers:
                    raise PlanError(f"plan: replica set {i}: {n} does not hold the same units as {members[0]}")
        missing = [d.name for d in self.devices if d.name not in seen]
        if missing:
            raise PlanError(f"plan: device {missing[0]!r} is in no replica set")
        # each set counts once: take away what the other members added
        for members in self.replica_sets:
            extra = len(members) - 1
            if not extra:
                continue
            for li, s in by_name[members[0]].layers.items():
                for g in s.kv_groups:
                    gcount[li, g] -= extra
                for a, b in s.mlp_ranges:
                    ccount[li, a] -= extra
                    ccount[li, b] += extra
        return gcount, ccount

    # ----------------------------------------------------------------- comparing
    def diff(self, other: Plan) -> PlanDiff:
        """What moves going from this plan to ``other`` (units whose owner changes)."""
        if (self.model.n_layers, self.model.n_groups, self.model.hidden_dim) != (
            other.model.n_layers, other.model.n_groups, other.model.hidden_dim
        ):
            raise PlanError("plan diff: the two plans are for different model shapes")
        mine = {d.name for d in self.devices}
        theirs = {d.name for d in other.devices}
        if self.replicated or other.replicated:
            return PlanDiff(replicated_moves(self, other), sorted(theirs - mine), sorted(mine - theirs))
        names = sorted({d.name for d in self.devices} | {d.name for d in other.devices})
        g0, b0 = owner_matrices(self, names)
        g1, b1 = owner_matrices(other, names)
        return PlanDiff(diff_owners(other.model, names, g0, b0, g1, b1),
                        sorted(theirs - mine), sorted(mine - theirs))

    # ----------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "strategy": self.strategy,
            "seq_len": self.seq_len,
            "margin": self.margin,
            "plan_ms": self.plan_ms,
            "makespan_ms": self.makespan_ms,
            "ideal_ms": self.ideal_ms,
            "ideal_compute_ms": self.ideal_compute_ms,
            "round_robin_makespan_ms": self.round_robin_makespan_ms,
            "moved_bytes": self.moved_bytes,
            "moves": [asdict(mv) for mv in self.moves],
            "replicas": self.replicas,
            "replica_sets": [list(s) for s in self.replica_sets],
            "excluded": [[n, r] for n, r in self.excluded],
            "devices": [
                {
                    "name": d.name,
                    "memory_bytes": d.memory_bytes,
                    "memory_limit_bytes": d.memory_limit_bytes,
                    "busy_ms": d.busy_ms,
                    "layers": {
                        str(li): {"kv_groups": list(s.kv_groups), "mlp_ranges": [list(r) for r in s.mlp_ranges]}
                        for li, s in sorted(d.layers.items())
                    },
                }
                for d in self.devices
            ],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Plan:
        try:
            model = ModelConfig(**doc["model"])
            devices = [
                DeviceShare(
                    name=d["name"],
                    layers={
                        int(li): LayerShare(tuple(int(g) for g in s["kv_groups"]),
                                           tuple((int(a), int(b)) for a, b in s["mlp_ranges"]))
                        for li, s in d["layers"].items()
                    },
                    memory_bytes=int(d["memory_bytes"]),
                    memory_limit_bytes=int(d["memory_limit_bytes"]),
                    busy_ms=float(d["busy_ms"]),
                )
                for d in doc["devices"]
            ]
            return cls(
                model=model,
                strategy=str(doc["strategy"]),
                devices=devices,
                excluded=[(str(n), str(r)) for n, r in doc["excluded"]],
                seq_len=int(doc["seq_len"]),
                makespan_ms=float(doc["makespan_ms"]),
                ideal_ms=float(doc["ideal_ms"]),
                round_robin_makespan_ms=float(doc["round_robin_makespan_ms"]),
                plan_ms=float(doc["plan_ms"]),
                margin=float(doc.get("margin", 0.1)),
                ideal_compute_ms=float(doc.get("ideal_compute_ms", 0.0)),
                moved_bytes=int(doc.get("moved_bytes", 0)),
                moves=[Move(int(mv["layer"]), str(mv["kind"]), tuple(int(u) for u in mv["unit"]),
                            mv["src"], str(mv["dst"]), int(mv["bytes"])) for mv in doc.get("moves", [])],
                replicas=int(doc.get("replicas", 1)),
                replica_sets=[[str(n) for n in s] for s in doc.get("replica_sets", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"not a tpfed plan ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PlanError(f"cannot save the plan to {path}: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path}: cannot read plan ({exc})") from None
        return cls.from_dict(doc)

    # ----------------------------------------------------------------- showing
    def table(self):  # -> rich.table.Table
        from rich.table import Table

        sets = self.replicas > 1 or self.replicated
        n_sets = len(self.replica_sets)
        where = (f"{len(self.devices)} devices in {n_sets} replica set{'s' if n_sets != 1 else ''} of {self.replicas}"
                 if sets else f"{len(self.devices)} devices")
        t = Table(
            title=(f"{self.model.name or 'model'} over {where} ({self.strategy}): "
                   f"{self.makespan_ms:.3f} ms/token predicted, ideal {self.ideal_ms:.3f}, "
                   f"round-robin {self.round_robin_makespan_ms:.3f}; planned in {self.plan_ms:.1f} ms"),
        )
        cols = ("device", "layers", "KV groups", "MLP columns", "memory MiB", "limit MiB", "busy ms", "util")
        if sets:
            cols = ("set", *cols)
        for col in cols:
            t.add_column(col, justify="left" if col in ("device", "KV groups") else "right")
        util = self.utilisation()
        set_of = {n: i for i, s in enumerate(self.replica_sets) for n in s}
        for d in self.devices:
            t.add_row(
                *((str(set_of.get(d.name, "-")),) if sets else ()),
                d.name,
                _layer_span(sorted(d.layers), self.model.n_layers),
                _groups_summary(d, self.model.n_layers),
                str(d.mlp_columns),
                f"{d.memory_bytes / 2**20:.2f}",
                f"{d.memory_limit_bytes / 2**20:.2f}",
                f"{d.busy_ms:.3f}",
                f"{100 * util[d.name]:.0f}%",
            )
        if self.excluded:
            t.caption = "\n".join(f"excluded {names}: {reason}" for names, _, reason in group_excluded(self.excluded))
            t.caption_justify = "left"
        return t


def group_excluded(excluded: Sequence[tuple[str, str]]) -> list[tuple[str, int, str]]:
    """Excluded devices grouped by identical reason, in first-seen order: (names, count,
    reason), the names compacted (``phone-1..20``, or ``a, b (2)``)."""
    groups: dict[str, list[str]] = {}
    for name, reason in excluded:
        groups.setdefault(reason, []).append(name)
    return [(_compact_names(names), len(names), reason) for reason, names in groups.items()]


def _compact_names(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    runs: dict[str, list[int]] = {}
    other: list[str] = []
    for n in names:
        stem, _, num = n.rpartition("-")
        if stem and num.isdigit():
            runs.setdefault(stem, []).append(int(num))
        else:
            other.append(n)
    parts = []
    for stem, nums in runs.items():
        nums.sort()
        spans, a = [], nums[0]
        for x, y in zip(nums, [*nums[1:], None], strict=True):
            if y != x + 1:
                spans.append(f"{a}" if a == x else f"{a}..{x}")
                a = y
        parts.append(f"{stem}-{','.join(spans)}")
    return f"{', '.join(parts + other)} ({len(names)})"


def _layer_span(layers: list[int], n_layers: int) -> str:
    if not layers:
        return "-"
    if len(layers) == n_layers:
        return "all"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return str(len(layers))


def _groups_summary(d: DeviceShare, n_layers: int) -> str:
    sets = {s.kv_groups for s in d.layers.values() if s.kv_groups}
    if not sets:
        return "-"
    held = sum(1 for s in d.layers.values() if s.kv_groups)
    if len(sets) == 1:
        (gs,) = sets
        where = "every layer" if held == n_layers else f"{held} layers"
        return f"{','.join(map(str, gs))} ({where})"
    return f"{d.kv_units} group-layers"
