"""Models announced on the bus (``tpfed/models/<name>``): fetched, verified, loaded, planned,
pushed and listed under ``/v1/models``; the outcome is published on
``tpfed/models/<name>/status`` (one clear error line when the model is refused).

Which peers a new model runs on: the announcement's ``"peers"``, else the server's
``--peers``. Peers the server starts itself (``local:N``, ``emu:N``) are started anew for each
model, so models are served side by side. Fixed peers (``udp://``, serial) hold one share set
at a time: a model announced for them replaces the one they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tpfed.errors import TpfedError
from tpfed.model.fetch import sha256_file
from tpfed.runtime.peerspec import parse_peers
from tpfed.serve.bus import MODELS
from tpfed.serve.engine import Engine

MAX_DOWNLOAD = 8 << 30
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class AnnouncementError(TpfedError, ValueError):
    """A model announcement the server refuses (published back as its status)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tpfed" / "registry"


def _source(spec, what: str) -> tuple[str | None, str | None, str | None]:
    """(path, url, sha256) of a file named in an announcement."""
    if isinstance(spec, str):
        spec = {"url": spec} if "://" in spec else {"path": spec}
    if not isinstance(spec, dict):
        raise AnnouncementError(f"{what}: expected an object with path or url")
    path, url, digest = spec.get("path"), spec.get("url"), spec.get("sha256")
    if (path is None) == (url is None):
        raise AnnouncementError(f"{what}: give exactly one of path or url")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.match(digest)):
        raise AnnouncementError(f"{what}: sha256 must be 64 hex digits")
    return path, url, digest.lower() if digest else None


