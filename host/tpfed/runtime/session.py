"""One generation run end to end: find the model, reach or start the peers, plan, push the
shards and generate, streaming text as it comes. Shared by ``tpfed run``, ``tpfed demo`` and
``tpfed bench e2e``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tpfed.compute.int8_forward import Int8Transformer, Q8Model
from tpfed.errors import PeerError, TpfedError
from tpfed.model.sampling import Sampler
from tpfed.model.tokenizer import Tokenizer
from tpfed.planning.fleet import DeviceSpec
from tpfed.runtime import aio
from tpfed.runtime.coordinator import Coordinator, GenerationStats, Link
from tpfed.runtime.peerspec import PeerSpec, parse_peers

BOS = 1


@dataclass
class RunOptions:
    peers: str
    prompt: str = "Once upon a time"
    model: str | None = None
    tokenizer: str | None = None
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None
    steps: int = 256
    strategy: str = "round-robin"
    deadline_s: float = 5.0
    mtu: int = 1400
    key_file: str | None = None  # the federation key (see tpfed.runtime.keys)
    replicas: int = 1  # every unit on this many devices
    provision: bool = False  # serial/socket peers are boards booted without a key: give them ours
    log_dir: str | None = None  # keep the replay log in a file there instead of memory
    prompt_ids: list[int] | None = None  # the prompt as token ids (instead of text)
    ignore_eos: bool = False  # generate past the model's EOS
    weights: str = "q8_0"  # "q8_0" (split across the peers) or "f32" (see run_f32)


@dataclass
class RunResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    peers: list[dict] = field(default_factory=list)
    plan: object | None = None
    setup_s: float = 0.0
    devices: list[DeviceSpec] = field(default_factory=list)
    """The peers as the planner saw them (HELLO figures and measured links), in peer order."""
    prompt_ids: list[int] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    weight_bytes_pushed: int = 0
    """Share bytes the coordinator pushed so far (set-up and recoveries)."""
    replay_log_bytes: int = 0
    """What the coordinator's replay log (the attention inputs of the sequence) takes."""
    replay_log_bytes_per_position: int = 0
    weight_bytes_skipped: int = 0
    """Share bytes it did not push because the peers held them already (kept by sha256)."""

    def to_json(self) -> dict:
        s = self.stats
        return {
            "text": self.text,
            "tokens": s.tokens,
            "prompt_tokens": s.prompt_tokens,
            "tokens_per_s": round(s.tokens_per_s, 2),
            "wire_bytes_per_token": round(s.wire_bytes_per_token, 1),
            "min_wire_bytes_per_token": round(s.min_wire_bytes_per_token, 1),
            "peers": self.peers,
            "setup_s": round(self.setup_s, 3),
            "prompt_ids": self.prompt_ids,
            "generated_ids": self.generated_ids,
            "weight_bytes_pushed": self.weight_bytes_pushed,
            "replay_log_bytes": self.replay_log_bytes,
            "replay_log_bytes_per_position": self.replay_log_bytes_per_position,
            "weight_bytes_skipped": self.weight_bytes_skipped,
            "resends": s.resends,
            "recoveries": s.recoveries,
            "joins": s.joins,
        }


def load_model(model: str | None, tokenizer: str | None) -> tuple[Q8Model, Tokenizer | None]:
    """The int8 model and its tokenizer (None when the model comes without one and none is
    given) from any format :mod:`tpfed.model.formats` reads; without ``model``, stories260K
    (found or fetched)."""
    if model is not None:
        from tpfed.compute.int8_forward import LLAMA_FAMILY, load_hf_q8
        from tpfed.model.formats import _hf_tokenizer, detect_format, load_tokenizer
        from tpfed.model.hf import read_hf_config

        fmt, where = detect_format(model)
        if fmt == "hf" and read_hf_config(where)[0].arch in LLAMA_FAMILY:
            q8 = load_hf_q8(where)  # streamed from the memory-mapped files, no float32 copy
            tok = load_tokenizer(tokenizer, q8.config) if tokenizer else _hf_tokenizer(where, q8.config)
            return q8, tok
    return _q8_of(load_loaded(model, tokenizer))


