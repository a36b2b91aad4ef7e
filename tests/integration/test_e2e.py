"""stories260K across real peer processes over loopback UDP (issue: distributed inference).

One set of five ``tpfed peer`` processes serves every configuration (a peer takes a new ASSIGN
per run); each run is compared with the single-process int8 forward."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time

import pytest
from tpfed.protocol import auth
from tpfed.protocol.codec import Frame, decode_frame, encode_frame
from tpfed.protocol.fastpath import encode_activation
from tpfed.protocol.schema import ErrorCode, MsgType

from tpfed.compute.int8_forward import Int8Transformer
from tpfed.compute.kernels import empty_q8_0
from tpfed.compute.share import serialize_layer_share
from tpfed.model.sampling import Sampler
from tpfed.runtime.localpeers import LocalPeers
from tpfed.runtime.peer_auth import PeerAuth
from tpfed.runtime.session import RunOptions, generate_local, run
from tpfed.transport import open_udp_link

STEPS = 96
PROMPT = "Once upon a time"
FLOAT_GREEDY = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
                "in the park.")


@pytest.fixture(scope="module")
def single_device_tokens(model):
    q8, tok = model
    return generate_local(Int8Transformer(q8), tok, PROMPT, STEPS, Sampler(0.0))[0]


@pytest.fixture(scope="module")
def local_peers():
    loop = asyncio.new_event_loop()
    peers = LocalPeers(5)
    loop.run_until_complete(peers.__aenter__())
    yield peers
    loop.run_until_complete(peers.stop())
    loop.close()


@pytest.mark.parametrize("strategy", ["round-robin", "capability"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_same_text_for_any_peer_count_and_strategy(model, local_peers, single_device_tokens, n, strategy):
    opts = RunOptions(peers=",".join(local_peers.uris[:n]), prompt=PROMPT, steps=STEPS,
                      strategy=strategy, key_file=local_peers.key_file)
    result = asyncio.run(run(opts, model=model))
    assert result.tokens == single_device_tokens
    assert result.text.startswith(FLOAT_GREEDY)
    assert len(result.peers) == n
    plan = result.plan
    plan.validate()
    # every peer's share is used when there are at most as many peers as KV groups
    if n <= model[0].config.n_kv_heads and strategy == "round-robin":
        assert all(p["kv_groups"] > 0 for p in result.peers)
    s = result.stats
    assert s.wire_bytes_per_token >= s.min_wire_bytes_per_token > 0


def test_cli_run_json_local_peers(stories260k_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tpfed", "run", "--peers", "local:3", "--steps", "64",
         "--model", str(stories260k_dir / "stories260K.bin"), "--json", PROMPT],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "tokens", "tokens_per_s", "wire_bytes_per_token",
                        "min_wire_bytes_per_token", "peers"}
    assert out["text"].startswith(FLOAT_GREEDY[:60])
    assert out["tokens"] == 64 and out["tokens_per_s"] > 0
    assert [p["name"] for p in out["peers"]] == ["local-0", "local-1", "local-2"]
    # headers, CRCs and the 20-byte authentication trailer of every frame are the difference:
    # 72 bytes per device and stage, 22% of stories260K's 324-byte minimum (0.4% at dim 4096)
    assert out["wire_bytes_per_token"] <= 1.3 * out["min_wire_bytes_per_token"]


def test_cli_run_streams_text_like_llama2c(stories260k_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tpfed", "run", "--peers", "local:2", "--steps", "40",
         "--model", str(stories260k_dir / "stories260K.bin"), PROMPT],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(FLOAT_GREEDY[:50])
    assert "tok/s" in proc.stderr and "wire bytes/token" in proc.stderr


def test_silent_peer_fails_the_run_with_its_name_within_the_deadline(stories260k_dir, tmp_path):
    key_file = auth.write_key_file(tmp_path / "key", auth.new_key())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        uri = f"udp://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tpfed", "run", "--peers", f"local:1,{uri}", "--deadline", "1",
             "--key-file", str(key_file),
             "--model", str(stories260k_dir / "stories260K.bin"), "--steps", "16", PROMPT],
            capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    assert uri in proc.stderr and "did not answer" in proc.stderr
    assert proc.stdout == ""  # nothing generated, nothing printed
    assert proc.stderr.strip().splitlines()[-1].startswith("tpfed: error: peer ")
    assert "Traceback" not in proc.stderr
    assert elapsed < 30


def test_corrupted_shard_is_refused_by_a_real_peer(model):
    q8, _ = model
    c = q8.config

    async def scenario():
        peers = LocalPeers(1)
        async with peers as uris:
            link = await open_udp_link(uris[0], name="test")
            try:
                peer_auth, session = await handshake(link, peers.key)

                async def ask(frame: bytes) -> Frame:
                    await link.send(peer_auth.seal(frame))
                    reply = await link.recv(5)
                    assert peer_auth.open(reply)
                    return decode_frame(reply)

                hello = {"device_class": 0, "name": "test", "ram_kb": 0, "psram_kb": 0,
                         "flash_kb": 0, "cpu_mhz": 0, "cores": 0, "features": 0, "int8_macs": 0,
                         "battery_pct": 255, "temperature_dc": -32768, "transports": 0,
                         "max_frame": 65535, "arena_kb": 0}
                assert (await ask(encode_frame(Frame(MsgType.HELLO, hello, dst=1)))).type == MsgType.HELLO
                assign = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers,
                          "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "seq_len": 32,
                          "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                          "entries": [{"layer": 0, "kv_groups": [0], "mlp_ranges": []}]}
                reply = await ask(encode_frame(Frame(MsgType.ASSIGN, assign, dst=1, session=session)))
                assert reply.type == MsgType.ACK
                blob = bytearray(serialize_layer_share(q8, 0, (0,), ()))
                digest = hashlib.sha256(blob).digest()
                blob[len(blob) // 2] ^= 0x40  # one flipped bit in transit
                reply = await ask(encode_frame(Frame(MsgType.WEIGHTS, {
                    "shard_id": 0, "offset": 0, "total": len(blob), "sha256": digest,
                    "data": bytes(blob)}, dst=1, session=session)))
                assert reply.type == MsgType.ERROR
                assert reply.payload["code"] == ErrorCode.SHARD_HASH_MISMATCH
                assert "refused" in reply.payload["text"] and "layer 0" in reply.payload["text"]
                # the peer is not ready: an activation is answered with an error, not a partial
                x = empty_q8_0(c.dim)
                x.qs[:] = 1
                x.d[:] = 0x3C00
                reply = await ask(encode_activation(0, 0, 0, x.qs, x.d, session=session))
                assert reply.type == MsgType.ERROR and reply.payload["code"] == ErrorCode.BAD_STATE
            finally:
                await link.close()

    asyncio.run(scenario())


async def handshake(link, key: bytes, device_id: int = 1):
    """Run the key handshake with the peer behind ``link`` as a coordinator would; returns the
    session's PeerAuth and the session number."""
    hs = auth.CoordinatorHandshake(key, device_id)
    await link.send(encode_frame(Frame(MsgType.AUTH, hs.challenge(), dst=device_id,
                                       session=hs.session_id)))
    confirm = hs.on_response(decode_frame(await link.recv(5)).payload)
    peer_auth = PeerAuth(auth.session_key(key, hs.nonce_c, hs.nonce_p, device_id, hs.session_id),
                         hs.session_id)
    await link.send(encode_frame(Frame(MsgType.AUTH, confirm, dst=device_id, session=hs.session_id)))
    ack = await link.recv(5)
    assert peer_auth.open(ack) and decode_frame(ack).type == MsgType.ACK
    return peer_auth, hs.session_id
