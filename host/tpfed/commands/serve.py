"""``tpfed serve``: an OpenAI-compatible server that keeps its fleet, with a live dashboard."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = ("Serve the model split across peers: OpenAI-compatible API (/v1), dashboard (/), "
        "Prometheus metrics (/metrics); the fleet and its weights are kept across requests.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tpfed.commands.run import add_run_arguments

    add_run_arguments(parser, peers_required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (8000)")
    parser.add_argument("--name", default=None, help="the model's name in the API (default: file name)")
    parser.add_argument("--bus", default=None, metavar="mqtt://HOST:PORT",
                        help="MQTT fleet bus: follow devices on tpfed/devices/+ and load models "
                             "announced on tpfed/models/+")


def run(args: argparse.Namespace) -> int:
    from tpfed.runtime import aio
    from tpfed.runtime.session import RunOptions
    from tpfed.serve.engine import options_with
    from tpfed.serve.server import serve

    opts = options_with(RunOptions(peers=args.peers), model=args.model, tokenizer=args.tokenizer,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        steps=args.steps, strategy=args.strategy, deadline_s=args.deadline,
                        key_file=args.key_file)
    return aio.run(serve(opts, host=args.host, port=args.port, bus_url=args.bus, model_name=args.name))
