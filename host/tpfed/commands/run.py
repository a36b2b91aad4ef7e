"""``tpfed run``: generate text with a model split across peers."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "run"
HELP = "Generate text with the model split across peers (local processes, UDP peers, boards)."


def add_run_arguments(parser: argparse.ArgumentParser, *, peers_required: bool = True) -> None:
    parser.add_argument("--model", help="llama2.c checkpoint (default: stories260K, fetched if missing)")
    parser.add_argument("--tokenizer", help="tokenizer .bin (default: the model's tok512.bin)")
    parser.add_argument("--peers", required=peers_required, default=None if peers_required else "local:4",
                        metavar="SPEC",
                        help="comma list of local:N, emu:N, udp://HOST:PORT, serial:///dev/X?baud=N, "
                             "socket://HOST:PORT")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--steps", type=int, default=256,
                        help="positions to run, prompt included, like llama2.c (256)")
    parser.add_argument("--strategy", choices=("round-robin", "capability"), default="round-robin")
    parser.add_argument("--deadline", type=float, default=5.0, metavar="SECONDS",
                        help="a peer that does not answer within this is declared lost (5)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, tokens, tokens_per_s, wire bytes, peers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("prompt", nargs="?", default="Once upon a time", help="the prompt")


def execute(args: argparse.Namespace, prompt: str) -> int:
    from tpfed.runtime.session import RunOptions, run_sync

    opts = RunOptions(peers=args.peers, prompt=prompt, model=args.model, tokenizer=args.tokenizer,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      steps=args.steps, strategy=args.strategy, deadline_s=args.deadline)
    out = sys.stdout.buffer
    started = False

    def on_piece(piece: bytes) -> None:
        nonlocal started
        if not started:  # the prompt is echoed once generation really runs
            out.write(prompt.encode())
            started = True
        out.write(piece)
        out.flush()

    def on_status(msg: str) -> None:
        print(f"tpfed: {msg}", file=sys.stderr)

    result = run_sync(opts, on_piece=None if args.json else on_piece, on_status=on_status)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if not started:
            out.write(prompt.encode())
        out.write(b"\n")
        out.flush()
        s = result.stats
        print(f"tpfed: {s.tokens} positions in {s.seconds:.2f} s: {s.tokens_per_s:.1f} tok/s, "
              f"{s.wire_bytes_per_token:.0f} wire bytes/token "
              f"({s.wire_bytes_per_token / max(s.min_wire_bytes_per_token, 1):.3f}x the minimum "
              f"{s.min_wire_bytes_per_token:.0f})", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return execute(args, args.prompt)
