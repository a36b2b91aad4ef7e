"""Measured costs of the coordinator's host, for the simulator's :class:`CoordinatorSpec`.

:func:`calibrate_coordinator` times the real code paths of this machine:

- in process, each step the coordinator runs per stage and per token (:class:`Int8Transformer`
  norm and quantise, :func:`encode_activation`, :func:`decode_partial` and the sum, classifier
  and sampling);
- over loopback with one real ``tpfed peer`` process holding the whole model, stages through
  the real :meth:`Coordinator.partials_remote` and PROBE round trips timed as the coordinator's
  probe times them, counting the CPU time of both processes: that gives the full per-frame cost
  on each side, wake-ups and system calls included, which no in-process loop sees.

CPU time is read from ``/proc`` (Linux). :class:`CpuWindow` measures, over a stretch of wall
time, how much CPU some processes used and how many cores the rest of the machine left them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tpfed.compute.int8_forward import Int8Transformer, Q8Model, Stage
from tpfed.errors import TpfedError
from tpfed.planning.simulator import CoordinatorSpec
from tpfed.protocol.codec import Frame, encode_frame
from tpfed.protocol.fastpath import decode_partial, encode_activation, encode_partial
from tpfed.protocol.schema import BROADCAST, MsgType

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CalibrationError(TpfedError):
    """The host cannot be measured (no /proc, peer not reachable, ...)."""


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError as exc:
        raise CalibrationError(f"cannot read the CPU time of process {pid}: {exc}") from None
    return (int(fields[11]) + int(fields[12])) / _TICK


def system_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError as exc:
        raise CalibrationError(f"cannot read /proc/stat: {exc}") from None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class CpuWindow:
    """CPU used by this process and ``pids`` between :meth:`start` and :meth:`stop`, and the
    cores the rest of the machine left them: ``cores - (busy of everything else) / wall``."""

    pids: Sequence[int] = ()
    wall_s: float = 0.0
    own_s: float = 0.0
    pids_s: list[float] = field(default_factory=list)
    others_s: float = 0.0
    _t0: tuple = ()

    def start(self) -> CpuWindow:
        self._t0 = (time.perf_counter(), time.process_time(),
                    [process_cpu_s(p) for p in self.pids], system_cpu_s()[0])
        return self

    def stop(self) -> CpuWindow:
        wall0, own0, pids0, busy0 = self._t0
        busy1 = system_cpu_s()[0]
        self.wall_s = time.perf_counter() - wall0
        self.own_s = time.process_time() - own0
        self.pids_s = [process_cpu_s(p) - a for p, a in zip(self.pids, pids0, strict=True)]
        # /proc/stat ticks are coarse: never count less than nothing for the others
        self.others_s = max(0.0, (busy1 - busy0) - self.own_s - sum(self.pids_s))
        return self

    @property
    def available_cores(self) -> float:
        """Cores these processes had to themselves on average (at least a tenth of one)."""
        n = usable_cores()
        if self.wall_s <= 0:
            return float(n)
        return float(min(n, max(0.1, n - self.others_s / self.wall_s)))


def best_per_call(fn: Callable[[], object], calls: int = 200, rounds: int = 7) -> float:
    """Seconds per call of ``fn``: the fastest of ``rounds`` timed batches of ``calls`` (the
    least disturbed by other programs), after one warm-up batch."""
    for _ in range(calls):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


@dataclass(frozen=True)
class InProcessCosts:
    stage_s: float
    """Norm + quantise + record (``Int8Transformer.activation``) and ``encode_activation``."""
    recv_after_s: float
    """``decode_partial`` + ``to_f32`` + adding into the sum."""
    token_s: float
    """Embedding, final norm, classifier, sampling."""


def measure_in_process(model: Q8Model) -> InProcessCosts:
    """The coordinator's per-stage and per-token steps, timed in this process with the real
    code."""
    from tpfed.model.sampling import Sampler

    c = model.config
    m = Int8Transformer(model)
    m.embed(1)
    m.history.begin(0)
    seq = iter(range(1 << 62))

    def stage() -> None:
        x = m.activation(0, Stage.MLP, 0)
        encode_activation(0, int(Stage.MLP), 0, x.qs, x.d, dst=BROADCAST, seq=next(seq) & 0xFFFF, session=1)

    partial = encode_partial(0, int(Stage.MLP), 0, np.linspace(-1, 1, c.dim, dtype=np.float32),
                             seq=1, session=1, src=1)
    acc = np.zeros(c.dim, np.float32)

    def after() -> None:
        nonlocal acc
        acc += decode_partial(partial).to_f32()

    sampler = Sampler(0.0)

    def token() -> None:
        m.embed(1)
        sampler.sample(m.classify())

    return InProcessCosts(best_per_call(stage), best_per_call(after), best_per_call(token))


@dataclass(frozen=True)
class LoopbackCosts:
    send_s: float
    """Coordinator CPU to hand one frame to its UDP link (the system call included)."""
    stage_cpu_s: float
    """Coordinator CPU per stage with one peer (``activation`` + ``partials_remote``)."""
    peer_cpu_s: float
    """The peer process's CPU per activation it answers, its compute included."""
    stage_wall_s: float
    """Wall time per stage with one peer."""
    probe_round_trip_s: float
    """A PROBE round trip as the coordinator's probe times it (after the send call returns)."""
    peer_macs_s: float
    """The part of ``peer_cpu_s`` that is the peer's MACs (an average stage's, at the measured
    cost per MAC)."""
    peer_fixed_s: float = 0.0
    """The peer's CPU per frame whatever its share (receive, open, decode, seal, send)."""
    peer_s_per_mac: float = 0.0
    """The peer's CPU per multiply-accumulate, measured on two share sizes in the same run."""


