"""Rogue clients on loopback (issue 9, Security): a stranger WITHOUT the federation key sends
frames at keyed peers during and between runs. Every test asserts that the run's text is the
clean text (the single-process int8 forward, ``generate_local``, on stories260K) and/or that the
stranger's frames get no answer, and that the peer counted them as dropped.

The fleet of every run is two real ``tpfed peer`` processes (``LocalPeers``) and one peer served
in this process on its own UDP socket (:class:`Target`: the same C core and C UDP port as
``tpfed peer``, so its counters, ``UdpPeer.stats()``, are readable). The coordinator reaches the
target through a clean :class:`proxies.LossyUdpProxy` with ``capture`` on: the stranger sniffs
what a party on the path would see (session number, device ids, sealed frames) and uses it for
the strongest forgeries it can make. Frames are sent from the stranger's own socket, straight to
the peers' real ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from peer_session import SealedLink, stranger_seal
from proxies import LossyUdpProxy, udp_addr
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.framing import DatagramFramer
from tpfed.protocol.schema import COORDINATOR, ErrorCode, MsgType, Stage

from tpfed.compute.int8_forward import Int8Transformer
from tpfed.errors import PeerRefused
from tpfed.model.sampling import Sampler
from tpfed.runtime.desktop_peer import UdpPeer, bind_udp, check_options
from tpfed.runtime.localpeers import LocalPeers
from tpfed.runtime.peer_core import DeviceInfo, PeerConfig
from tpfed.runtime.session import Fleet, RunOptions, generate_local

PROMPT = "Once upon a time"
STEPS = 64
DEADLINE_S = 5.0
MTU = 1400
DIM = 64  # stories260K


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clean_tokens(model):
    q8, tok = model
    ids, _ = generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))
    return ids


@pytest.fixture(scope="module")
def key() -> bytes:
    return auth.new_key()


@pytest.fixture(scope="module")
def key_file(key, tmp_path_factory) -> str:
    return str(auth.write_key_file(tmp_path_factory.mktemp("key") / "federation.key", key))


# ------------------------------------------------------------------------------ the parties


class Target:
    """A keyed desktop peer served in this process (a thread around the C UDP port)."""

    def __init__(self, key: bytes, memory_mb: int = 64, name: str = "target") -> None:
        self.sock = bind_udp("127.0.0.1", 0)
        self.addr = self.sock.getsockname()[:2]
        arena = check_options(memory_mb << 20, MTU)
        self.peer = UdpPeer(self.sock, DeviceInfo(board=name, port="host-udp"), arena, MTU,
                            PeerConfig(key=key), log=io.StringIO())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.peer.serve, args=(self._stop.is_set,),
                                        name=f"target-{self.addr[1]}", daemon=True)

    @property
    def uri(self) -> str:
        return f"udp://{self.addr[0]}:{self.addr[1]}"

    def stats(self) -> dict[str, int]:
        """The core's counters, and the UDP port's as ``port_...``."""
        core = self.peer.core.stats()
        port = {f"port_{k}": v for k, v in self.peer.stats().items() if k not in core
                or k == "dropped"}
        return {**core, **port}

    def __enter__(self) -> Target:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class Stranger:
    """A process on loopback without the key: its own UDP socket; it keeps whatever comes back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.framer = DatagramFramer(MTU)
        self.sent = 0
        self.datagrams = 0
        self.answers: list[bytes] = []

    def send(self, frame: bytes, to: tuple[str, int]) -> None:
        for d in self.framer.split(frame):
            self.send_datagram(d, to)
        self.sent += 1

    def send_datagram(self, datagram: bytes, to: tuple[str, int]) -> None:
        with contextlib.suppress(BlockingIOError):
            self.sock.sendto(datagram, to)
            self.datagrams += 1
        self.collect(0.0)

    def collect(self, wait_s: float) -> list[bytes]:
        """Frames answered to the stranger so far (waiting up to wait_s for more)."""
        end = time.monotonic() + wait_s
        while True:
            self.sock.settimeout(max(end - time.monotonic(), 0.0) or None)
            if wait_s <= 0:
                self.sock.setblocking(False)
            try:
                data, src = self.sock.recvfrom(65536)
            except (BlockingIOError, TimeoutError):
                return self.answers
            frame = self.framer.feed(data, src)
            if frame is not None:
                self.answers.append(frame)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def spraying(stranger: Stranger, batches: Callable[[], list[tuple[bytes, tuple[str, int]]]],
             pause_s: float = 0.0002) -> Iterator[None]:
    """While the block runs, a thread sends ``batches()`` (frame, address) again and again:
    at least one whole round before the block starts and one after it ends."""
    stop = threading.Event()

    def one_round(interruptible: bool) -> None:
        for frame, to in batches():
            if interruptible and stop.is_set():
                return
            stranger.send(frame, to)
            time.sleep(pause_s)

    def loop() -> None:
        while not stop.is_set():
            one_round(True)

    one_round(False)
    t = threading.Thread(target=loop, name="stranger", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        one_round(False)


# ------------------------------------------------------------------------------ forged frames

_rng = random.Random(9)


def activation(session: int, dst: int, layer: int = 0, stage: int = Stage.ATTENTION,
               pos: int = 3) -> bytes:
    return encode_frame(Frame(MsgType.ACTIVATION, {
        "layer": layer, "stage": int(stage), "pos": pos, "scales": [0x3C00] * (DIM // 32),
        "qs": [_rng.randrange(-127, 128) for _ in range(DIM)]},
        src=COORDINATOR, dst=dst, seq=_rng.randrange(1 << 16), session=session))


def weights(session: int, dst: int, total: int = 4096, offset: int = 0,
            data: bytes | None = None) -> bytes:
    return encode_frame(Frame(MsgType.WEIGHTS, {
        "shard_id": 0, "offset": offset, "total": total, "sha256": os.urandom(32),
        "data": data if data is not None else os.urandom(1000)},
        src=COORDINATOR, dst=dst, seq=_rng.randrange(1 << 16), session=session))


def assign(session: int, dst: int, *, huge: bool = False, big: bool = False) -> bytes:
    if big:  # a valid geometry (Llama-2-7B's), every unit of every layer: ~6.5 GB of shares
        geometry = {"dim": 4096, "hidden_dim": 11008, "n_layers": 32, "n_heads": 32,
                    "n_kv_heads": 32, "seq_len": 4096}
        entries = [{"layer": i, "kv_groups": list(range(32)),
                    "mlp_ranges": [{"start": 0, "end": 11008}]} for i in range(32)]
    elif huge:  # sizes that multiply to far beyond any arena (and wrap 32-bit arithmetic)
        geometry = {"dim": 0xFFE0, "hidden_dim": 0xFFFFFFE0, "n_layers": 200, "n_heads": 0xFFFF,
                    "n_kv_heads": 0xFFFF, "seq_len": 0xFFFF}
        entries = [{"layer": i, "kv_groups": list(range(8)),
                    "mlp_ranges": [{"start": 0, "end": 0xFFFFFFE0}]} for i in range(20)]  # one datagram
    else:  # a plausible stories260K assignment (every layer, everything)
        geometry = {"dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4,
                    "seq_len": 512}
        entries = [{"layer": i, "kv_groups": [0, 1, 2, 3],
                    "mlp_ranges": [{"start": 0, "end": 172}]} for i in range(5)]
    return encode_frame(Frame(MsgType.ASSIGN, {**geometry, "norm_eps": 1e-5, "rope_theta": 1e4,
                                               "flags": 0, "entries": entries},
                              src=COORDINATOR, dst=dst, seq=_rng.randrange(1 << 16),
                              session=session))


def bye(session: int, dst: int) -> bytes:
    return encode_frame(Frame(MsgType.BYE, {"reason": 0}, src=COORDINATOR, dst=dst,
                              seq=_rng.randrange(1 << 16), session=session))


def hello(session: int, dst: int) -> bytes:
    me = {"device_class": 0, "name": "stranger", "ram_kb": 0, "psram_kb": 0, "flash_kb": 0,
          "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0, "battery_pct": 255,
          "temperature_dc": -32768, "transports": 0, "max_frame": 0xFFFF, "arena_kb": 0}
    return encode_frame(Frame(MsgType.HELLO, me, src=COORDINATOR, dst=dst,
                              seq=_rng.randrange(1 << 16), session=session))


def forgeries(frame: bytes) -> list[bytes]:
    """What a stranger can make of an unsealed frame: it as it is, sealed under a key of its
    own (counter 1 and a counter far ahead of any window), and sealed with a random tag."""
    random_tag = bytearray(stranger_seal(frame, 7))
    random_tag[-20:-4] = os.urandom(16)  # the tag (before the CRC), with the CRC made good
    return [frame, stranger_seal(frame, 1), stranger_seal(frame, 0x7FFFFFF0),
            _with_crc(random_tag)]


def _with_crc(b: bytearray) -> bytes:
    import zlib

    b[-4:] = (zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF).to_bytes(4, "little")
    return bytes(b)


def tampered(sealed: bytes) -> bytes:
    """A sniffed sealed frame with one payload bit flipped and its CRC made good again."""
    b = bytearray(sealed)
    b[12 + min(3, max(len(b) - 12 - 24, 1) - 1)] ^= 0x01  # a payload byte
    return _with_crc(b)


def sniffed_frames(proxy: LossyUdpProxy, way: str = "up") -> list[bytes]:
    """Whole frames the proxy saw going one way (fragments reassembled)."""
    framer = DatagramFramer(MTU, max_in_flight=1024, max_bytes=1 << 30)
    out = []
    for w, d in list(proxy.captured):
        if w == way:
            f = framer.feed(d, w)
            if f is not None:
                out.append(f)
    return out


def answers_summary(frames: list[bytes]) -> list[str]:
    out = []
    for f in frames:
        try:
            d = decode_frame(f)
            out.append(f"{MsgType(d.type).name}{' sealed' if auth.is_sealed(f) else ''}")
        except Exception as exc:  # noqa: BLE001 - a summary for a failing assertion
            out.append(f"undecodable ({exc})")
    return out


# ------------------------------------------------------------------------------ runs


class Run:
    """Peers for one test: 2 ``tpfed peer`` processes, the in-process target behind a capturing
    proxy; ``await run.generate(during)`` makes one keyed run through the coordinator."""

    def __init__(self, model, key: bytes, target: Target, proxy: LossyUdpProxy,
                 uris: list[str], key_file: str, procs: list) -> None:
        self.model, self.key, self.target, self.proxy = model, key, target, proxy
        self.procs = procs  # the ``tpfed peer`` processes
        self.process_uris = uris
        self.key_file = key_file

    @property
    def peer_uris(self) -> list[str]:
        return [*self.process_uris, self.proxy.uri]

    def opts(self, key_file: str | None = None) -> RunOptions:
        return RunOptions(peers=",".join(self.peer_uris), prompt=PROMPT, steps=STEPS,
                          deadline_s=DEADLINE_S, key_file=key_file or self.key_file)

    def addresses(self, fleet: Fleet) -> list[tuple[tuple[str, int], int]]:
        """(real address, device id) of every peer of the fleet: the stranger's targets."""
        out = []
        for p in fleet.coord.peers:
            addr = udp_addr(p.link.uri)
            if addr == udp_addr(self.proxy.uri):
                addr = self.target.addr  # straight at the target, around the proxy
            out.append((addr, p.device_id))
        return out

    async def generate(self, during: Callable[[Fleet], contextlib.AbstractContextManager] | None
                       = None) -> tuple[list[int], Fleet]:
        async with Fleet(self.opts(), model=self.model) as fleet:
            ctx = during(fleet) if during else contextlib.nullcontext()
            with ctx:
                result = await fleet.generate(PROMPT, Sampler(0.0))
        return result.tokens, fleet


@contextlib.asynccontextmanager
async def fleet_peers(model, key: bytes):
    with Target(key) as target:
        peers = LocalPeers(2, key=key)
        async with peers as uris:
            with LossyUdpProxy(target.addr, capture=True, seed=1) as proxy:
                yield Run(model, key, target, proxy, uris, peers.key_file, list(peers.procs))


def dropped(stats: dict[str, int]) -> int:
    return stats["auth_dropped"] + stats["replayed"]


# ------------------------------------------------------------------------------ (a), (b), (d)


def _attack_mid_run(model, key, make: Callable[[int, int], list[bytes]], label: str,
                    also_sniffed: bool = False):
    """A run while the stranger sends make(session, device_id) frames (each in every forgery)
    at every peer; returns (tokens, stranger, target stats before and after, run)."""

    async def go():
        async with fleet_peers(model, key) as run:
            stranger = Stranger()
            before = run.target.stats()

            def during(fleet: Fleet):
                session = fleet.coord.session  # sniffed: the strongest forgery
                targets = run.addresses(fleet)
                sniffed = sniffed_frames(run.proxy) if also_sniffed else []
                sealed = [f for f in sniffed if auth.is_sealed(f)
                          and decode_frame(f).type != MsgType.BYE]

                def batches():
                    out = [(f, addr) for addr, dev in targets
                           for frame in make(session, dev) for f in forgeries(frame)]
                    out += [(tampered(f), run.target.addr) for f in sealed[-20:]]
                    out += [(f, run.target.addr) for f in sealed[-20:]]  # exact: replayed
                    return out

                return spraying(stranger, batches)

            tokens, _fleet = await run.generate(during)
            await asyncio.sleep(0.2)
            stranger.collect(0.3)
            after = run.target.stats()
            stranger.close()
            return tokens, stranger, before, after, run

    tokens, stranger, before, after, run = asyncio.run(go())
    delta = {k: after[k] - before[k] for k in after}
    print(f"\n{label}: stranger sent {stranger.sent} frames ({stranger.datagrams} datagrams), "
          f"{len(stranger.answers)} answered; target counted {delta['auth_dropped']} "
          f"unauthenticated, {delta['replayed']} replayed, {delta['dropped']} malformed")
    return tokens, stranger, delta


def test_injected_activations_change_nothing(model, key, clean_tokens):
    """(a) ACTIVATION frames for every layer and stage, at every peer, mid-run; also sniffed
    sealed ACTIVATIONs with a bit flipped, and replayed as they were."""

    def make(session, dev):
        return [activation(session, dev, layer, stage, pos)
                for layer in range(5) for stage in (Stage.ATTENTION, Stage.MLP)
                for pos in (0, 5)]

    tokens, stranger, delta = _attack_mid_run(model, key, make, "injected ACTIVATIONs",
                                              also_sniffed=True)
    assert tokens == clean_tokens
    assert stranger.answers == [], answers_summary(stranger.answers)
    assert stranger.sent > 100
    assert dropped(delta) > 0 and delta["auth_dropped"] > 0


def test_foreign_weights_mid_run_change_nothing(model, key, clean_tokens):
    """(b) the stranger pushes its own WEIGHTS (first chunk, a later chunk, a LAST one) mid-run."""

    def make(session, dev):
        return [weights(session, dev, total=8192, offset=0),
                weights(session, dev, total=8192, offset=4096, data=os.urandom(4096)),
                weights(session, dev, total=1000, offset=0, data=os.urandom(1000))]

    tokens, stranger, delta = _attack_mid_run(model, key, make, "foreign WEIGHTS")
    assert tokens == clean_tokens
    assert stranger.answers == [], answers_summary(stranger.answers)
    assert delta["auth_dropped"] > 0


def test_forged_bye_and_assign_do_not_stop_the_run(model, key, clean_tokens):
    """(d) BYE and ASSIGN (the stories260K one, and absurd ones) forged mid-run."""

    def make(session, dev):
        return [bye(session, dev), assign(session, dev), bye(session, 0xFF),
                assign(session, dev, huge=True)]

    tokens, stranger, delta = _attack_mid_run(model, key, make, "forged BYE/ASSIGN")
    assert tokens == clean_tokens
    assert stranger.answers == [], answers_summary(stranger.answers)
    assert delta["auth_dropped"] > 0
    assert delta["sessions"] == 1  # the run's own handshake, no other


# ------------------------------------------------------------------------------ (c) replay


def test_frames_replayed_from_an_earlier_run_change_nothing(model, key, clean_tokens):
    """(c) run 1 through the capturing proxy; run 2 (same peers, same key, a new session) while
    the stranger replays every frame of run 1 at the target, in order, again and again. The only
    answers it may get are RESPONSEs to replayed CHALLENGEs (the handshake's first step is
    answered by design; it cannot be completed without the key)."""

    async def go():
        async with fleet_peers(model, key) as run:
            tokens1, fleet1 = await run.generate()
            run1 = [(w, d) for w, d in run.proxy.captured]
            session1 = fleet1.coord.session
            up = [d for w, d in run1 if w == "up"]
            stranger = Stranger()
            before = run.target.stats()
            sessions = []

            def during(fleet: Fleet):
                sessions.append(fleet.coord.session)
                return spraying(stranger, lambda: [(d, run.target.addr) for d in up], 0.0002)

            with _raw_datagrams(stranger):
                tokens2, _ = await run.generate(during)
            await asyncio.sleep(0.2)
            stranger.collect(0.3)
            after = run.target.stats()
            stranger.close()
            return tokens1, tokens2, up, session1, sessions[0], stranger, before, after

    tokens1, tokens2, up, s1, s2, stranger, before, after = asyncio.run(go())
    delta = {k: after[k] - before[k] for k in after}
    kinds = answers_summary(stranger.answers)
    print(f"\nreplay: {len(up)} datagrams of run 1 (session {s1}) replayed {stranger.sent} times "
          f"into run 2 (session {s2}); target counted {delta['auth_dropped']} unauthenticated, "
          f"{delta['replayed']} replayed; answers: {sorted(set(kinds))} x{len(kinds)}")
    assert s1 != s2
    assert tokens1 == clean_tokens and tokens2 == clean_tokens
    assert all(k == "AUTH" for k in kinds), kinds  # unsealed RESPONSEs to CHALLENGE only
    assert all(decode_frame(f).payload["step"] == auth.AuthStep.RESPONSE
               for f in stranger.answers)
    assert delta["auth_dropped"] > len(up) // 2
    assert delta["sessions"] == 1


@contextlib.contextmanager
def _raw_datagrams(stranger: Stranger) -> Iterator[None]:
    """Make ``stranger.send`` send datagrams as captured (they are fragments already)."""
    split = stranger.framer.split
    stranger.framer.split = lambda d: [bytes(d)]
    try:
        yield
    finally:
        stranger.framer.split = split


# ------------------------------------------------------------------------------ (e) takeover


def _exchange(stranger: Stranger, frames: list[bytes], to, wait_s: float = 0.3) -> list[bytes]:
    n = len(stranger.answers)
    for f in frames:
        stranger.send(f, to)
    stranger.collect(wait_s)
    return stranger.answers[n:]


def test_idle_peer_cannot_be_taken_over(model, key, clean_tokens, key_file):
    """(e) an idle keyed peer (a process and the target): HELLO, ASSIGN, WEIGHTS, ACTIVATION,
    unsealed and sealed with another key, get no answer; a handshake with another key gets the
    peer's RESPONSE (whose proof the stranger cannot check) and its CONFIRM no ACK; no session
    is made. Afterwards a coordinator with the key runs as if nothing happened."""
    other_key = auth.new_key()

    async def go():
        async with fleet_peers(model, key) as run:
            stranger = Stranger()
            process = udp_addr(run.process_uris[0])
            before = run.target.stats()
            plain = []
            for session in (0, 1, 0x1234):
                for frame in (hello(session, 1), assign(session, 1), weights(session, 1),
                              activation(session, 1), bye(session, 1)):
                    plain += forgeries(frame)
            found = {}
            for name, to in (("target", run.target.addr), ("process", process)):
                found[name] = _exchange(stranger, plain, to)
                # the handshake, with another key: the RESPONSE's proof does not verify
                link = SealedLink(lambda f, to=to: _exchange(stranger, [f], to), other_key,
                                  device_id=1, session=0x4321)
                replies = link.deliver(link.challenge_frame())
                assert [decode_frame(r).payload["step"] for r in replies] == \
                    [auth.AuthStep.RESPONSE], answers_summary(replies)
                with pytest.raises(auth.AuthError):
                    link.confirm_frame(replies[0])
                # a CONFIRM made with the other key anyway (as if its proof had verified)
                hs = link.hs
                hs.nonce_p = bytes(decode_frame(replies[0]).payload["body"]["nonce_p"])
                proof = auth.coordinator_proof(other_key, hs.nonce_c, hs.nonce_p, 1, 0x4321)
                confirm = encode_frame(Frame(MsgType.AUTH, auth.confirm(proof), src=COORDINATOR,
                                             dst=1, seq=9, session=0x4321))
                found[name + " confirm"] = _exchange(stranger, [confirm], to)
                # then everything sealed with the session key that other key would give
                ks = auth.session_key(other_key, hs.nonce_c, hs.nonce_p, 1, 0x4321)
                sealed = [auth.seal(ks, f, i + 1) for i, f in enumerate(
                    (hello(0x4321, 1), assign(0x4321, 1), weights(0x4321, 1),
                     activation(0x4321, 1)))]
                found[name + " sealed"] = _exchange(stranger, sealed, to)
            after = run.target.stats()
            stranger.close()
            tokens, _ = await run.generate()
            return found, before, after, len(plain), tokens

    found, before, after, n_plain, tokens = asyncio.run(go())
    delta = {k: after[k] - before[k] for k in after}
    print(f"\ntakeover: {n_plain} forged frames + a handshake with another key at each idle peer; "
          f"answers {({k: answers_summary(v) for k, v in found.items()})}; target counted "
          f"{delta['auth_dropped']} unauthenticated, sessions {delta['sessions']}")
    for name, answers in found.items():
        assert answers == [], (name, answers_summary(answers))
    assert delta["sessions"] == 0
    assert delta["auth_dropped"] >= n_plain + 1 + 4  # the forgeries, the CONFIRM, the sealed
    assert delta["frames_out"] == 1  # the RESPONSE to the CHALLENGE, nothing else
    assert tokens == clean_tokens


# ------------------------------------------------------------------------------ (f) memory


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_seven_datagrams_claiming_huge_allocations_get_no_answer(model, key, clean_tokens):
    """(f) 7 datagrams: ASSIGNs whose sizes multiply past any arena (and wrap 32 bits), and
    WEIGHTS claiming 4 GiB shards; unsealed and sealed with another key; at an idle peer and
    mid-run. No answer, no memory taken (the processes' resident size), the run's text
    unchanged. With the key, the same ASSIGN is refused with OUT_OF_MEMORY and the peer stays
    up (it then serves a run)."""

    def seven(session: int, dev: int) -> list[bytes]:
        big = assign(session, dev, huge=True)
        frames = [big, stranger_seal(big, 1), stranger_seal(big, 2)]
        for i in range(4):
            w = weights(session, dev, total=0xFFFFFF00, offset=i * 1000)
            frames.append(w if i % 2 else stranger_seal(w, 10 + i))
        return frames

    async def go():
        async with fleet_peers(model, key) as run:
            stranger = Stranger()
            pids = [p.pid for p in run.procs]
            rss0 = [_rss_kb(p) for p in pids]
            before = run.target.stats()
            frames = seven(0x1111, 1)
            datagrams = sum(len(stranger.framer.split(f)) for f in frames)
            idle = []
            for to in [run.target.addr] + [udp_addr(u) for u in run.process_uris]:
                idle += _exchange(stranger, frames, to, 0.2)

            def during(fleet: Fleet):
                targets = run.addresses(fleet)
                return spraying(stranger, lambda: [(f, addr) for addr, dev in targets
                                                   for f in seven(fleet.coord.session, dev)])

            tokens, _ = await run.generate(during)
            stranger.collect(0.3)
            rss1 = [_rss_kb(p) for p in pids]
            after = run.target.stats()
            # with the key: the same absurd ASSIGN, sealed in a real session
            keyed = Stranger()
            link = SealedLink(lambda f: _exchange(keyed, [f], run.target.addr, 0.3), key,
                              device_id=1, session=0x2222)
            link.handshake()
            absurd = link.request(assign(0x2222, 1, huge=True))
            oom = link.request(assign(0x2222, 1, big=True))
            link.deliver(link.seal(bye(0x2222, 1)))
            keyed.close()
            tokens2, _ = await run.generate()
            stranger.close()
            return (tokens, tokens2, idle, stranger, datagrams, rss0, rss1, before, after, absurd,
                    oom)

    (tokens, tokens2, idle, stranger, datagrams, rss0, rss1, before, after, absurd,
     oom) = asyncio.run(go())
    delta = {k: after[k] - before[k] for k in after}
    print(f"\nhuge allocations: {datagrams} datagrams per volley; stranger sent {stranger.sent} "
          f"frames; answers {len(stranger.answers)}; peer processes' RSS {rss0} -> {rss1} kB; "
          f"target counted {delta['auth_dropped']} unauthenticated; with the key, the absurd "
          f"ASSIGN answered {[decode_frame(f).payload for f in absurd]}, a 7B-sized one "
          f"{[decode_frame(f).payload for f in oom]}")
    assert datagrams == 7
    assert idle == [] and stranger.answers == [], answers_summary(stranger.answers)
    assert tokens == clean_tokens and tokens2 == clean_tokens
    assert delta["auth_dropped"] >= 7
    for a, b in zip(rss0, rss1, strict=True):
        assert b - a < 16 * 1024, (rss0, rss1)  # nothing near a share's worth, let alone GiBs
    assert len(absurd) == 1
    err = decode_frame(absurd[0])
    assert err.type == MsgType.ERROR and err.payload["code"] in (
        ErrorCode.UNSUPPORTED, ErrorCode.OUT_OF_MEMORY), err
    assert len(oom) == 1
    err = decode_frame(oom[0])
    assert err.type == MsgType.ERROR and err.payload["code"] == ErrorCode.OUT_OF_MEMORY, err


# ------------------------------------------------------------------------------ coordinators


def _cli(args: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tpfed", *args], capture_output=True, text=True,
                       timeout=timeout)
    return p, time.perf_counter() - t0


def test_wrong_key_is_refused_in_one_line_within_the_deadline(model, key, clean_tokens, tmp_path):
    wrong = str(auth.write_key_file(tmp_path / "wrong.key", auth.new_key()))
    deadline = 3.0

    async def go():
        async with fleet_peers(model, key) as run:
            opts = run.opts(wrong)
            opts.deadline_s = deadline
            t0 = time.perf_counter()
            with pytest.raises(PeerRefused) as exc:
                async with Fleet(opts, model=model):
                    pass
            in_process = time.perf_counter() - t0
            p, took = await asyncio.to_thread(
                _cli, ["run", "--peers", ",".join(run.peer_uris), "--key-file", wrong,
                       "--deadline", str(deadline), "--steps", "8", PROMPT])
            tokens, _ = await run.generate()  # the peers are none the worse
            return exc.value, in_process, p, took, tokens

    exc, in_process, p, took, tokens = asyncio.run(go())
    lines = p.stderr.strip().splitlines()
    print(f"\nwrong key: refused in {in_process:.2f} s in process ({exc}); "
          f"`tpfed run` exited {p.returncode} after {took:.2f} s: {lines}")
    assert "does not hold this federation key" in str(exc)
    assert in_process < deadline
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("tpfed: error: "), p.stderr
    assert "does not hold this federation key" in lines[0]
    assert p.stdout.strip() == ""
    assert tokens == clean_tokens  # the peers are none the worse


def test_second_coordinator_is_told_busy_in_one_line(model, key, clean_tokens):
    async def go():
        async with fleet_peers(model, key) as run:
            async with Fleet(run.opts(), model=model) as fleet:
                p, took = await asyncio.to_thread(
                    _cli, ["run", "--peers", ",".join(run.peer_uris), "--key-file", run.key_file,
                           "--deadline", str(DEADLINE_S), "--steps", "8", PROMPT])
                result = await fleet.generate(PROMPT, Sampler(0.0))
            return p, took, result.tokens, run.target.stats()

    p, took, tokens, stats = asyncio.run(go())
    lines = p.stderr.strip().splitlines()
    print(f"\nsecond coordinator: exited {p.returncode} after {took:.2f} s: {lines}; "
          f"target busy count {stats['busy']}")
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("tpfed: error: "), p.stderr
    assert "busy with another session" in lines[0]
    assert took < DEADLINE_S + 10
    # (the second coordinator stops at the first peer that says busy; which one that is, and
    # so whether the in-process target counted it, is a race)
    assert tokens == clean_tokens  # the first coordinator's run is untouched


def test_challenges_of_a_stranger_do_not_keep_a_coordinator_out(model, key, clean_tokens):
    """(e) a stranger sends CHALLENGEs (no key is needed for that) at an idle peer, about 1000
    a second, while a coordinator with the key sets up: the run must still happen."""

    async def go():
        async with fleet_peers(model, key) as run:
            stranger = Stranger()

            def batch():
                hs = auth.CoordinatorHandshake(auth.new_key(), 3, session_id=0x777)
                return [(encode_frame(Frame(MsgType.AUTH, hs.challenge(), src=COORDINATOR,
                                            dst=3, seq=1, session=0x777)), run.target.addr)]

            try:
                with spraying(stranger, batch, 0.0005):
                    tokens, _ = await run.generate()
            finally:
                stranger.close()
            return tokens

    assert asyncio.run(go()) == clean_tokens
