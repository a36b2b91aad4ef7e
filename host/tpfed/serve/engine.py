"""The models ``tpfed serve`` keeps and the generation loop that serves them.

Each served model has one :class:`~tpfed.runtime.session.Fleet`: peers connected, planned and
holding their shares for as long as the server runs, so a request pushes no weights. Requests
are answered one at a time per fleet (its lock); waiting ones queue.

**Prefix reuse.** The devices keep the KV cache of the last sequence. When a new prompt begins
with tokens the fleet has already fed at the same positions (a chat's history, a repeated
prompt), those positions are not run again: generation resumes at the first position that
differs. The coordinator's activation history is cut at the same position, so a lost device's
cache can still be rebuilt by replay. The text is the same as from a fresh start (the cached
keys and values were computed from the same tokens at the same positions with the same plan).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tpfed.errors import PeerError, TpfedError
from tpfed.model.sampling import Sampler
from tpfed.runtime.coordinator import GenerationStats
from tpfed.runtime.session import Fleet, RunOptions
from tpfed.serve.metrics import Metrics, StageTimer, instrument, stage_owners
from tpfed.serve.text import ChatFormat, TextStream


class RequestError(TpfedError, ValueError):
    """A request that cannot be served as asked (HTTP 400)."""


class Unavailable(TpfedError):
    """The model's fleet cannot serve now (HTTP 503)."""


@dataclass
class GenParams:
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None
    stops: Sequence[str] = ()
    lstrip: bool = False  # chat replies: no leading whitespace


@dataclass
class Outcome:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    ttft_s: float | None
    seconds: float
    positions: int
    reused: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ServedModel:
    name: str
    fleet: Fleet
    chat: ChatFormat
    created: int
    source: dict
    timer: StageTimer | None = None
    load_s: float = 0.0
    weight_bytes: int = 0
    fed: list[int] = field(default_factory=list)  # tokens whose KV the devices hold, by position
    broken: str | None = None
    requests: int = 0
    tokens: int = 0
    last_tokens_per_s: float = 0.0
    waiting: int = 0
    busy: bool = False

    @property
    def tokenizer(self):
        return self.fleet.tokenizer


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def options_with(base: RunOptions, **kw) -> RunOptions:
    """``base`` with the fields of ``kw`` that RunOptions has (``key_file`` once it exists)."""
    names = {f.name for f in dataclasses.fields(RunOptions)}
    if kw.get("key_file") and "key_file" not in names:
        raise TpfedError("--key-file: this build's runtime does not take a federation key yet")
    return dataclasses.replace(base, **{k: v for k, v in kw.items() if k in names})


