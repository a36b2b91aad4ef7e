"""Devices that join a running fleet: the same text as an undisturbed run (issue 10, item 3).

Real ``tpfed peer`` processes on loopback. A device given to a running fleet
(:meth:`Fleet.join`) is connected off the token path (handshake, HELLO, probe on a helper
thread), then planned in at the next token boundary with minimal movement
(``planner.replan``: a newcomer only takes units where that shortens the token, or fills a
replica set short of members); the moved shares are pushed and the KV caches of every device
whose assignment changed are rebuilt by replaying the logged attention inputs. At temperature
0 the text must be exactly the undisturbed one.

The fleets are planned by capability: a join is always planned by the measured costs
(``replan`` pulls units to a newcomer only while that shortens a stage), so planning the
first devices the same way keeps one cost model for the whole run. Whether the newcomer gets
units then depends on the link and speed it measured; the tests check that bytes move if and
only if it was given units (and, when it was not, that the plan says why)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from tpfed.protocol import auth

from tpfed.compute.int8_forward import Int8Transformer
from tpfed.model.sampling import Sampler
from tpfed.runtime.localpeers import LocalPeers
from tpfed.runtime.session import Fleet, RunOptions, generate_local

STEPS = 200
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def undisturbed(model):
    q8, tok = model
    return generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))[0]


def _check_join(record: dict) -> None:
    units = record["kv_groups"] + record["mlp_columns"]
    if units:
        assert record["bytes_moved"] > 0 and record["replayed_frames"] > 0
    else:
        assert record["bytes_moved"] == 0 and record["why_not"]


async def _run(model, n_start: int, n_spare: int, events: dict[int, tuple], *, replicas: int = 1,
               deadline_s: float = 2.0):
    """Generate on ``n_start`` local peers with ``n_spare`` more running; at the positions of
    ``events``: ("kill", i) SIGKILLs peer i, ("join", i) joins spare peer i from a task,
    ("leave", i) says peer i leaves. Returns the result, the fleet's coordinator and the peer
    URIs."""
    peers = LocalPeers(n_start + n_spare)
    async with peers as uris:
        opts = RunOptions(peers=",".join(uris[:n_start]), prompt=PROMPT, steps=STEPS,
                          strategy="capability", deadline_s=deadline_s, key_file=peers.key_file,
                          replicas=replicas)
        async with Fleet(opts, model=model) as fleet:
            tok = fleet.tokenizer
            prompt_ids = tok.encode(PROMPT, bos=True)
            produced = len(prompt_ids)
            tasks: list[asyncio.Task] = []

            def on_token(prev: int, token: int) -> None:
                nonlocal produced
                produced += 1
                what = events.get(produced)
                if what is None:
                    return
                kind, i = what
                if kind == "kill":
                    os.kill(peers.procs[i].pid, signal.SIGKILL)
                elif kind == "join":
                    tasks.append(asyncio.get_running_loop().create_task(fleet.join(uris[i])))
                elif kind == "leave":
                    assert fleet.coord.leave(fleet.coord.peers[i].name)

            result = await fleet.generate_ids(prompt_ids, Sampler(0.0), on_token=on_token)
            for t in tasks:
                await t
            return result, fleet.coord, uris


@pytest.mark.slow
def test_a_peer_joined_mid_run_gives_the_undisturbed_text(model, undisturbed):
    result, coord, uris = asyncio.run(_run(model, 1, 1, {30: ("join", 1)}))
    assert result.tokens == undisturbed
    joins = result.to_json()["joins"]
    assert len(joins) == 1 and joins[0]["device"] == uris[1]
    assert 30 <= joins[0]["position"] < len(undisturbed)
    _check_join(joins[0])
    assert len(coord.peers) == 2
    print("\njoin:", json.dumps(joins[0]))


@pytest.mark.slow
def test_a_fresh_peer_joined_after_a_loss_gives_the_undisturbed_text(model, undisturbed):
    result, coord, uris = asyncio.run(_run(model, 2, 1, {40: ("kill", 0), 80: ("join", 2)},
                                           deadline_s=1.0))
    assert result.tokens == undisturbed
    # (the capability plan may have given the killed peer nothing: then nothing waits for it
    # and its loss goes unnoticed, which costs nothing)
    assert [r["device"] for r in result.stats.recoveries] in ([uris[0]], [])
    (join,) = result.stats.joins
    assert join["device"] == uris[2] and join["position"] >= 80
    _check_join(join)
    assert {uris[1], uris[2]} <= {p.name for p in coord.peers}


@pytest.mark.slow
def test_a_joining_peer_fills_a_replica_set_short_of_a_member(model, undisturbed):
    # the member goes by saying so: with replicas its silence may go unnoticed for a while
    # (the other member's partials serve the set), and this test is about the join
    result, coord, uris = asyncio.run(_run(model, 2, 1, {40: ("leave", 0), 80: ("join", 2)},
                                           replicas=2, deadline_s=1.0))
    assert result.tokens == undisturbed
    (rec,) = result.stats.recoveries
    assert rec["device"] == uris[0] and rec["bytes_moved"] == 0  # losing a replica moves nothing
    (join,) = result.stats.joins
    c = coord.config
    # the set's whole share, and its KV cache replayed: every layer's attention, every position
    assert (join["kv_groups"], join["mlp_columns"]) == (c.n_layers * c.n_kv_heads, c.n_layers * c.hidden_dim)
    assert join["devices_changed"] == [uris[2]]
    assert join["bytes_moved"] > 0 and join["replayed_frames"] == c.n_layers * join["position"]
    assert coord.plan.replica_sets == [[uris[1], uris[2]]]


@pytest.mark.slow
def test_a_peer_that_says_it_leaves_is_planned_out_without_waiting(model, undisturbed):
    result, coord, uris = asyncio.run(_run(model, 2, 0, {50: ("leave", 0)}, deadline_s=5.0))
    assert result.tokens == undisturbed
    (rec,) = result.stats.recoveries
    assert rec["detect_seconds"] == 0.0 and rec["seconds"] < 2.0  # no deadline waited for
    assert len(coord.peers) == 1


def test_local_peers_joined_between_generations_are_planned_in_at_once(model, undisturbed):
    async def go():
        opts = RunOptions(peers="local:1", prompt=PROMPT, steps=STEPS, strategy="capability")
        async with Fleet(opts, model=model) as fleet:
            first = await fleet.generate(PROMPT, Sampler(0.0))
            held = fleet.coord.history.length
            names = await fleet.join("local:1")
            assert names == ["local-1"]
            assert not fleet.coord.joining  # planned in already (the fleet was idle)
            (join,) = fleet.coord.joins
            assert join["position"] == held
            _check_join(join)
            second = await fleet.generate(PROMPT, Sampler(0.0))
            return first, second, fleet.peers_json()

    first, second, peers = asyncio.run(go())
    assert first.tokens == undisturbed and second.tokens == undisturbed
    assert [p["name"] for p in peers] == ["local-0", "local-1"]
    assert second.to_json()["joins"] == []  # joined before this generation


def test_a_peer_announced_on_the_bus_joins_a_running_server(stories260k_dir, tmp_path):
    """``tpfed serve --bus``: a peer that announces itself while the server runs is joined
    (planned in while the server is idle), the next request gives the same text, and its
    goodbye plans it out again."""
    if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    pytest.importorskip("paho.mqtt.client")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve_bus import get_json, start_server, stop_server, wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    mosq = subprocess.Popen([exe, "-c", str(conf)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    bus = f"mqtt://127.0.0.1:{port}"
    key_file = str(auth.write_key_file(tmp_path / "federation.key", auth.new_key()))
    server = peer = None
    try:
        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, 10, "mosquitto")
        server, base = start_server(["--peers", "local:1", "--steps", "96", "--bus", bus,
                                     "--key-file", key_file, "--strategy", "capability",
                                     "--model", str(stories260k_dir / "stories260K.bin")])

        def complete() -> str:
            body = json.dumps({"model": "stories260K", "prompt": PROMPT, "temperature": 0,
                               "max_tokens": 60}).encode()
            req = urllib.request.Request(base + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["choices"][0]["text"]

        before = complete()
        peer = subprocess.Popen([sys.executable, "-m", "tpfed", "peer", "--listen", "udp://127.0.0.1:0",
                                 "--name", "bus-joiner", "--key-file", key_file, "--bus", bus],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def devices() -> list[str]:
            return [d["name"] for d in get_json(base + "/api/state")["models"][0]["devices"]]

        def events() -> str:
            return " ".join(e["text"] for e in get_json(base + "/api/state")["events"])

        wait_for(lambda: "bus: device bus-joiner joined stories260K" in events(), 30,
                 "the announced peer joined")
        assert len(devices()) == 2
        assert complete() == before
        peer.send_signal(signal.SIGTERM)  # a goodbye on the bus: planned out
        wait_for(lambda: len(devices()) == 1, 30, "the peer planned out after its goodbye")
        assert complete() == before
    finally:
        for p in (peer, mosq):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if server is not None:
            stop_server(server)