def load_loaded(model: str | None, tokenizer: str | None):
    """:func:`tpfed.model.formats.load_float_model` of ``model`` (stories260K by default)."""
    from tpfed.model.formats import load_float_model

    if model is None:
        from tpfed.model.fetch import locate_model

        files = locate_model(None, tokenizer)
        model, tokenizer = str(files.model), str(files.tokenizer)
    return load_float_model(model, tokenizer)


def _q8_of(loaded) -> tuple[Q8Model, Tokenizer | None]:
    return Q8Model.from_weights(loaded.weights), loaded.tokenizer


def stop_ids_for(config) -> tuple[int, ...]:
    """Where generation stops: the model's EOS, and BOS for llama2.c's models (run.c stops at
    BOS, the story separator)."""
    ids = {config.eos_id} if config.eos_id >= 0 else set()
    if config.arch == "llama" and config.bos_id == BOS:
        ids.add(BOS)
    return tuple(sorted(ids))


LOOPBACK_MTU = 65000  # loopback carries 64 KiB datagrams: no fragments between local processes


def federation_key(specs: Sequence[PeerSpec], key_file: str | None) -> bytes:
    """The key this coordinator proves to its peers: the one given (``--key-file``,
    ``$TPFED_KEY_FILE``, the default file), or, when every peer is one this process starts
    (local processes, emulated boards), a fresh random key for the run."""
    from tpfed.protocol import auth
    from tpfed.runtime import keys

    key = keys.find_key(key_file)
    if key is not None:
        return key
    foreign = [s.uri for s in specs if s.kind not in ("self", "local", "emu")]
    if foreign:
        raise TpfedError(f"peers {', '.join(foreign)} need the federation key they hold: --key-file "
                         f"PATH or ${keys.ENV} (a `tpfed peer` on loopback writes one to "
                         f"{keys.default_key_path()})")
    return auth.new_key()


async def open_links(specs: Sequence[PeerSpec], stack: contextlib.AsyncExitStack,
                     *, mtu: int = 1400, key: bytes | None = None,
                     provision: bool = False, endpoints: dict | None = None,
                     first_local: int = 0) -> list[Link]:
    """Links to every peer of ``specs``, in order; local peers and emulated boards are started
    here and stopped when ``stack`` closes. UDP peers share one socket per address family (local
    peers one on loopback), so the coordinator can reach a stage's peers with one system call;
    ``endpoints`` keeps those sockets for later calls (a fleet's joins). Local peers are named
    from ``local-{first_local}`` on."""
    from tpfed.transport import UdpEndpoint, open_serial_link, resolve_udp

    n_local = sum(1 for s in specs if s.kind == "local")
    local_uris: list[str] = []
    emu_urls: list[str] = []
    if n_local:
        from tpfed.runtime.localpeers import LocalPeers

        local_uris = await stack.enter_async_context(
            LocalPeers(n_local, extra_args=("--mtu", str(LOOPBACK_MTU)), key=key, first=first_local))
    if any(s.kind == "emu" for s in specs):
        from tpfed.runtime.emulator import DEFAULT_ENV, EmulatedBoards

        emu_envs = [s.device or DEFAULT_ENV for s in specs if s.kind == "emu"]
        pools: dict[str, list[str]] = {}
        for env in dict.fromkeys(emu_envs):
            boards = await asyncio.to_thread(stack.enter_context,
                                             EmulatedBoards(emu_envs.count(env), env=env))
            pools[env] = [b.url for b in boards]
        emu_urls = [pools[env].pop(0) for env in emu_envs]  # in the order the specs name them
    endpoints = {} if endpoints is None else endpoints

    async def endpoint(host: str, ep_mtu: int) -> UdpEndpoint:
        if host not in endpoints:
            endpoints[host] = await UdpEndpoint.bind(host, 0, mtu=ep_mtu)
            stack.push_async_callback(endpoints[host].close)
        return endpoints[host]

    links: list[Link] = []
    i_local = i_emu = 0
    for spec in specs:
        if spec.kind == "self":
            from tpfed.protocol import auth
            from tpfed.runtime.local_link import LocalLink

            if sum(s.kind == "self" for s in specs) > 1:
                raise TpfedError("--peers names self more than once")
            link = LocalLink(key if key is not None else auth.new_key())
        elif spec.kind == "local":
            ep = await endpoint("127.0.0.1", LOOPBACK_MTU)
            link = await ep.open_link(local_uris[i_local], name=f"local-{first_local + i_local}")
            i_local += 1
        elif spec.kind == "udp":
            addr = await resolve_udp(spec.host, spec.port)
            ep = await endpoint("::" if ":" in addr[0] else "0.0.0.0", mtu)
            link = ep.link(addr, name=spec.uri)
            link.uri = spec.uri
        elif spec.kind == "emu":
            link = await open_serial_link(emu_urls[i_emu], name=f"emu-{i_emu}")
            link.provision = True  # booted here without a key: given ours first
            i_emu += 1
        else:
            link = await open_serial_link(spec.uri, name=spec.device or spec.uri)
            link.provision = provision
        stack.push_async_callback(link.close)
        links.append(link)
    return links