def fetch_verified(path: str | None, url: str | None, digest: str | None, what: str,
                   cache: Path) -> Path:
    """The file, local or downloaded into ``cache/<sha256>/``, checked against ``digest``."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise AnnouncementError(f"{what}: no such file: {p}")
        if digest is not None:
            actual = sha256_file(p)
            if actual != digest:
                raise AnnouncementError(f"{what}: sha256 mismatch for {p}: announced {digest}, "
                                        f"file has {actual}")
        return p
    assert url is not None
    if digest is None:
        raise AnnouncementError(f"{what}: a URL needs its sha256")
    name = Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1].split("?")[0])).name or "model.bin"
    folder = cache / digest
    target = folder / name
    if target.is_file() and sha256_file(target) == digest:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                size += len(chunk)
                if size > MAX_DOWNLOAD:
                    raise AnnouncementError(f"{what}: {url} is larger than {MAX_DOWNLOAD >> 30} GiB")
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise AnnouncementError(f"{what}: sha256 mismatch for {url}: announced {digest}, "
                                    f"downloaded {h.hexdigest()} ({size} bytes)")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AnnouncementError(f"{what}: download of {url} failed: "
                                f"{getattr(exc, 'reason', None) or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


class ModelRegistry:
    def __init__(self, engine: Engine, publish, cache: Path | None = None) -> None:
        self.engine = engine
        self.publish = publish  # (topic, dict, retain=True)
        self.cache = cache or cache_root()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def on_message(self, name: str, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self.handle(name, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _status(self, name: str, state: str, **extra) -> None:
        status = {"model": name, "state": state, "t": time.time(), **extra}
        self.engine.bus_models[name] = status
        self.engine.version += 1
        self.publish(f"{MODELS}{name}/status", status)

    async def handle(self, name: str, payload: bytes) -> None:
        async with self._lock:
            await self._handle(name, payload)

    async def _handle(self, name: str, payload: bytes) -> None:
        engine = self.engine
        if not payload.strip():
            if name in engine.models:
                await engine.remove_model(name)
                self._status(name, "removed")
            return
        t0 = time.perf_counter()
        try:
            if not _NAME.match(name):
                raise AnnouncementError(f"model name {name!r}: use letters, digits and _ . : -")
            try:
                spec = json.loads(payload)
            except ValueError as exc:
                raise AnnouncementError(f"announcement is not JSON: {exc}") from None
            if not isinstance(spec, dict):
                raise AnnouncementError("announcement must be a JSON object")
            path, url, digest = _source(spec, "model")
            if digest is None:
                raise AnnouncementError("model: sha256 is required")
            served = engine.models.get(name)
            if served is not None and served.source.get("sha256") == digest and not served.broken:
                return  # the same model again (a retained message seen after a reconnect)
            fmt = spec.get("format", "llama2c")
            if fmt not in ("llama2c", "gguf"):
                raise AnnouncementError(f"format {fmt!r}: the bus takes single-file models "
                                        "(llama2c or gguf); a Hugging Face folder has no one sha256")
            peers = spec.get("peers") or engine.opts.peers
            if not isinstance(peers, str):
                raise AnnouncementError("peers must be a --peers string")
            specs = parse_peers(peers)
            engine.log(f"registry: model {name} announced ({url or path})")
            self._status(name, "loading")
            model_file = await asyncio.to_thread(fetch_verified, path, url, digest, "model", self.cache)
            tok = spec.get("tokenizer")
            tok_file = None
            if tok is not None:
                tpath, turl, tdigest = _source(tok, "tokenizer")
                tok_file = await asyncio.to_thread(fetch_verified, tpath, turl, tdigest, "tokenizer",
                                                   self.cache)
            elif url is not None:
                raise AnnouncementError("a model given by URL needs its tokenizer (path or url)")
            from tpfed.runtime.session import load_model

            model = await asyncio.to_thread(load_model, str(model_file),
                                            None if tok_file is None else str(tok_file))
            t_loaded = time.perf_counter()
            if not all(s.kind in ("local", "emu") for s in specs):
                for other in [n for n in engine.models if n != name]:
                    engine.log(f"registry: fixed peers hold one model at a time: {name} replaces {other}")
                    await engine.remove_model(other)
                    self._status(other, "removed", replaced_by=name)
            m = await engine.add_model(name, model, model_path=model_file, peers=peers,
                                       load_s=t_loaded - t0,
                                       source={"sha256": digest, "path": str(model_file),
                                               "url": url, "format": fmt})
            await engine.warm_up(name)
        except (TpfedError, OSError, ValueError) as exc:
            engine.metrics.model_errors.inc()
            engine.log(f"registry: model {name} refused: {exc}", "error")
            self._status(name, "error", error=str(exc))
            return
        total = time.perf_counter() - t0
        engine.metrics.models_loaded.labels(source="bus").inc()
        self._status(name, "ready", load_s=round(m.load_s, 3), setup_s=round(m.fleet.setup_s, 3),
                     weight_bytes=m.weight_bytes, total_s=round(total, 3),
                     devices=len(m.fleet.plan.devices))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class FleetBus:
    """``tpfed serve --bus``: one kept client that follows devices and model announcements."""

    def __init__(self, url: str, engine: Engine) -> None:
        from tpfed.serve.bus import DEVICES, MqttBus

        self.engine = engine
        self.devices_prefix = DEVICES
        self.bus = MqttBus(url, on_message=self._on_message)
        self.registry = ModelRegistry(engine, lambda topic, obj: self.bus.publish(topic, obj, retain=True))

    async def start(self) -> None:
        await self.bus.connect()
        self.bus.subscribe(self.devices_prefix + "+")
        self.bus.subscribe(MODELS + "+")
        self.engine.bus_url = self.bus.url
        self.engine.log(f"bus: connected to {self.bus.url}")

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(self.devices_prefix):
            dev_id = topic[len(self.devices_prefix):]
            try:
                info = json.loads(payload) if payload.strip() else {"online": False}
            except ValueError:
                self.engine.log(f"bus: {topic}: not JSON, ignored", "error")
                return
            if not isinstance(info, dict):
                return
            if info.get("online"):
                self.engine.bus_device_join({**info, "id": dev_id})
            else:
                self.engine.bus_device_leave(dev_id, "gone (last will)" if info.get("reason") == "lost"
                                             else "offline")
        elif topic.startswith(MODELS):
            name = topic[len(MODELS):]
            if "/" not in name:
                self.registry.on_message(name, payload)

    async def close(self) -> None:
        await self.registry.close()
        await self.bus.close()