async def measure_loopback(model: Q8Model, stages: int = 2000) -> LoopbackCosts:
    """One real local peer process holding the whole model: ``stages`` stages through the real
    :meth:`Coordinator.partials_remote` and as many PROBE round trips, with the CPU time of
    both processes."""

    from tpfed.compute._native import lib
    from tpfed.planning import costs
    from tpfed.runtime.coordinator import Coordinator, sealable
    from tpfed.runtime.localpeers import LocalPeers
    from tpfed.transport import UdpEndpoint
    from tpfed.transport.udp_fleet import UdpFleet

    c = model.config

    async def measured(spin: bool) -> dict:
        """One peer process and a coordinator; with ``spin`` both look for the next frame
        before sleeping (as runs do), without it they sleep at once."""
        spin_us = lib.TPFED_UDP_PEER_SPIN_US if spin else 0
        local = LocalPeers(1, extra_args=("--spin-us", str(spin_us)))
        out: dict = {}
        async with local as uris:
            pid = local.procs[0].pid
            ep = await UdpEndpoint.bind("127.0.0.1", 0)  # one socket for the peers, as runs have
            link = await ep.open_link(uris[0], name="calibration")
            coord = Coordinator(model, [link], key=local.key, seq_len=min(c.seq_len, 64))
            coord.gather_spin_us = lib.TPFED_UDP_FLEET_SPIN_US if spin else 0
            try:
                (peer,) = await coord.connect()
                coord.make_plan("round-robin")
                await coord.push_weights()
                coord.reset()
                coord.embed(1)
                coord.history.begin(0)
                layers = range(c.n_layers)
                both = [(layer, stage) for layer in layers for stage in (Stage.ATTENTION, Stage.MLP)]
                probe = encode_frame(Frame(MsgType.PROBE, {"nonce": 7, "t_send_us": 0, "pad": b""},
                                           dst=peer.device_id, seq=1, session=coord.session))

                async def run_stages(n: int, order: list) -> None:
                    for i in range(n):
                        layer, stage = order[i % len(order)]
                        x = coord.activation(layer, stage, 0)
                        await coord.partials_remote(layer, stage, x, 0)

                async def run_probes(n: int) -> float:
                    spent = 0.0
                    for _ in range(n):
                        await coord._send(peer, probe)  # sealed, as every frame of a session
                        t0 = time.perf_counter()
                        await coord._recv(peer, 5.0)
                        spent += time.perf_counter() - t0
                    return spent / n

                async def window(order: list) -> tuple[float, float, float]:
                    # the peer's CPU time comes from /proc in clock ticks (10 ms), so it needs
                    # a long stretch to be exact to a few percent
                    w = CpuWindow(pids=[pid]).start()
                    await run_stages(stages, order)
                    w.stop()
                    return w.own_s / stages, w.pids_s[0] / stages, w.wall_s / stages

                await run_stages(200, both)  # warm up both processes
                await run_probes(200)
                out["both"] = await window(both)
                out["probe_rt"] = min([await run_probes(100) for _ in range(3)])
                if True:
                    # the peer's cost per frame split into a fixed part and a part per MAC,
                    # from two share sizes: the attention stages (few MACs) and the MLP ones
                    out["att"] = await window([(layer, Stage.ATTENTION) for layer in layers])
                    out["mlp"] = await window([(layer, Stage.MLP) for layer in layers])
                    # the send alone, as the stage exchange does it (stamped in the peer's
                    # session, sendmmsg), to a socket nobody reads (datagrams are dropped when
                    # its buffer is full, which costs the sender nothing more)
                    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sink.bind(("127.0.0.1", 0))
                    try:
                        sink_link = ep.link(("127.0.0.1", sink.getsockname()[1]), name="sink")
                        fleet = UdpFleet(ep, [sink_link], [peer.auth.c if peer.auth else None])
                        x = coord.activation(0, Stage.MLP, 0)
                        frame = sealable(encode_activation(0, int(Stage.MLP), 0, x.qs, x.d,
                                                           dst=BROADCAST, session=coord.session))
                        idx = np.zeros(1, np.int32)
                        out["send_s"] = best_per_call(lambda: fleet.send_all(frame, idx), calls=500)
                    finally:
                        sink.close()
            finally:
                await coord.close()
                await ep.close()
        return out

    # Measured as runs go: the peer and the gather look for the next frame before sleeping.
    # (Their CPU time then includes that looking; measured with both sleeping at once instead,
    # the wake-ups of every frame count, which runs do not pay: predictions were 25-60% slow.)
    wall = cpu = await measured(spin=True)
    att, mlp = cpu["att"], cpu["mlp"]
    macs_att = c.n_groups * costs.attn_macs(c, 1.0)  # at position 0: one row of context
    macs_mlp = c.hidden_dim * costs.mlp_col_macs(c)
    per_mac = max((mlp[1] - att[1]) / max(macs_mlp - macs_att, 1.0), 0.0)
    fixed = max(att[1] - per_mac * macs_att, 0.0)
    peer_macs_s = (macs_att + macs_mlp) / 2 * per_mac
    best = (cpu["both"][0], cpu["both"][1], wall["both"][2])  # CPU of work, wall of a run
    probe_rt, send_s = wall["probe_rt"], cpu["send_s"]
    return LoopbackCosts(send_s=send_s, stage_cpu_s=best[0], peer_cpu_s=best[1], stage_wall_s=best[2],
                         probe_round_trip_s=probe_rt, peer_macs_s=peer_macs_s,
                         peer_fixed_s=fixed, peer_s_per_mac=per_mac)