async def generate_ids(coord: Coordinator, prompt_tokens: Sequence[int], steps: int,
                       sampler: Sampler, *, max_new_tokens: int | None = None,
                       stop_ids: Sequence[int] = (BOS,),
                       on_token: Callable[[int, int], bool | None] | None = None) -> RunResult:
    """llama2.c's generate loop over token ids: the prompt (BOS included) is fed, then tokens
    are sampled until ``steps`` positions are used, ``max_new_tokens`` are made or a token of
    ``stop_ids`` comes (not kept). ``on_token(prev, token)`` sees each new token as soon as it
    is known; returning True stops generation after it (a stop sequence, say)."""
    if not prompt_tokens:
        raise TpfedError("the prompt is empty (it needs at least the BOS token)")
    if len(prompt_tokens) > steps:
        raise TpfedError(f"the prompt is {len(prompt_tokens)} tokens, more than --steps {steps}")
    coord.reset()
    coord.stats = stats = GenerationStats(prompt_tokens=len(prompt_tokens))
    out_tokens: list[int] = []
    token = prompt_tokens[0]
    t0 = time.perf_counter()
    pos = -1
    for pos in range(steps):  # llama2.c's `while (pos < steps)`: steps forward passes at most
        logits = await coord.forward_async(token, pos)
        if pos + 1 < len(prompt_tokens):
            nxt = prompt_tokens[pos + 1]
        else:
            nxt = sampler.sample(logits)
            if nxt in stop_ids:
                break
            out_tokens.append(nxt)
            if on_token is not None and on_token(token, nxt):
                break
            if max_new_tokens is not None and len(out_tokens) >= max_new_tokens:
                break
        token = nxt
    stats.seconds = time.perf_counter() - t0
    stats.tokens = pos + 1
    return RunResult(text="", tokens=list(prompt_tokens) + out_tokens, stats=stats,
                     prompt_ids=list(prompt_tokens), generated_ids=out_tokens)


async def generate(coord: Coordinator, tokenizer: Tokenizer, prompt: str, steps: int,
                   sampler: Sampler, on_piece: Callable[[bytes], None] | None = None,
                   stop_ids: Sequence[int] = (BOS,)) -> RunResult:
    """:func:`generate_ids` from text: ``on_piece`` receives each new token's bytes as soon as
    it is known; the result's text is the prompt and its continuation."""
    if tokenizer is None:
        raise TpfedError("this model comes without a tokenizer: give --tokenizer, or the prompt as "
                         "--prompt-ids")
    prompt_tokens = tokenizer.encode(prompt, bos=True)
    on_token = None if on_piece is None else (lambda prev, tok: on_piece(tokenizer.piece(prev, tok)))
    result = await generate_ids(coord, prompt_tokens, steps, sampler, on_token=on_token,
                                stop_ids=stop_ids)
    result.text = prompt + tokenizer.decode(result.generated_ids, prev_token=prompt_tokens[-1])
    return result


