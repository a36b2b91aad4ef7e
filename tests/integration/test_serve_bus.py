"""The MQTT fleet bus and model registry of ``tpfed serve`` (issue 12) against a real broker:
Debian's mosquitto on a loopback port, started here (CI installs the ``mosquitto`` package).
Peers announce themselves retained with a last will; a model announced on the bus is fetched,
verified, loaded, planned, pushed, listed and answering; a bad one gets one error back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

mqtt = pytest.importorskip("paho.mqtt.client")

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import get_json, start_server, stop_server  # noqa: E402

PROMPT = "Once upon a time"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    d = tmp_path_factory.mktemp("mosquitto")
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], cwd=d, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 10, "mosquitto to listen")
    yield f"mqtt://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


class Watcher:
    """A test-side MQTT client that records the last payload of every topic."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.last: dict[str, bytes] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, msg: self.last.__setitem__(msg.topic, bytes(msg.payload))
        self.client.connect(host, int(port))
        self.client.subscribe("tpfed/#", qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload, retain: bool = True) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def status(self, name: str) -> dict | None:
        raw = self.last.get(f"tpfed/models/{name}/status")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def bus_server(broker, stories260k_dir):
    proc, base = start_server(["--peers", "local:2", "--steps", "96", "--bus", broker,
                               "--model", str(stories260k_dir / "stories260K.bin")])
    yield base
    stop_server(proc)


@pytest.fixture
def watcher(broker):
    w = Watcher(broker)
    yield w
    w.close()


def test_peers_announce_themselves_and_their_last_will(bus_server, broker):
    peers = []
    for name in ("bus-peer-a", "bus-peer-b"):
        peers.append(subprocess.Popen([sys.executable, "-m", "tpfed", "peer", "--listen", "udp://127.0.0.1:0",
                                       "--name", name, "--memory-mb", "8", "--bus", broker],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        def listed():
            devs = {d["id"]: d for d in get_json(bus_server + "/api/state")["bus"]["devices"]}
            return devs if {"bus-peer-a", "bus-peer-b"} <= devs.keys() else None

        devs = wait_for(listed, 30, "both peers on the bus")
        assert devs["bus-peer-a"]["uri"].startswith("udp://127.0.0.1:")
        assert devs["bus-peer-a"]["int8_macs"] > 0 and devs["bus-peer-a"]["memory_bytes"] == 8 << 20
        # a clean stop says goodbye; a killed peer is reported by its last will
        peers[0].send_signal(signal.SIGTERM)
        peers[1].kill()
        wait_for(lambda: not ({"bus-peer-a", "bus-peer-b"} & {
            d["id"] for d in get_json(bus_server + "/api/state")["bus"]["devices"]}), 20,
            "both peers gone (goodbye and last will)")
        events = " ".join(e["text"] for e in get_json(bus_server + "/api/state")["events"])
        assert "bus-peer-b gone (last will)" in events
    finally:
        for p in peers:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_model_announced_on_the_bus_is_listed_and_answering(bus_server, watcher, stories260k_dir,
                                                              tmp_path_factory):
    model = stories260k_dir / "stories260K.bin"
    tok = stories260k_dir / "tok512.bin"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    url = (tmp_path_factory.mktemp("registry") / "stories-copy.bin")
    url.write_bytes(model.read_bytes())
    announcement = {"url": url.as_uri(), "sha256": digest, "format": "llama2c",
                    "tokenizer": {"path": str(tok)}}
    t0 = time.perf_counter()
    watcher.publish("tpfed/models/stories-bus", announcement)
    status = wait_for(lambda: (s := watcher.status("stories-bus")) and s["state"] in ("ready", "error") and s,
                      60, "the model's status")
    t_ready = time.perf_counter() - t0
    assert status["state"] == "ready", status
    listed = {m["id"] for m in get_json(bus_server + "/v1/models")["data"]}
    assert {"stories260K", "stories-bus"} <= listed
    body = json.dumps({"model": "stories-bus", "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    req = urllib.request.Request(bus_server + "/v1/completions", body.encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    t_answer = time.perf_counter() - t0
    assert text.startswith(", there was a little girl named Lily")
    load_push = status["load_s"] + status["setup_s"]
    print(f"\nregistry (report): announced -> ready {t_ready:.2f} s, -> first answer {t_answer:.2f} s; "
          f"load {status['load_s']:.2f} s + start/connect/push {status['setup_s']:.2f} s = "
          f"{load_push:.2f} s; ratio {t_answer / load_push:.2f}x; {status['weight_bytes']} bytes pushed")
    # withdrawn: an empty retained message
    watcher.publish("tpfed/models/stories-bus", b"")
    wait_for(lambda: "stories-bus" not in {m["id"] for m in get_json(bus_server + "/v1/models")["data"]},
             30, "the model withdrawn")


@pytest.mark.parametrize("announcement, words", [
    ({"path": "/nonexistent/model.bin", "sha256": "0" * 64}, "no such file"),
    ("not json", "not JSON"),
    ({"path": "__MODEL__", "sha256": "1" * 64}, "sha256 mismatch"),
    ({"path": "__TOK__", "sha256": "__TOKSHA__"}, "model"),
])
def test_a_bad_model_gets_one_clear_error(bus_server, watcher, stories260k_dir, announcement, words):
    tok = stories260k_dir / "tok512.bin"
    if isinstance(announcement, dict):
        announcement = {k: (v.replace("__MODEL__", str(stories260k_dir / "stories260K.bin"))
                            .replace("__TOK__", str(tok))
                            .replace("__TOKSHA__", hashlib.sha256(tok.read_bytes()).hexdigest()))
                        for k, v in announcement.items()}
    name = f"bad-{abs(hash(str(announcement))) % 10**6}"
    watcher.publish(f"tpfed/models/{name}", announcement, retain=False)
    status = wait_for(lambda: watcher.status(name), 30, "an error status")
    assert status["state"] == "error"
    assert words in status["error"] and "\n" not in status["error"]
    assert name not in {m["id"] for m in get_json(bus_server + "/v1/models")["data"]}
    assert get_json(bus_server + "/health")["status"] == "ok"
    watcher.publish(f"tpfed/models/{name}/status", b"")  # leave the broker clean


