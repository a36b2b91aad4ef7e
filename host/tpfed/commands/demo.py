"""``tpfed demo``: stories260K across 4 local peer processes, greedy, with a fixed prompt."""

from __future__ import annotations

import argparse

from tpfed.commands.run import add_run_arguments, execute

NAME = "demo"
HELP = "Generate a story with stories260K split across 4 local peer processes over UDP."
PROMPT = "Once upon a time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, peers_required=False)


def run(args: argparse.Namespace) -> int:
    return execute(args, PROMPT)