def generate_local(model: Int8Transformer, tokenizer: Tokenizer, prompt: str, steps: int,
                   sampler: Sampler, stop_ids: Sequence[int] | None = None) -> tuple[list[int], int]:
    """The same loop as :func:`generate` on the single-process int8 forward (the baseline the
    distributed runs are compared with), stopping where a fleet stops (:func:`stop_ids_for`
    the model, unless given): (prompt and generated tokens, positions run)."""
    stops = stop_ids_for(model.config) if stop_ids is None else tuple(stop_ids)
    prompt_tokens = tokenizer.encode(prompt, bos=True)
    model.reset()
    token, out = prompt_tokens[0], list(prompt_tokens)
    pos = -1
    for pos in range(steps):
        logits = model.forward(token, pos)
        token = prompt_tokens[pos + 1] if pos + 1 < len(prompt_tokens) else sampler.sample(logits)
        if pos + 1 >= len(prompt_tokens):
            if token in stops:
                break
            out.append(token)
    return out, pos + 1


def _share_totals(q8: Q8Model, plan) -> dict[str, int]:
    """The bytes of each device's share (for progress bars); {} when they cannot be told."""
    try:
        from tpfed.compute.share import _share_nbytes, check_ranges, share_flags

        c, flags = q8.config, share_flags(q8.params)
        return {d.name: sum(_share_nbytes(c, len(s.kv_groups), check_ranges(c, s.mlp_ranges), flags)
                            for s in d.layers.values()) for d in plan.devices}
    except Exception:  # a display aid only
        return {}


