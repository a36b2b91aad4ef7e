"""The HTTP side of ``tpfed serve`` (Starlette): the OpenAI-compatible API, ``/health``,
``/metrics``, and the dashboard (``/``, its state at ``/api/state`` and live over SSE at
``/api/events``). Everything the page needs is served from :mod:`tpfed.serve`'s ``static``
folder; nothing comes from a CDN."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tpfed.serve.engine import Engine, GenParams, RequestError, Unavailable
from tpfed.serve.text import ChatError

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _num(body: dict, key: str, default, kind=float, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
        raise RequestError(f"{key} must be a number")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"{key} must be in {lo}..{hi}")
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > 16:
            raise RequestError("at most 16 stop sequences")
        return stop
    raise RequestError("stop must be a string or a list of strings")


def make_app(engine: Engine, *, default_temperature: float = 0.0, default_top_p: float = 0.9) -> Starlette:
    metrics = engine.metrics

    def params(body: dict, extra_stops=(), lstrip: bool = False) -> GenParams:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return GenParams(
            max_tokens=_num({"max_tokens": max_tokens}, "max_tokens", None, int, lo=0),
            temperature=_num(body, "temperature", default_temperature, float, 0.0, 2.0),
            top_p=_num(body, "top_p", default_top_p, float, 0.0, 1.0),
            seed=_num(body, "seed", None, int),
            stops=[*_stops(body), *extra_stops], lstrip=lstrip,
        )

    async def read_json(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise RequestError("n must be 1")
        return body

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

    def guarded(endpoint: str):
        """Errors as OpenAI's error objects, counted per endpoint and status."""
        def wrap(handler):
            async def run(request: Request) -> Response:
                try:
                    resp = await handler(request)
                except RequestError as exc:
                    resp = error(400, str(exc))
                except ChatError as exc:
                    resp = error(400, str(exc), param="messages")
                except LookupError as exc:
                    resp = error(404, str(exc).strip("'\""), param="model", code="model_not_found")
                except Unavailable as exc:
                    resp = error(503, str(exc), kind="server_error")
                metrics.requests.labels(endpoint=endpoint, status=str(resp.status_code)).inc()
                return resp
            return run
        return wrap

    async def generation(request: Request, body: dict, kind: str, prompts: list[list[int]],
                         gp: GenParams, echo: list[str] | None = None) -> Response:
        t_request = time.perf_counter()
        m = engine.get(body.get("model"))
        for ids in prompts:  # refused here, before anything streams or queues
            engine.prepare(m, ids, gp)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        chat = kind == "chat"
        obj = "chat.completion" if chat else "text_completion"

        def choice(i: int, text: str | None, finish: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                content = {} if text is None else {"content": text}
                if not delta:
                    content = {"role": "assistant", "content": text, "refusal": None}
                return {"index": i, key: content, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        if not body.get("stream"):
            choices, prompt_n, completion_n = [], 0, 0
            for i, ids in enumerate(prompts):
                out = await engine.generate(m.name, ids, gp, t_request=t_request)
                text = (echo[i] if echo else "") + out.text
                choices.append(choice(i, text, out.finish_reason, False))
                prompt_n += out.prompt_tokens
                completion_n += out.completion_tokens
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": m.name,
                                 "choices": choices, "usage": usage(prompt_n, completion_n),
                                 "system_fingerprint": None})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra) -> bytes:
            return sse({"id": rid, "object": chunk_obj, "created": created, "model": m.name,
                        "choices": choices, **extra})

        async def events():
            gone = False
            prompt_n = completion_n = 0
            try:
                for i, ids in enumerate(prompts):
                    if chat:
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    elif echo:
                        yield chunk([choice(i, echo[i], None, True)])
                    queue: asyncio.Queue = asyncio.Queue()
                    task = asyncio.create_task(engine.generate(
                        m.name, ids, gp, on_text=queue.put_nowait, cancelled=lambda: gone,
                        t_request=t_request))
                    task.add_done_callback(lambda _t, q=queue: q.put_nowait(None))
                    while (piece := await queue.get()) is not None:
                        yield chunk([choice(i, piece, None, True)])
                    try:
                        out = task.result()
                    except (Unavailable, RequestError) as exc:
                        yield sse({"error": {"message": str(exc), "type": "server_error",
                                             "param": None, "code": None}})
                        return
                    prompt_n += out.prompt_tokens
                    completion_n += out.completion_tokens
                    yield chunk([choice(i, None if chat else "", out.finish_reason, True)])
                if include_usage:
                    yield chunk([], usage=usage(prompt_n, completion_n))
                yield b"data: [DONE]\n\n"
            finally:
                gone = True  # a client gone mid-stream: generation stops at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @guarded("completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        m = engine.get(body.get("model"))
        prompt = body.get("prompt", "")
        tok = m.tokenizer
        if isinstance(prompt, str):
            texts, prompts = [prompt], [tok.encode(prompt, bos=True)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            texts, prompts = None, [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts, prompts = list(prompt), [tok.encode(p, bos=True) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            texts, prompts = None, [list(p) for p in prompt]
        else:
            raise RequestError("prompt must be a string, a list of strings, a list of token ids "
                               "or a list of such lists")
        if len(prompts) > 16:
            raise RequestError("at most 16 prompts per request")
        echo = None
        if body.get("echo"):
            echo = texts or [tok.decode(p) for p in prompts]
        return await generation(request, body, "completion", prompts, params(body), echo)

    @guarded("chat")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        m = engine.get(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list")
        ids = m.chat.encode(m.tokenizer, messages)
        return await generation(request, body, "chat", [ids], params(body, m.chat.stops, lstrip=True))

    async def models(request: Request) -> Response:
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "tpfed"}
                for m in engine.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        m = engine.models.get(name)
        if m is None:
            return error(404, f"model {name!r} is not served", param="model", code="model_not_found")
        return JSONResponse({"id": m.name, "object": "model", "created": m.created, "owned_by": "tpfed"})

    async def health(request: Request) -> Response:
        ok = bool(engine.models) and all(not m.broken for m in engine.models.values())
        body = {"status": "ok" if ok else "unavailable",
                "models": {m.name: {"devices": len(m.fleet.plan.devices), "broken": m.broken,
                                    "waiting": m.waiting}
                           for m in engine.models.values()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    async def state(request: Request) -> Response:
        return JSONResponse(engine.state())

    async def events(request: Request) -> Response:
        async def stream():
            last, last_sent = -1, 0.0
            while True:
                now = time.monotonic()
                if engine.version != last or now - last_sent > 5:
                    last, last_sent = engine.version, now
                    yield f"event: state\ndata: {json.dumps(engine.state())}\n\n".encode()
                await asyncio.sleep(0.5)
        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics_endpoint),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/state", state),
        Route("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)