class Engine:
    """Served models, their metrics and what the dashboard shows."""

    def __init__(self, opts: RunOptions, metrics: Metrics | None = None, *,
                 log: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.metrics = metrics or Metrics()
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None
        self.events: deque[dict] = deque(maxlen=100)
        self.bus_devices: dict[str, dict] = {}
        self.bus_models: dict[str, dict] = {}
        self.bus_url: str | None = None
        self.version = 0  # bumped on every change the dashboard shows
        self.started = time.time()
        self.lost: dict[str, int] = {}
        self.recovered: dict[str, int] = {}
        self._print = log or (lambda msg: print(f"tpfed serve: {msg}", file=sys.stderr, flush=True))
        # hooks for planning devices in and out live (the membership work): called with the
        # device's announcement (join) or id (leave)
        self.on_device_join: list[Callable[[dict], None]] = [self.join_announced]
        self.on_device_leave: list[Callable[[str], None]] = [self.leave_announced]
        self.bus_members: dict[str, tuple[str, str]] = {}  # bus id -> (model, device name)
        self._joins: dict[str, asyncio.Task] = {}  # bus id -> its join in progress
        self._settling: set[asyncio.Task] = set()

    # -- log and events -------------------------------------------------------------------
    def log(self, msg: str, kind: str = "info") -> None:
        self._print(msg)
        self.events.append({"t": time.time(), "kind": kind, "text": msg})
        self.version += 1

    # -- models ---------------------------------------------------------------------------
    async def add_model(self, name: str, model, *, source: dict | None = None,
                        model_path=None, load_s: float = 0.0, peers: str | None = None) -> ServedModel:
        """Start a fleet for ``model`` ((Q8Model, tokenizer)) and list it as ``name``."""
        if model[1] is None:
            raise TpfedError(f"model {name} comes without a tokenizer: tpfed serve needs one "
                             "(--tokenizer)")
        opts = options_with(self.opts, peers=peers or self.opts.peers)
        holder: dict[str, ServedModel] = {}
        pushed: dict[str, int] = {}

        def on_push(device: str, n: int) -> None:
            pushed[device] = pushed.get(device, 0) + n
            self.metrics.weight_bytes.labels(model=name, device=device).inc(n)
            if name in holder:
                holder[name].weight_bytes += n

        fleet = Fleet(opts, model=model, on_status=lambda m: self.log(f"{name}: {m}"), on_push=on_push)
        await fleet.start()
        served = ServedModel(name=name, fleet=fleet, chat=ChatFormat.for_model(model_path),
                             created=int(time.time()), source=source or {}, load_s=load_s,
                             weight_bytes=sum(pushed.values()))
        holder[name] = served
        served.timer = StageTimer(self.metrics, name, stage_owners(fleet.plan))
        instrument(fleet.coord, served.timer)
        self._watch(served)
        old = self.models.get(name)
        self.models[name] = served
        if self.default is None:
            self.default = name
        self.metrics.devices.labels(model=name).set(len(fleet.plan.devices))
        self.log(f"model {name} ready: {len(fleet.plan.devices)} devices, "
                 f"{served.weight_bytes} weight bytes pushed, chat template: {served.chat.source}")
        if old is not None:
            await self._close_model(old)
        return served

    async def warm_up(self, name: str) -> None:
        """One short generation, so the first request does not pay for first-use costs (code
        paths, caches; ~40 ms on a small VM) and a fleet that cannot generate fails at start."""
        t0 = time.perf_counter()
        await self.generate(name, [], GenParams(max_tokens=2))
        self.log(f"{name}: warmed up in {1e3 * (time.perf_counter() - t0):.0f} ms")

    async def remove_model(self, name: str) -> None:
        m = self.models.pop(name, None)
        if m is None:
            return
        if self.default == name:
            self.default = next(iter(self.models), None)
        self.metrics.devices.labels(model=name).set(0)
        await self._close_model(m)
        self.log(f"model {name} removed")

    async def _close_model(self, m: ServedModel) -> None:
        async with m.fleet._lock:  # let a running generation finish
            await m.fleet.close()

    async def close(self) -> None:
        for name in list(self.models):
            m = self.models.pop(name)
            await m.fleet.close()

    def get(self, name: str | None) -> ServedModel:
        if name in (None, "", "default") and self.default is not None:
            name = self.default
        m = self.models.get(name)
        if m is None:
            raise LookupError(f"model {name!r} is not served (have: {', '.join(self.models) or 'none'})")
        return m

    # -- devices --------------------------------------------------------------------------
    def device_lost(self, model: str, device: str, why: str = "") -> None:
        """A device stopped answering (called here on a failed generation; the coordinator's
        recovery calls it too once it has one)."""
        self.lost[device] = self.lost.get(device, 0) + 1
        self.metrics.lost.labels(device=device).inc()
        self.log(f"{model}: device {device} lost{': ' + why if why else ''}", "lost")

    def device_recovered(self, model: str, device: str) -> None:
        self.recovered[device] = self.recovered.get(device, 0) + 1
        self.metrics.recovered.labels(device=device).inc()
        self.log(f"{model}: device {device} recovered", "recovered")

    def _watch(self, m: ServedModel) -> None:
        """Count the fleet's losses and recoveries, log its joins, and follow its plan as
        devices come and go (the coordinator calls these between tokens)."""
        coord = m.fleet.coord

        def on_recovery(rec: dict) -> None:
            where = "a replica" if rec.get("replica") else f"at position {rec.get('position')}"
            self.device_lost(m.name, rec["device"], where)
            if not rec.get("during_rebalance"):
                self.device_recovered(m.name, rec["device"])
            self._plan_changed(m)

        def on_join(rec: dict) -> None:
            if rec.get("error"):
                self.log(f"{m.name}: device {rec['device']} {rec['error']}", "error")
                return
            self.log(f"{m.name}: device {rec['device']} joined at position {rec['position']}: "
                     f"{rec['kv_groups']} KV groups + {rec['mlp_columns']} MLP columns, "
                     f"{rec['bytes_moved']} weight bytes pushed, {rec['seconds'] * 1e3:.0f} ms", "join")
            self._plan_changed(m)

        coord.on_recovery = on_recovery
        coord.on_join = on_join

    def _plan_changed(self, m: ServedModel) -> None:
        plan = m.fleet.plan
        if m.timer is not None:
            m.timer.owners = stage_owners(plan)
        self.metrics.devices.labels(model=m.name).set(len(plan.devices))
        self.version += 1

    def join_announced(self, info: dict) -> None:
        """A device announced on the bus: it joins the default model's fleet (a device holds
        one share set at a time), planned in at once when the fleet is idle, else at the
        next token boundary. Devices the fleet already has are left as they are."""
        dev_id = str(info.get("id"))
        uri = info.get("uri")
        if not uri or self.default is None or dev_id in self._joins:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to join into
            task = asyncio.get_running_loop().create_task(self._join(dev_id, uri))
            self._joins[dev_id] = task
            task.add_done_callback(lambda _t: self._joins.pop(dev_id, None))

    async def _join(self, dev_id: str, uri: str) -> None:
        m = self.models.get(self.default or "")
        if m is None or m.fleet.coord is None:
            return
        coord = m.fleet.coord
        try:
            from tpfed.runtime.peerspec import parse_peers
            from tpfed.transport import resolve_udp

            spec = parse_peers(uri)
            if len(spec) != 1 or spec[0].kind not in ("udp", "serial", "socket"):
                raise TpfedError(f"cannot reach {uri!r} (udp://, serial:// or socket:// expected)")
            here = {getattr(p.link, "uri", "") for p in (*coord.peers, *coord.joining)}
            if spec[0].kind == "udp":
                addr = await resolve_udp(spec[0].host, spec[0].port)
                if addr in {getattr(p.link, "addr", None) for p in (*coord.peers, *coord.joining)}:
                    return
            if spec[0].uri in here or uri in here:
                return
            names = await m.fleet.join(uri)
        except (TpfedError, OSError, ValueError) as exc:
            self.log(f"bus: device {dev_id} could not join {m.name}: {exc}", "error")
            return
        if names:
            self.bus_members[dev_id] = (m.name, names[0])
            self.log(f"bus: device {dev_id} joined {m.name} as {names[0]}", "join")

    def leave_announced(self, dev_id: str) -> None:
        """A device gone from the bus (goodbye or last will) is planned out of its fleet at
        the next token boundary, without waiting for its deadline."""
        task = self._joins.pop(dev_id, None)
        if task is not None:
            task.cancel()
        model, name = self.bus_members.pop(dev_id, (None, None))
        m = self.models.get(model or "")
        if m is not None and m.fleet.coord is not None and m.fleet.coord.leave(name):
            self.log(f"{m.name}: device {name} left: planned out", "leave")
            task = asyncio.get_running_loop().create_task(self._settle(m))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, m: ServedModel) -> None:
        try:
            await m.fleet.settle()
        except TpfedError as exc:
            m.broken = str(exc)
            self.log(f"{m.name}: {exc}", "error")

    def bus_device_join(self, info: dict) -> None:
        dev_id = str(info.get("id"))
        known = dev_id in self.bus_devices
        self.bus_devices[dev_id] = {**info, "seen": time.time()}
        self.metrics.bus_devices.set(len(self.bus_devices))
        if not known:
            self.metrics.bus_joins.inc()
            self.log(f"bus: device {dev_id} online at {info.get('uri', '?')} "
                     f"({info.get('device_class', '?')}, {float(info.get('int8_macs') or 0) / 1e9:.2f} GMAC/s)",
                     "join")
        for hook in self.on_device_join:
            hook(info)

    def bus_device_leave(self, dev_id: str, why: str = "offline") -> None:
        if self.bus_devices.pop(dev_id, None) is None:
            return
        self.metrics.bus_devices.set(len(self.bus_devices))
        self.metrics.bus_leaves.inc()
        self.log(f"bus: device {dev_id} {why}", "leave")
        for hook in self.on_device_leave:
            hook(dev_id)

    # -- generation -----------------------------------------------------------------------
    def prepare(self, m: ServedModel, prompt_ids: Sequence[int],
                params: GenParams) -> tuple[list[int], Sampler, int]:
        """Check a request before it queues: the prompt ids (BOS first), the sampler, the
        context; :class:`RequestError` or :class:`Unavailable` if it cannot be served."""
        if m.broken:
            raise Unavailable(f"model {m.name} cannot serve: {m.broken}")
        tok = m.tokenizer
        bos = tok.bos_id if tok.bos_id >= 0 else None
        ids = list(prompt_ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = tok.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in 0..{vocab - 1}")
        steps = m.fleet.seq_len
        if len(ids) > steps:
            raise RequestError(f"the prompt is {len(ids)} tokens; this server's context is {steps} "
                               "positions (tpfed serve --steps)")
        if params.max_tokens is not None and params.max_tokens < 0:
            raise RequestError("max_tokens must be >= 0")
        try:
            sampler = Sampler(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return ids, sampler, steps

    async def generate(self, name: str | None, prompt_ids: Sequence[int], params: GenParams, *,
                       on_text: Callable[[str], None] | None = None,
                       cancelled: Callable[[], bool] = lambda: False,
                       t_request: float | None = None) -> Outcome:
        """Generate from ``prompt_ids`` on model ``name``; ``on_text`` receives the text as it
        becomes safe to emit (stop sequences are held back and cut). ``cancelled()`` true ends
        generation at the next token (a client that went away)."""
        m = self.get(name)
        t_request = t_request or time.perf_counter()
        ids, sampler, steps = self.prepare(m, prompt_ids, params)
        tok = m.tokenizer
        stop_ids = getattr(m.fleet, "stop_ids", None)  # the runtime's rule for the model
        if stop_ids is None:
            stop_ids = (tok.bos_id, tok.eos_id)
        stop_ids = {t for t in stop_ids if t is not None and t >= 0}
        stream = TextStream(params.stops, lstrip=params.lstrip)
        out: list[int] = []
        first: list[float] = []
        emit = on_text or (lambda s: None)

        def on_token(prev: int, token: int) -> bool:
            if not first:
                first.append(time.perf_counter())
            out.append(token)
            m.tokens += 1
            self.version += 1
            text = stream.feed(tok.piece(prev, token))
            if text:
                emit(text)
            return stream.stopped or cancelled()

        m.waiting += 1
        self.metrics.queue.inc()
        self.version += 1
        queued = True
        try:
            async with m.fleet._lock:
                m.waiting -= 1
                self.metrics.queue.dec()
                queued = False
                m.busy = True
                try:
                    if m.broken:
                        raise Unavailable(f"model {m.name} cannot serve: {m.broken}")
                    if params.max_tokens == 0:
                        stats, reused, ended = GenerationStats(prompt_tokens=len(ids)), 0, "max"
                    else:
                        stats, reused, ended = await self._loop(m, ids, sampler, steps,
                                                                params.max_tokens, stop_ids, on_token)
                finally:
                    m.busy = False
        except PeerError as exc:
            m.broken = str(exc)
            device = next((p.name for p in m.fleet.coord.peers if p.name in str(exc)), "unknown")
            self.device_lost(m.name, device, str(exc))
            raise Unavailable(f"model {m.name}: {exc}") from None
        finally:
            if queued:  # cancelled while waiting for the fleet
                m.waiting -= 1
                self.metrics.queue.dec()
        tail = stream.flush()
        if tail:
            emit(tail)
        finish = "stop" if ended == "stop_id" or stream.stopped else "length"
        ttft = first[0] - t_request if first else None
        m.requests += 1
        m.last_tokens_per_s = stats.tokens_per_s
        mt = self.metrics
        mt.tokens.labels(model=m.name).inc(len(out))
        mt.prompt_tokens.labels(model=m.name).inc(len(ids))
        mt.positions.labels(model=m.name).inc(stats.tokens)
        mt.positions_reused.labels(model=m.name).inc(reused)
        mt.tokens_per_s.labels(model=m.name).set(stats.tokens_per_s)
        if ttft is not None:
            mt.ttft.labels(model=m.name).observe(ttft)
        if m.timer is not None:
            m.timer.flush(stats.seconds)
        self.version += 1
        return Outcome(text=stream.text, prompt_tokens=len(ids), completion_tokens=len(out),
                       finish_reason=finish, ttft_s=ttft, seconds=stats.seconds,
                       positions=stats.tokens, reused=reused, token_ids=out)

    async def _loop(self, m: ServedModel, ids: list[int], sampler: Sampler, steps: int,
                    max_new: int | None, stop_ids: set[int],
                    on_token: Callable[[int, int], bool]) -> tuple[GenerationStats, int, str]:
        """llama2.c's loop (as :func:`tpfed.runtime.session.generate_ids`), resuming after the
        prefix the devices already hold (see the module docstring). Called under the lock."""
        coord = m.fleet.coord
        k = min(common_prefix(m.fed, ids), len(ids) - 1)  # the last prompt token is always fed
        if k == 0:
            coord.reset()
        fed = m.fed = m.fed[:k]
        coord.stats = stats = GenerationStats(prompt_tokens=len(ids))
        made = 0
        token = ids[k]
        t0 = time.perf_counter()
        pos = k - 1
        ended = "context"
        try:
            for pos in range(k, steps):
                logits = await coord.forward_async(token, pos)
                fed.append(token)
                if pos + 1 < len(ids):
                    nxt = ids[pos + 1]
                else:
                    nxt = sampler.sample(logits)
                    if nxt in stop_ids:
                        ended = "stop_id"
                        break
                    made += 1
                    if on_token(token, nxt):
                        ended = "hook"
                        break
                    if max_new is not None and made >= max_new:
                        ended = "max"
                        break
                token = nxt
        except BaseException:
            m.fed = []  # what the devices hold is no longer known
            raise
        stats.seconds = time.perf_counter() - t0
        stats.tokens = pos + 1 - k
        return stats, k, ended

    # -- what the dashboard and /health show ------------------------------------------------
    def state(self) -> dict:
        models = []
        for m in self.models.values():
            fleet, plan, coord = m.fleet, m.fleet.plan, m.fleet.coord
            shares = {d.name: d for d in plan.devices}
            devices = []
            for p in coord.peers:
                h, spec = p.hello, p.spec()
                share = shares.get(p.name)
                t = m.timer
                devices.append({
                    "name": p.name, "uri": getattr(p.link, "uri", ""),
                    "link": _link_kind(getattr(p.link, "uri", "")),
                    "device_class": spec.device_class, "int8_macs": h.get("int8_macs", 0),
                    "arena_kb": h.get("arena_kb", 0), "battery_pct": spec.battery_pct,
                    "temperature_c": spec.temperature_c,
                    "latency_us": round(p.latency_s * 1e6, 1),
                    "bandwidth_MBps": round(p.bandwidth_Bps / 1e6, 2),
                    "kv_groups": share.kv_units if share else 0,
                    "mlp_columns": share.mlp_columns if share else 0,
                    "memory_bytes": share.memory_bytes if share else 0,
                    "predicted_busy_ms": round(share.busy_ms, 4) if share else 0,
                    "attention_ms": _r(t.mean_stage_ms(p.name, 0)) if t else None,
                    "mlp_ms": _r(t.mean_stage_ms(p.name, 1)) if t else None,
                    "utilisation": round(t.last_util.get(p.name, 0.0), 3) if t else None,
                    "lost": self.lost.get(p.name, 0), "recovered": self.recovered.get(p.name, 0),
                })
            plan_json = {
                "strategy": plan.strategy, "seq_len": plan.seq_len,
                "n_layers": plan.model.n_layers, "n_kv_groups": plan.model.n_groups,
                "hidden_dim": plan.model.hidden_dim,
                "devices": [{"name": d.name, "layers": {
                    str(layer): {"kv_groups": list(s.kv_groups), "mlp_ranges": [list(r) for r in s.mlp_ranges]}
                    for layer, s in sorted(d.layers.items())}} for d in plan.devices],
                "excluded": [{"name": n, "why": w} for n, w in plan.excluded],
                "makespan_ms": round(plan.makespan_ms, 4),
            }
            models.append({"name": m.name, "created": m.created, "source": m.source,
                           "weight_bytes": m.weight_bytes, "setup_s": round(fleet.setup_s, 3),
                           "load_s": round(m.load_s, 3), "requests": m.requests, "tokens": m.tokens,
                           "tokens_per_s": round(m.last_tokens_per_s, 1), "waiting": m.waiting,
                           "busy": m.busy, "broken": m.broken, "chat_template": m.chat.source,
                           "devices": devices, "plan": plan_json})
        return {"version": self.version, "uptime_s": round(time.time() - self.started, 1),
                "default_model": self.default, "models": models,
                "lost": sum(self.lost.values()), "recovered": sum(self.recovered.values()),
                "bus": {"url": self.bus_url, "devices": list(self.bus_devices.values()),
                        "models": self.bus_models},
                "events": list(self.events)[-30:]}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _link_kind(uri: str) -> str:
    m = re.match(r"^([a-z]+)://", uri or "")
    return m.group(1) if m else (uri or "?")
