"""``tpfed bench``: benchmarks, one sub-subcommand each.

- ``tpfed bench kernels``: the int8 matrix-vector kernel against numpy float32 and the measured
  memory bandwidth (:mod:`tpfed.bench.kernels`).
- ``tpfed bench e2e``: end-to-end generation on any llama2.c checkpoint, the single-process
  forward against local UDP peers and optionally llama2.c's ``run`` (:mod:`tpfed.bench.e2e`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

NAME = "bench"
HELP = "Run benchmarks (kernels, plan, e2e), each against a baseline measured in the same run."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------- tpfed bench kernels


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=_positive_int, default=4096, help="matrix rows (4096)")
    parser.add_argument("--cols", type=_positive_int, default=4096, help="matrix columns (4096)")
    parser.add_argument("--repeat", type=_positive_int, default=20,
                        help="timed calls per measurement; the median is reported (20)")
    parser.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1,
                        help="threads the int8 gemv splits its rows across (all cores, "
                             "as numpy's BLAS uses; the 1-thread time is reported as well)")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object instead of a table")


def run_kernels(args: argparse.Namespace) -> int:
    from tpfed.bench.kernels import run_kernel_bench

    result = run_kernel_bench(rows=args.rows, cols=args.cols, repeat=args.repeat,
                              threads=args.threads)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0

    from rich.table import Table

    from tpfed.commands._output import console as out_console  # uncut when piped

    mib = 2**20
    table = Table(title=f"int8 gemv, {result.rows} x {result.cols} "
                        f"(variant {result.variant}, {result.threads} thread(s), "
                        f"median of {result.repeat})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("notes")
    table.add_row("int8 gemv", f"{result.int8_gemv_ms:.3f} ms",
                  f"reads {result.int8_bytes_per_gemv / mib:.1f} MiB (weights, scales, x)")
    if result.threads != 1:
        table.add_row("int8 gemv, 1 thread", f"{result.int8_gemv_1thread_ms:.3f} ms",
                      f"{result.numpy_f32_gemv_ms / result.int8_gemv_1thread_ms:.2f}x numpy f32")
    table.add_row("numpy f32 gemv", f"{result.numpy_f32_gemv_ms:.3f} ms",
                  f"reads {result.f32_bytes_per_gemv / mib:.1f} MiB")
    table.add_row("speedup vs numpy f32", f"{result.speedup_vs_numpy_f32:.2f}x", "")
    table.add_row("int8 gemv bandwidth", f"{result.int8_gemv_gbps:.1f} GB/s",
                  f"{100 * result.bandwidth_fraction:.0f}% of memory bandwidth")
    table.add_row("memory bandwidth", f"{result.memory_bandwidth_gbps:.1f} GB/s",
                  f"np.copyto of {result.copy_bytes / mib:.0f} MiB, read + write bytes")
    table.add_row("int8 vs float64 error", f"{result.max_rel_error:.2e}",
                  "max |error| / max |y|")
    out_console().print(table)
    return 0


# ---------------------------------------------------------------- tpfed bench e2e


def add_e2e_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=256,
                        help="positions generated per run, prompt included (256; at most the "
                             "model's seq_len)")
    parser.add_argument("--repeat", type=_positive_int, default=3,
                        help="runs per configuration; the fastest is reported (3)")
    parser.add_argument("--peers", default="1,2,4",
                        help="comma list of local peer counts to measure (1,2,4); '' or 0 for none")
    parser.add_argument("--model", help="llama2.c checkpoint, file or folder (default: stories260K)")
    parser.add_argument("--tokenizer", help="llama2.c tokenizer .bin (default: next to the model)")
    parser.add_argument("--llama2c-run", metavar="PATH",
                        help="a llama2.c `run` binary you built (gcc -O3 -o run run.c -lm), run "
                             "on the same model in the same run as a second baseline")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def _peer_counts(text: str) -> tuple[int, ...]:
    from tpfed.errors import TpfedError

    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TpfedError(f"--peers takes a comma list of counts, got {text!r}") from None
    if any(n < 0 for n in counts):
        raise TpfedError(f"--peers counts must be >= 0, got {text!r}")
    return tuple(n for n in counts if n > 0)


def run_e2e(args: argparse.Namespace) -> int:
    from tpfed.bench.e2e import run_e2e_bench

    result = run_e2e_bench(_peer_counts(args.peers), steps=args.steps, repeat=args.repeat,
                           model=args.model, tokenizer=args.tokenizer,
                           llama2c_run=args.llama2c_run)
    if args.json:
        print(json.dumps(result))
        return 0

    from rich.table import Table

    from tpfed.commands._output import console as out_console  # uncut when piped

    base = result["single_process_tokens_per_s"]
    g = result["geometry"]
    console = out_console()
    console.print(f"{result['model']} (dim {g['dim']}, {g['n_layers']} layers, hidden "
                  f"{g['hidden_dim']}, {g['n_heads']}/{g['n_kv_heads']} heads, vocab "
                  f"{g['vocab_size']}): {result['steps']} positions, greedy, best of {args.repeat}")
    console.print(f"single process, int8, {result['single_process_threads']} thread "
                  f"(each peer computes on 1 thread too): {base:.1f} tok/s")
    if "llama2c_run_tokens_per_s" in result:
        console.print(f"llama2.c run ({result['llama2c_run']}, float32, its own timing): "
                      f"{result['llama2c_run_tokens_per_s']:.1f} tok/s; single process int8 is "
                      f"{result['single_process_vs_llama2c_run']:.2f}x that")
    if not result["points"]:
        return 0
    table = Table(title="local UDP peers vs the single process, measured in this run")
    for col in ("peers", "tok/s", "vs single", "ms/token", "overhead ms/token",
                "wire B/token", "min B/token", "wire / min", "same text"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        table.add_row(str(p["peers"]), f"{p['tokens_per_s']:.1f}", f"{p['vs_single_process']:.2f}x",
                      f"{p['ms_per_token']:.2f}", f"{p['overhead_ms_per_token']:.2f}",
                      f"{p['wire_bytes_per_token']:.0f}", f"{p['min_wire_bytes_per_token']:.0f}",
                      f"{p['wire_ratio']:.3f}", "yes" if p["same_text_as_single"] else "NO")
    console.print(table)
    return 0


# ---------------------------------------------------------------- tpfed bench plan


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=_positive_int, default=5,
                        help="timed planning runs; the best is reported (5)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    from tpfed.bench.plan import bench_plan

    result = bench_plan(repeats=args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0

    from rich.table import Table

    from tpfed.commands._output import console as out_console  # uncut when piped

    table = Table(title="planner: Llama-2-70B over a 100-device heterogeneous fleet")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict | list):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out_console().print(table)
    return 0


# ---------------------------------------------------------------- tpfed bench auth


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=_positive_int, default=4, help="local peers (4)")
    parser.add_argument("--steps", type=_positive_int, default=200, help="positions per run (200)")
    parser.add_argument("--model", default=None, help="llama2.c checkpoint (default: stories260K)")
    parser.add_argument("--tokenizer", default=None, help="its tokenizer")
    parser.add_argument("--repeat", type=_positive_int, default=3, help="runs; the best counts (3)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def run_auth(args: argparse.Namespace) -> int:
    from tpfed.bench.auth import run_auth_bench

    result = run_auth_bench(peers=args.peers, steps=args.steps, model=args.model,
                            tokenizer=args.tokenizer, repeat=args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.table import Table

    from tpfed.commands._output import console as out_console  # uncut when piped

    table = Table(title=f"authentication on {result['model']} over {result['peers']} local peers "
                        f"({result['tokens_per_s']} tok/s, {result['ms_per_token']} ms/token)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("model", "peers", "note"):
            table.add_row(key, str(value))
    out_console().print(table)
    print(result["note"])
    return 0


# ---------------------------------------------------------------- registry

_BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "kernels": ("int8 gemv vs numpy float32, and memory bandwidth, in one run",
                add_kernels_arguments, run_kernels),
    "plan": ("capability planner on Llama-2-70B over 100 devices: plan, re-plan, makespan/ideal",
             add_plan_arguments, run_plan),
    "auth": ("what sealing and opening every frame costs a run: C work per frame at the model's "
             "sizes against the measured time per token, in one run",
             add_auth_arguments, run_auth),
    "e2e": ("greedy generation (stories260K or --model): single process vs local UDP peers, "
            "in one run",
            add_e2e_arguments, run_e2e),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (help_text, add_args, run_fn) in _BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_bench_run=run_fn)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args))
