"""``tpfed plan``: split a model over a fleet and show (or print as JSON) who holds what."""

from __future__ import annotations

import argparse

NAME = "plan"
HELP = "split a model's KV groups and MLP columns over a fleet of devices"


def add_model_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``tpfed simulate``."""
    parser.add_argument("--model", metavar="M",
                        help="llama2.c .bin checkpoint, Hugging Face config.json or folder, or a shipped "
                             "config by name: llama-2-7b, llama-2-70b, ... (default: the stories260K "
                             "geometry)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fleet", metavar="FLEET",
                       help="a fleet YAML file, or a shipped fleet by name: lab-100, mixed-small, "
                            "esp32-trio (boards/fleets/)")
    group.add_argument("--devices", type=int, metavar="N", help="N identical desktop peers")
    parser.add_argument("--strategy", choices=("round-robin", "capability"), default="capability",
                        help="how units are split: by capability and memory (default) or round-robin")
    parser.add_argument("--seq-len", type=int, metavar="N", help="KV cache length to plan for (default: the model's)")
    parser.add_argument("--margin", type=float, default=0.1, help="memory safety margin (default 0.1)")
    parser.add_argument("--replicas", type=int, default=1, metavar="K",
                        help="hold every unit on K alike devices with identical shares; the first "
                             "partial of each set is taken (default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_fleet_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--save", metavar="PLAN.json", help="also write the full plan (loadable) here")


def load_inputs(args: argparse.Namespace):
    from tpfed.errors import FleetError
    from tpfed.model.hfconfig import STORIES260K, load_model_config
    from tpfed.planning.fleet import identical_fleet, load_fleet

    model = load_model_config(args.model) if args.model else STORIES260K
    if args.fleet:
        devices = load_fleet(args.fleet)
    else:
        if args.devices < 1:
            raise FleetError(f"--devices must be at least 1, got {args.devices}")
        devices = identical_fleet(args.devices)
    return model, devices


def summary(plan) -> dict:
    """The JSON form ``tpfed plan --json`` prints."""
    from tpfed.planning.plan import group_excluded

    n = plan.model.n_layers
    return {
        "model": plan.model.name,
        "strategy": plan.strategy,
        "seq_len": plan.seq_len,
        "plan_ms": plan.plan_ms,
        "makespan_ms": plan.makespan_ms,
        "ideal_ms": plan.ideal_ms,
        "ideal_compute_ms": plan.ideal_compute_ms,
        "round_robin_makespan_ms": plan.round_robin_makespan_ms,
        "replicas": plan.replicas,
        "replica_sets": [list(members) for members in plan.replica_sets],
        "devices": [
            {
                "name": d.name,
                "kv_groups": [list(d.layers[li].kv_groups) if li in d.layers else [] for li in range(n)],
                "mlp_columns": [[list(r) for r in d.layers[li].mlp_ranges] if li in d.layers else []
                                for li in range(n)],
                "memory_mb": d.memory_bytes / 2**20,
                "memory_limit_mb": d.memory_limit_bytes / 2**20,
                "busy_ms": d.busy_ms,
                "utilisation": d.busy_ms / plan.makespan_ms if plan.makespan_ms else 0.0,
            }
            for d in plan.devices
        ],
        "excluded": [{"name": name, "reason": reason} for name, reason in plan.excluded],
        "excluded_groups": [{"devices": names, "count": n, "reason": reason}
                            for names, n, reason in group_excluded(plan.excluded)],
    }


def console():
    """A rich console that does not wrap or crop when stdout is not a terminal."""
    from tpfed.commands._output import console as _console

    return _console()


def run(args: argparse.Namespace) -> int:
    import json

    from tpfed.planning.planner import plan as make_plan

    model, devices = load_inputs(args)
    plan = make_plan(model, devices, strategy=args.strategy, seq_len=args.seq_len, margin=args.margin,
                     replicas=args.replicas)
    plan.validate()
    if args.save:
        plan.save(args.save)
    if args.json:
        print(json.dumps(summary(plan)))
    else:
        from tpfed.commands._output import print_table

        print_table(plan.table())
    return 0