async def measure_coordinator(model: Q8Model, stages: int = 2000) -> CoordinatorSpec:
    """:func:`calibrate_coordinator` inside a running event loop."""
    inproc = await asyncio.to_thread(measure_in_process, model)
    lo = await measure_loopback(model, stages)
    # per stage with one peer: stage work, one send, one full receive. The gather looks for
    # the partial without sleeping, so its CPU time holds the round trip it waited through:
    # what is left after the round trip is the receiving.
    waited = lo.probe_round_trip_s + lo.peer_macs_s
    recv_s = max(lo.stage_cpu_s - inproc.stage_s - lo.send_s - waited, inproc.recv_after_s)
    # what a stage's critical path holds beyond the probed round trip, the MACs and the
    # decode and sum: the peer's dispatch of an activation rather than a probe's echo, and
    # the coordinator's gather bookkeeping
    dispatch = (lo.stage_wall_s - inproc.stage_s - lo.send_s - lo.probe_round_trip_s - lo.peer_macs_s
                - inproc.recv_after_s)
    c = model.config
    return CoordinatorSpec(
        int8_macs=c.vocab_size * c.dim / inproc.token_s,
        ops_per_s=6 * c.dim / inproc.stage_s,
        per_frame_s=lo.send_s,
        stage_s=inproc.stage_s,
        send_s=lo.send_s,
        recv_s=recv_s,
        recv_after_s=min(inproc.recv_after_s, recv_s),
        token_s=inproc.token_s,
        peer_frame_s=lo.peer_fixed_s,
        peer_s_per_mac=lo.peer_s_per_mac,
        # negative when a stage's round trip through the C exchange is quicker than the probe's
        # (which goes through the event loop): a correction, both ways
        peer_dispatch_s=dispatch,
    )


def calibrate_coordinator(model: Q8Model, stages: int = 2000) -> CoordinatorSpec:
    """Measure this host's coordinator costs for ``model`` (see the module docstring) on the
    event loop tpfed runs on. Takes a second or two."""
    from tpfed.runtime import aio

    if not os.path.exists("/proc/stat"):
        raise CalibrationError("calibration reads CPU times from /proc: Linux only")
    return aio.run(measure_coordinator(model, stages))


def with_host(spec: CoordinatorSpec, cores: float, colocated: Sequence[str]) -> CoordinatorSpec:
    """``spec`` for a run whose processes got ``cores`` cores and with ``colocated`` peers."""
    return dataclasses.replace(spec, cores=cores, colocated=frozenset(colocated))


__all__ = ["CalibrationError", "CpuWindow", "InProcessCosts", "LoopbackCosts", "best_per_call",
           "calibrate_coordinator", "measure_coordinator", "measure_in_process", "measure_loopback",
           "process_cpu_s", "system_cpu_s", "usable_cores", "with_host"]
