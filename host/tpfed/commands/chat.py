"""``tpfed chat``: talk to the model split across peers, streaming, with history."""

from __future__ import annotations

import argparse

NAME = "chat"
HELP = ("Interactive chat with the model split across peers: replies stream, the conversation "
        "is kept (the model's chat template, or plain User:/Assistant: turns); Ctrl-D exits.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tpfed.commands.run import add_run_arguments

    add_run_arguments(parser, peers_required=False)
    parser.add_argument("--system", default=None, help="a system message to begin with")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest reply in tokens (128)")


def run(args: argparse.Namespace) -> int:
    from tpfed.runtime import aio
    from tpfed.runtime.session import RunOptions
    from tpfed.serve.engine import options_with

    opts = options_with(RunOptions(peers=args.peers), model=args.model, tokenizer=args.tokenizer,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        steps=args.steps, strategy=args.strategy, deadline_s=args.deadline,
                        key_file=args.key_file)
    return aio.run(_chat(opts, args))


async def _chat(opts, args) -> int:
    import asyncio
    import sys
    from pathlib import Path

    from tpfed.runtime.session import load_model
    from tpfed.serve.engine import Engine, GenParams, RequestError

    def status(msg: str) -> None:
        print(f"tpfed: {msg}", file=sys.stderr, flush=True)

    from tpfed.serve.server import model_stem

    model = load_model(opts.model, opts.tokenizer)
    path = Path(opts.model) if opts.model else None
    engine = Engine(opts, log=status)
    tty = sys.stdin.isatty()
    out = sys.stdout
    try:
        m = await engine.add_model(model_stem(path) if path else "stories260K", model, model_path=path)
        status(f"chat with {m.name} ({m.chat.source} template); Ctrl-D to leave, /reset to forget")
        history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        while True:
            try:
                line = await asyncio.to_thread(input, "> " if tty else "")
            except EOFError:
                if tty:
                    print(file=sys.stderr)
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = history[:1] if args.system else []
                status("conversation forgotten")
                continue
            history.append({"role": "user", "content": line})
            # the oldest turns go first when the conversation outgrows the context
            while True:
                ids = m.chat.encode(m.tokenizer, history)
                if len(ids) < m.fleet.seq_len - 1 or len(history) <= 1 + bool(args.system):
                    break
                del history[int(bool(args.system)):int(bool(args.system)) + 2]
            params = GenParams(max_tokens=args.max_tokens, temperature=opts.temperature,
                               top_p=opts.top_p, seed=opts.seed, stops=m.chat.stops, lstrip=True)

            def show(text: str) -> None:
                out.write(text)
                out.flush()

            try:
                outcome = await engine.generate(m.name, ids, params, on_text=show)
            except RequestError as exc:
                status(str(exc))
                history.pop()
                continue
            out.write("\n")
            out.flush()
            history.append({"role": "assistant", "content": outcome.text})
    finally:
        await engine.close()
    return 0
