"""``tpfed serve`` as a coroutine: load the model, start its fleet, connect to the bus, then
serve HTTP with uvicorn on the same event loop (uvloop) until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

from tpfed.errors import TpfedError
from tpfed.runtime.session import RunOptions


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TpfedError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TpfedError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def model_stem(path: Path) -> str:
    """The API name of a model file or folder: its name without the extension."""
    return path.name if path.is_dir() else path.stem


async def serve(opts: RunOptions, *, host: str = "127.0.0.1", port: int = 8000,
                bus_url: str | None = None, model_name: str | None = None) -> int:
    import uvicorn

    from tpfed.runtime.session import load_model
    from tpfed.serve.app import make_app
    from tpfed.serve.engine import Engine

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # signals are handled below, once, for the whole server
            yield

    engine = Engine(opts)
    model = await asyncio.to_thread(load_model, opts.model, opts.tokenizer)
    path = Path(opts.model) if opts.model else None
    name = model_name or (model_stem(path) if path else "stories260K")
    sock = bind(host, port)
    fleet_bus = None
    loop = asyncio.get_running_loop()
    server = Server(uvicorn.Config(make_app(engine, default_temperature=opts.temperature,
                                            default_top_p=opts.top_p),
                                   log_level="warning", lifespan="off", access_log=False,
                                   timeout_graceful_shutdown=2))
    stop = asyncio.Event()

    def on_signal() -> None:
        stop.set()
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await engine.add_model(name, model, model_path=path,
                               source={"path": str(path) if path else "stories260K"})
        await engine.warm_up(name)
        if bus_url:
            from tpfed.serve.registry import FleetBus

            fleet_bus = FleetBus(bus_url, engine)
            await fleet_bus.start()
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            h, p = sock.getsockname()[:2]
            shown = f"[{h}]" if ":" in h else h
            print(f"tpfed serve: listening on http://{shown}:{p} (model {name}; dashboard at /, "
                  f"OpenAI API at /v1)", flush=True)
        await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if fleet_bus is not None:
            await fleet_bus.close()
        await engine.close()
        sock.close()
        print("tpfed serve: stopped", file=sys.stderr, flush=True)
    return 0
