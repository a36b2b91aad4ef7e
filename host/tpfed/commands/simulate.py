"""``tpfed simulate``: predict tokens/s of a plan on a fleet with a discrete-event simulation."""

from __future__ import annotations

import argparse

NAME = "simulate"
HELP = "simulate generation with a plan over a fleet: tokens/s, utilisation, bytes, where time goes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tpfed.commands.plan import add_model_fleet_arguments

    add_model_fleet_arguments(parser)
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="draw who holds what and one token's timeline")
    parser.add_argument("--coordinator-gmacs", type=float, default=38.0,
                        help="coordinator classifier throughput, 10^9 MAC/s (default 38: a desktop)")
    parser.add_argument("--coordinator-gops", type=float, default=1.0,
                        help="coordinator elementwise throughput, 10^9 op/s (default 1)")
    parser.add_argument("--coordinator-mbps", type=float, default=940.0,
                        help="coordinator NIC payload rate in Mbit/s (default 940: gigabit Ethernet)")
    parser.add_argument("--coordinator-frame-us", type=float, default=5.0,
                        help="coordinator software cost per frame sent or received, microseconds")


def run(args: argparse.Namespace) -> int:
    import json

    from tpfed.commands.plan import load_inputs
    from tpfed.errors import TpfedError
    from tpfed.planning.planner import plan as make_plan
    from tpfed.planning.simulator import CoordinatorSpec, plot, simulate

    for key in ("coordinator_gmacs", "coordinator_gops", "coordinator_mbps"):
        if getattr(args, key) <= 0:
            raise TpfedError(f"--{key.replace('_', '-')} must be positive")
    model, devices = load_inputs(args)
    coord = CoordinatorSpec(int8_macs=args.coordinator_gmacs * 1e9, ops_per_s=args.coordinator_gops * 1e9,
                            bandwidth_Bps=args.coordinator_mbps * 1e6 / 8,
                            per_frame_s=args.coordinator_frame_us * 1e-6)
    plan = make_plan(model, devices, strategy=args.strategy, seq_len=args.seq_len, margin=args.margin,
                     coordinator=coord, replicas=args.replicas)
    result = simulate(plan, devices, coordinator=coord, tokens=args.tokens)
    if args.plot:
        plot(plan, result, args.plot)
    if args.json:
        doc = result.to_dict()
        doc["plan_makespan_ms"] = plan.makespan_ms
        doc["strategy"] = plan.strategy
        doc["replicas"] = plan.replicas
        doc["replica_sets"] = [list(members) for members in plan.replica_sets]
        doc["excluded"] = [{"name": n, "reason": r} for n, r in plan.excluded]
        print(json.dumps(doc))
        return 0
    from rich.table import Table

    from tpfed.commands.plan import console
    from tpfed.planning.plan import group_excluded

    con = console()
    sets = f" in {len(plan.replica_sets)} replica sets of {plan.replicas}" if plan.replicas > 1 else ""
    con.print(f"[bold]{model.name or 'model'}[/bold] over {len(plan.devices)} devices{sets} ({plan.strategy}): "
              f"{result.tokens_per_s:.2f} tokens/s, {sum(result.token_ms) / len(result.token_ms):.3f} ms/token "
              f"(planner predicted {plan.makespan_ms:.3f} ms)")
    con.print(f"bytes per token: {result.bytes_per_token:,.0f} (payload floor {result.min_bytes_per_token:,.0f})")
    where = Table(title="where the time goes (critical path, per token)")
    where.add_column("cause")
    where.add_column("ms", justify="right")
    where.add_column("share", justify="right")
    total = sum(result.breakdown_ms.values()) or 1.0
    for cause, ms in result.breakdown_ms.items():
        where.add_row(cause, f"{ms:.3f}", f"{100 * ms / total:.0f}%")
    con.print(where)
    util = Table(title="device utilisation (compute time / wall time)")
    util.add_column("device")
    util.add_column("compute ms/token", justify="right")
    util.add_column("utilisation", justify="right")
    for name, u in sorted(result.utilisation.items(), key=lambda kv: -kv[1])[:40]:
        util.add_row(name, f"{result.compute_s[name] * 1e3 / result.tokens:.3f}", f"{100 * u:.1f}%")
    con.print(util)
    for names, _, reason in group_excluded(plan.excluded):
        con.print(f"[dim]excluded {names}: {reason}[/dim]", highlight=False)
    if args.plot:
        con.print(f"plot written to {args.plot}")
    return 0