class Fleet:
    """Peers reached, planned and holding their shares, kept for as many generations as asked
    (``tpfed serve`` keeps one; ``tpfed run`` uses one for a single prompt).

        async with Fleet(opts, model=(q8, tok)) as fleet:      # connect, plan, push
            result = await fleet.generate("Once upon a time", Sampler(0.0))

    Generations on one fleet run one at a time (``generate`` waits for the one before)."""

    def __init__(self, opts: RunOptions, *, model: tuple[Q8Model, Tokenizer] | None = None,
                 on_status: Callable[[str], None] | None = None,
                 on_push: Callable[[str, int], None] | None = None,
                 on_phase: Callable[[str, dict], None] | None = None) -> None:
        if opts.steps < 1:
            raise TpfedError(f"--steps must be at least 1, got {opts.steps}")
        self.opts = opts
        self.specs = parse_peers(opts.peers)
        self.say = on_status or (lambda _msg: None)
        self.q8, self.tokenizer = model if model is not None else load_model(opts.model, opts.tokenizer)
        self.stop_ids = () if opts.ignore_eos else stop_ids_for(self.q8.config)
        self.seq_len = min(opts.steps, self.q8.config.seq_len)
        self.coord: Coordinator | None = None
        self._plan = None
        self.key: bytes | None = None
        self._endpoints: dict = {}  # the UDP sockets the peers are reached over, per family
        self._n_local = 0  # local peers started so far (joins name theirs after them)
        self._self_joined = False
        self.setup_s = 0.0
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()
        # hook for tpfed serve's metrics: (device name, WEIGHTS bytes sent) per chunk pushed
        self.on_push = on_push
        # hook for progress displays: (phase, facts) as set-up enters "start" (starting local
        # peers and emulated boards: {"local": n, "emu": {env: n}, "remote": n}), "connect"
        # (HELLO, keys, link probes: {"peers": n}) and "push" ({"bytes": {device: share bytes}}),
        # then ("done", {}) once every device holds its share
        self.on_phase = on_phase
        self.phases: dict[str, float] = {}
        """Seconds each set-up phase took: start, connect, push."""

    async def start(self) -> Fleet:
        opts, say = self.opts, self.say
        t_setup = time.perf_counter()
        try:
            key = self.key = federation_key(self.specs, opts.key_file)
            emu: dict[str, int] = {}
            for spec in self.specs:
                if spec.kind == "emu":
                    emu[spec.device or "musca-b1"] = emu.get(spec.device or "musca-b1", 0) + 1
            self._phase("start", {"local": sum(s.kind == "local" for s in self.specs), "emu": emu,
                                  "remote": sum(s.kind not in ("local", "emu") for s in self.specs)})
            links = await open_links(self.specs, self._stack, mtu=opts.mtu, key=key,
                                     provision=opts.provision, endpoints=self._endpoints)
            self._n_local = sum(s.kind == "local" for s in self.specs)
            coord = Coordinator(self.q8, links, key=key, deadline_s=opts.deadline_s,
                                seq_len=self.seq_len, log_dir=opts.log_dir)
            self._stack.push_async_callback(coord.close)
            self._phase("connect", {"peers": len(links)})
            peers = await coord.connect()
            say(f"{len(peers)} peers: " + ", ".join(
                f"{p.name} ({p.hello['int8_macs'] / 1e9:.1f} GMAC/s, {p.latency_s * 1e6:.0f} us)"
                for p in peers))
            plan = coord.make_plan(opts.strategy, replicas=opts.replicas)
            self._phase("push", {"bytes": _share_totals(self.q8, plan)})
            await coord.push_weights(progress=self.on_push)
            self._phase("done", {})
        except BaseException:
            self._phase("done", {})
            await self._stack.aclose()
            raise
        self.coord, self.plan = coord, plan
        self.setup_s = time.perf_counter() - t_setup
        shares = ", ".join(f"{d.name}: {d.kv_units} KV groups + {d.mlp_columns} MLP columns"
                           for d in plan.devices)
        split = ", ".join(f"{name} {s:.2f} s" for name, s in self.phases.items())
        say(f"plan {plan.strategy}: {shares}; set up in {self.setup_s:.2f} s ({split})")
        for name, why in plan.excluded:
            say(f"left out {name}: {why}")
        return self

    @property
    def plan(self):
        """The plan in force: the coordinator's, which recoveries and joins re-make."""
        if self.coord is not None and self.coord.plan is not None:
            return self.coord.plan
        return self._plan

    @plan.setter
    def plan(self, plan) -> None:
        self._plan = plan

    async def join(self, peers: str, *, now: bool = True) -> list[str]:
        """Devices that became available (a ``--peers`` item: ``udp://HOST:PORT``,
        ``local:N``, ``self``, ``emu:N``, a serial port) join the running fleet: started if
        they are ours to start, connected (key handshake, HELLO, link probe) and planned in
        at the next token boundary with minimal movement, their KV caches replayed (see
        :meth:`Coordinator.join_pending`). UDP peers are connected from a helper thread over
        a socket of their own, so neither the handshake nor the probe's timing waits for
        tokens being generated; they are then reached over the fleet's shared socket like
        the others. With ``now`` and no generation running, they are planned in at once.
        Returns the names they were given."""
        coord = self.coord
        if coord is None:
            raise TpfedError("the fleet is not started")
        specs = parse_peers(peers)
        n_self = sum(s.kind == "self" for s in specs)
        if n_self and (n_self > 1 or self._self_joined or any(s.kind == "self" for s in self.specs)):
            raise TpfedError("self is already one of this fleet's devices")
        foreign = [s.uri for s in specs if s.kind not in ("self", "local", "emu")]
        if foreign and self.key is not None:
            from tpfed.runtime import keys

            if keys.find_key(self.opts.key_file) is None:
                raise TpfedError(f"peers {', '.join(foreign)} cannot join: this fleet runs on a "
                                 "key of its own (its peers are all started here); give --key-file")
        names: list[str] = []
        udp = [s for s in specs if s.kind in ("udp", "local")]
        other = [s for s in specs if s.kind not in ("udp", "local")]
        if other:
            n_local_before = self._n_local
            links = await open_links(other, self._stack, mtu=self.opts.mtu, key=self.key,
                                     provision=self.opts.provision, endpoints=self._endpoints,
                                     first_local=n_local_before)
            for link in links:
                names.append((await coord.add_peer(link)).name)
            self._self_joined |= any(s.kind == "self" for s in other)
        if udp:
            names += await self._join_udp(udp)
        if now:
            await self.settle()
        return names

    async def settle(self) -> None:
        """When no generation runs: plan in the devices that joined and out those that said
        they leave, now rather than at the next token (their KV caches get every position
        the coordinator logged, so a server's next request can still reuse its prefix)."""
        coord = self.coord
        if coord is None or self._lock.locked() or not (coord.joining or coord.leaving):
            return
        async with self._lock:
            await coord.membership(coord.history.length)

    async def _join_udp(self, specs: Sequence[PeerSpec]) -> list[str]:
        from tpfed.transport import UdpEndpoint
        from tpfed.transport.udp import open_udp_link

        coord = self.coord
        assert coord is not None
        targets: list[tuple[str, str, int]] = []  # (uri, name, mtu)
        n_local = sum(s.kind == "local" for s in specs)
        if n_local:
            from tpfed.runtime.localpeers import LocalPeers

            uris = await self._stack.enter_async_context(
                LocalPeers(n_local, extra_args=("--mtu", str(LOOPBACK_MTU)), key=self.key,
                           first=self._n_local))
            targets += [(u, f"local-{self._n_local + i}", LOOPBACK_MTU) for i, u in enumerate(uris)]
            self._n_local += n_local
        targets += [(s.uri, s.uri, self.opts.mtu) for s in specs if s.kind == "udp"]

        def introduce(uri: str, name: str, mtu: int, device_id: int):
            async def go():
                link = await open_udp_link(uri, name=name, mtu=mtu)
                try:
                    return await coord.introduce(link, device_id), link.addr
                finally:
                    await link.close()

            return asyncio.run(go())

        names = []
        for uri, name, mtu in targets:
            peer, addr = await asyncio.to_thread(introduce, uri, name, mtu, coord.next_device_id())
            family = "::" if ":" in addr[0] else "0.0.0.0"
            host = "127.0.0.1" if mtu == LOOPBACK_MTU else family
            if host not in self._endpoints:
                self._endpoints[host] = await UdpEndpoint.bind(host, 0, mtu=mtu)
                self._stack.push_async_callback(self._endpoints[host].close)
            link = self._endpoints[host].link(addr, name=name)
            link.uri = uri
            self._stack.push_async_callback(link.close)
            peer.link = link  # the peer answers where its frames come from: now the fleet's socket
            names.append(coord.admit(peer).name)
        return names

    def _phase(self, name: str, facts: dict) -> None:
        """Enter set-up phase ``name`` (``done`` ends the last): times the one before it."""
        now = time.perf_counter()
        last = getattr(self, "_phase_at", None)
        if last is not None:
            self.phases[last[0]] = now - last[1]
        self._phase_at = None if name == "done" else (name, now)
        if self.on_phase is not None:
            self.on_phase(name, facts)

    async def close(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> Fleet:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def peers_json(self) -> list[dict]:
        assert self.coord is not None and self.plan is not None
        by_name = {d.name: d for d in self.plan.devices}
        return [
            {"name": p.name, "uri": p.link.uri,
             "kv_groups": by_name[p.name].kv_units if p.name in by_name else 0,
             "mlp_columns": by_name[p.name].mlp_columns if p.name in by_name else 0,
             "int8_macs": p.hello["int8_macs"], "latency_us": round(p.latency_s * 1e6, 1)}
            for p in self.coord.peers
        ]

    def _finish(self, result: RunResult) -> RunResult:
        assert self.coord is not None
        result.plan = self.plan
        result.setup_s = self.setup_s
        result.devices = [p.spec() for p in self.coord.peers]
        result.peers = self.peers_json()
        result.weight_bytes_pushed = self.coord.weight_bytes_pushed
        result.replay_log_bytes = self.coord.history.nbytes
        result.replay_log_bytes_per_position = self.coord.history.bytes_per_position
        result.weight_bytes_skipped = self.coord.weight_bytes_skipped
        return result

    async def generate(self, prompt: str, sampler: Sampler, *, steps: int | None = None,
                       on_piece: Callable[[bytes], None] | None = None) -> RunResult:
        """Text in, text out (the prompt and its continuation), as ``tpfed run`` prints it."""
        if self.coord is None:
            raise TpfedError("the fleet is not started")
        async with self._lock:
            result = await generate(self.coord, self.tokenizer, prompt, min(steps or self.seq_len, self.seq_len),
                                    sampler, on_piece, stop_ids=self.stop_ids)
        return self._finish(result)

    async def generate_ids(self, prompt_ids: Sequence[int], sampler: Sampler, *,
                           steps: int | None = None, max_new_tokens: int | None = None,
                           stop_ids: Sequence[int] = (BOS,),
                           on_token: Callable[[int, int], bool | None] | None = None) -> RunResult:
        """Token ids in and out (see :func:`generate_ids`); ``text`` is left empty."""
        if self.coord is None:
            raise TpfedError("the fleet is not started")
        async with self._lock:
            result = await generate_ids(self.coord, prompt_ids, min(steps or self.seq_len, self.seq_len),
                                        sampler, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                        on_token=on_token)
        return self._finish(result)


async def run(opts: RunOptions, *, model: tuple[Q8Model, Tokenizer] | None = None,
              on_piece: Callable[[bytes], None] | None = None,
              on_status: Callable[[str], None] | None = None,
              on_phase: Callable[[str, dict], None] | None = None,
              on_push: Callable[[str, int], None] | None = None) -> RunResult:
    """Everything ``tpfed run`` does, as a coroutine: a fleet for one prompt (``on_phase`` and
    ``on_push``: see :class:`Fleet`)."""
    sampler = Sampler(temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed)
    if opts.weights == "f32":
        return run_f32(opts, sampler, on_piece=on_piece, on_status=on_status)
    if opts.weights != "q8_0":
        raise TpfedError(f"--weights must be q8_0 or f32, got {opts.weights!r}")
    fleet = Fleet(opts, model=model, on_status=on_status, on_phase=on_phase, on_push=on_push)
    async with fleet:
        if opts.prompt_ids is not None:
            tok = fleet.tokenizer
            on_token = None
            if on_piece is not None and tok is not None:
                def on_token(prev: int, t: int) -> None:
                    on_piece(tok.piece(prev, t))
            result = await fleet.generate_ids(opts.prompt_ids, sampler, stop_ids=fleet.stop_ids,
                                              on_token=on_token)
            if tok is not None:
                result.text = tok.decode(opts.prompt_ids) + tok.decode(
                    result.generated_ids, prev_token=opts.prompt_ids[-1])
            return result
        return await fleet.generate(opts.prompt, sampler, on_piece=on_piece)


def run_f32(opts: RunOptions, sampler: Sampler, *, on_piece: Callable[[bytes], None] | None = None,
            on_status: Callable[[str], None] | None = None) -> RunResult:
    """``--weights f32``: float32 weights and activations. Split f32 shares are not carried
    by the peers yet, so this runs the float32 forward (:class:`tpfed.model.reference.
    FloatTransformer`, checked against transformers) in this process, and says so."""
    from tpfed.model.reference import FloatTransformer

    loaded = load_loaded(opts.model, opts.tokenizer)
    c, tok = loaded.config, loaded.tokenizer
    if not c.causal:
        raise TpfedError(f"{c.arch} is an encoder: use tpfed embed")
    if on_status is not None:
        on_status("--weights f32 runs in this process (f32 shares are not sent to peers yet); "
                  f"--peers {opts.peers} unused")
    if opts.prompt_ids is not None:
        prompt_ids = list(opts.prompt_ids)
    elif tok is None:
        raise TpfedError("this model comes without a tokenizer: give --tokenizer, or the prompt as --prompt-ids")
    else:
        prompt_ids = tok.encode(opts.prompt, bos=True)
    stop = () if opts.ignore_eos else stop_ids_for(c)
    model = FloatTransformer(loaded.weights)
    steps = min(opts.steps, c.seq_len)
    out: list[int] = []
    t0 = time.perf_counter()
    token, pos = prompt_ids[0], -1
    for pos in range(steps):
        logits = model.forward(token, pos)
        if pos + 1 < len(prompt_ids):
            token = prompt_ids[pos + 1]
            continue
        token = sampler.sample(logits)
        if token in stop:
            break
        out.append(token)
        if on_piece is not None and tok is not None:
            on_piece(tok.piece(prompt_ids[-1] if len(out) == 1 else out[-2], token))
    stats = GenerationStats(tokens=pos + 1, prompt_tokens=len(prompt_ids),
                            seconds=time.perf_counter() - t0)
    text = ""
    if tok is not None:
        text = (opts.prompt if opts.prompt_ids is None else tok.decode(prompt_ids)) + tok.decode(
            out, prev_token=prompt_ids[-1])
    return RunResult(text=text, tokens=prompt_ids + out, stats=stats, prompt_ids=prompt_ids,
                     generated_ids=out)


def run_sync(opts: RunOptions, **kw) -> RunResult:
    try:
        return aio.run(run(opts, **kw))
    except (OSError, ConnectionError) as exc:
        raise PeerError(f"peer connection failed: {exc}") from exc


__all__ = ["Fleet", "RunOptions", "RunResult", "generate", "generate_ids", "generate_local", "load_model",
           "open_links", "run", "run_sync"]
