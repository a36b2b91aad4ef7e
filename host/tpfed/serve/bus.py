"""The MQTT fleet bus (paho-mqtt; a broker such as Debian's mosquitto).

Topics (payloads are JSON):

- ``tpfed/devices/<id>``: a peer's announcement, retained, ``{"id", "name", "uri", "online":
  true, "device_class", "int8_macs", "memory_bytes", ...}``. The peer's last will, also
  retained, replaces it with ``{"id", "online": false, "reason": "lost"}`` if the peer goes
  away without a goodbye; a peer that stops cleanly publishes ``"reason": "goodbye"``.
- ``tpfed/models/<name>``: a model announcement, retained: ``{"path": ...}`` or ``{"url": ...}``,
  ``"sha256"``, optionally ``"format"``, ``"tokenizer"`` (a path, or ``{"path"|"url",
  "sha256"}``) and ``"peers"``. An empty retained payload withdraws the model.
- ``tpfed/models/<name>/status``: what the server made of it, retained: ``{"state": "loading" |
  "ready" | "error" | "removed", ...}``; an error carries one ``"error"`` line.

One client is kept per process; paho runs its network loop on its own thread (reconnecting
by itself) and messages are handed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from tpfed.errors import TpfedError

DEVICES = "tpfed/devices/"
MODELS = "tpfed/models/"
DEFAULT_PORT = 1883
_SAFE = re.compile(r"[^A-Za-z0-9_.:@-]+")


class BusError(TpfedError):
    """The bus URL is wrong or the broker cannot be reached."""


def parse_bus_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise BusError(f"--bus {url!r}: expected mqtt://HOST[:PORT]")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise BusError(f"--bus {url!r}: bad port") from None
    return parts.hostname, port


def topic_id(name: str) -> str:
    """``name`` as one topic level (no ``/``, ``+``, ``#``)."""
    return _SAFE.sub("_", name).strip("_") or "device"


def _client(client_id: str):
    import paho.mqtt.client as mqtt

    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv311, clean_session=True)


class MqttBus:
    """A kept MQTT client for asyncio code: ``await bus.connect()``, ``bus.subscribe(topic)``,
    ``bus.publish(...)``; ``on_message(topic, payload, retained)`` runs on the asyncio loop."""

    def __init__(self, url: str, *, client_id: str | None = None,
                 on_message: Callable[[str, bytes, bool], None] | None = None,
                 will: tuple[str, bytes] | None = None) -> None:
        self.url = url
        self.host, self.port = parse_bus_url(url)
        self.on_message = on_message or (lambda topic, payload, retained: None)
        self._topics: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        self._client = _client(client_id or f"tpfed-serve-{uuid.uuid4().hex[:8]}")
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 5)

    # paho's thread
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            return
        for t in self._topics:
            client.subscribe(t, qos=1)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_message, msg.topic, bytes(msg.payload),
                                            bool(msg.retain))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self, timeout: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._client.connect_async(self.host, self.port, keepalive=15)
        except (OSError, ValueError) as exc:
            raise BusError(f"MQTT broker {self.url}: {exc}") from None
        self._client.loop_start()
        ok = await asyncio.to_thread(self._connected.wait, timeout)
        if not ok:
            self._client.loop_stop()
            raise BusError(f"MQTT broker {self.url} did not accept a connection within {timeout:.0f} s")

    def subscribe(self, topic: str) -> None:
        self._topics.append(topic)
        if self.connected:
            self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes | str | dict | None, *, retain: bool = False):
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self._client.publish(topic, payload, qos=1, retain=retain)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.disconnect)
        await asyncio.to_thread(self._client.loop_stop)


class PeerAnnouncer:
    """A peer on the bus (``tpfed peer --bus``): announces itself retained on
    ``tpfed/devices/<id>`` with a last will, and says goodbye on :meth:`close`. Synchronous:
    the peer's serve loop is C, so paho's own thread does the network."""

    def __init__(self, url: str, info: dict, timeout: float = 10.0) -> None:
        self.host, self.port = parse_bus_url(url)
        self.id = topic_id(str(info.get("id") or info.get("name") or "device"))
        self.topic = DEVICES + self.id
        self.info = {**info, "id": self.id, "online": True}
        self._client = _client(f"tpfed-peer-{self.id}-{uuid.uuid4().hex[:6]}")
        self._client.will_set(self.topic, json.dumps({"id": self.id, "online": False,
                                                      "reason": "lost"}), qos=1, retain=True)
        self._up = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties=None):
            if not reason_code.is_failure:
                client.publish(self.topic, json.dumps({**self.info, "t": time.time()}), qos=1,
                               retain=True)
                self._up.set()

        self._client.on_connect = on_connect
        self._client.reconnect_delay_set(0.2, 5)
        try:
            self._client.connect_async(self.host, self.port, keepalive=5)
        except (OSError, ValueError) as exc:
            raise BusError(f"MQTT broker {url}: {exc}") from None
        self._client.loop_start()
        if not self._up.wait(timeout):
            self._client.loop_stop()
            raise BusError(f"MQTT broker {url} did not accept a connection within {timeout:.0f} s")

    def close(self) -> None:
        info = self._client.publish(self.topic, json.dumps({"id": self.id, "online": False,
                                                            "reason": "goodbye"}), qos=1, retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(2.0)
        self._client.disconnect()
        self._client.loop_stop()


def announce_listening(url: str):
    """The ``on_listening`` hook of :func:`tpfed.runtime.desktop_peer.run_peer` for ``tpfed peer
    --bus``: announce the peer once it listens, say goodbye when it stops."""
    parse_bus_url(url)  # a bad URL fails before the peer starts

    def on_listening(host: str, port: int, info: dict):
        import socket

        reach = host
        if host in ("0.0.0.0", "::"):  # listening everywhere: announce the host's name
            reach = socket.gethostname()
        shown = f"[{reach}]" if ":" in reach else reach
        announcer = PeerAnnouncer(url, {**info, "id": info["name"], "uri": f"udp://{shown}:{port}"})
        print(f"tpfed peer {info['name']}: announced on {url} as {announcer.topic}", flush=True)
        return announcer.close

    return on_listening
