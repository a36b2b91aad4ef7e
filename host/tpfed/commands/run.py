"""``tpfed run``: generate text with a model split across peers."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "run"
HELP = "Generate text with the model split across peers (local processes, UDP peers, boards)."


def add_run_arguments(parser: argparse.ArgumentParser, *, peers_required: bool = True) -> None:
    parser.add_argument("--model", metavar="PATH",
                        help="a Hugging Face folder, a .gguf file or a llama2.c .bin (default: "
                             "stories260K, fetched if missing)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json, a GGUF file or a llama2.c tokenizer .bin (default: "
                             "the model's own)")
    parser.add_argument("--peers", required=peers_required, default=None if peers_required else "local:4",
                        metavar="SPEC",
                        help="comma list of local:N, emu:N, udp://HOST:PORT, serial:///dev/X?baud=N, "
                             "socket://HOST:PORT")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--steps", type=int, default=256,
                        help="positions to run, prompt included, like llama2.c (256)")
    parser.add_argument("--strategy", choices=("round-robin", "capability"), default="round-robin",
                        help="how units are split: round-robin (default) or by measured capability")
    parser.add_argument("--replicas", type=int, default=1, metavar="K",
                        help="hold every unit on K devices: losing one of them costs nothing (1)")
    parser.add_argument("--log-dir", default=None, metavar="DIR",
                        help="keep the replay log (the attention inputs a recovery replays) in a "
                             "file in DIR instead of memory")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="the federation key the peers hold (default: $TPFED_KEY_FILE, else "
                             "~/.config/tpfed/federation.key; local:N and emu:N peers get a fresh "
                             "key when there is none)")
    parser.add_argument("--deadline", type=float, default=5.0, metavar="SECONDS",
                        help="a peer that does not answer within this is declared lost (5)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, tokens, tokens_per_s, wire bytes, peers, "
                             "prompt_ids, generated_ids)")
    parser.add_argument("--weights", choices=("q8_0", "f32"), default="q8_0",
                        help="q8_0: int8 split across the peers (default); f32: float32 weights and "
                             "activations (in this process for now)")


def parse_ids(text: str) -> list[int]:
    """``"1,17,42"`` as token ids."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be integers separated by commas, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"need at least one token id, none negative: {text!r}")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--prompt-ids", type=parse_ids, metavar="ID,ID,...",
                        help="the prompt as token ids (BOS included if wanted), instead of text")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS")
    parser.add_argument("prompt", nargs="?", default="Once upon a time",
                        help="the prompt; - reads it from standard input (one trailing newline dropped)")


def check_run_arguments(args: argparse.Namespace) -> None:
    """One ``tpfed: error:`` line (exit 2) for values the run cannot use, before anything
    starts: a deadline that is not a positive finite number of seconds, a negative seed, fewer
    than one replica or step."""
    import math

    from tpfed.errors import TpfedError

    deadline = getattr(args, "deadline", 5.0)
    if not (math.isfinite(deadline) and deadline > 0):
        raise TpfedError(f"--deadline must be a positive, finite number of seconds, not {deadline:g}")
    seed = getattr(args, "seed", None)
    if seed is not None and seed < 0:
        raise TpfedError(f"--seed must be 0 or more, not {seed}")
    if getattr(args, "replicas", 1) < 1:
        raise TpfedError(f"--replicas must be at least 1, not {args.replicas}")
    for name in ("temperature", "top_p"):
        value = getattr(args, name, 0.0)
        if not math.isfinite(value) or value < 0:
            raise TpfedError(f"--{name.replace('_', '-')} must be a finite number of 0 or more, "
                             f"not {value:g}")


def execute(args: argparse.Namespace, prompt: str) -> int:
    from tpfed.errors import TpfedError
    from tpfed.runtime.session import RunOptions, run_sync

    check_run_arguments(args)

    opts = RunOptions(peers=args.peers, prompt=prompt, model=args.model, tokenizer=args.tokenizer,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      steps=args.steps, strategy=args.strategy, deadline_s=args.deadline,
                      prompt_ids=getattr(args, "prompt_ids", None),
                      ignore_eos=getattr(args, "ignore_eos", False),
                      weights=getattr(args, "weights", "q8_0"),
                      key_file=args.key_file, replicas=args.replicas, log_dir=args.log_dir)
    if opts.prompt_ids is not None:
        prompt = ""  # the text of the ids is in the result
    out = sys.stdout.buffer
    started = False
    pieces: list[bytes] = []  # the continuation so far, kept if the run fails

    def on_piece(piece: bytes) -> None:
        nonlocal started
        pieces.append(piece)
        if args.json:
            return
        if not started:  # the prompt is echoed once generation really runs
            out.write(prompt.encode())
            started = True
        out.write(piece)
        out.flush()

    from tpfed.commands._progress import SetupProgress

    progress = SetupProgress()  # bars on stderr when it is a terminal; status lines always
    try:
        result = run_sync(opts, on_piece=on_piece, on_status=progress.status,
                          on_phase=progress.phase, on_push=progress.push)
    except TpfedError as exc:
        progress.close()
        text = prompt + b"".join(pieces).decode("utf-8", errors="replace") if pieces else ""
        if args.json:  # the text generated so far is not lost
            print(json.dumps({"text": text, "error": str(exc)}))
        elif started:
            out.write(b"\n")  # the error line starts on a line of its own
            out.flush()
        raise
    finally:
        progress.close()
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


def read_prompt(arg: str) -> str:
    """The prompt argument, or standard input for ``-`` (``echo "The cat" | tpfed run -``)."""
    from tpfed.commands._output import text_argument

    return text_argument(arg, "the prompt")


def run(args: argparse.Namespace) -> int:
    return execute(args, read_prompt(args.prompt))
