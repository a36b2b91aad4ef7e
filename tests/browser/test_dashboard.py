"""The ``tpfed serve`` dashboard in headless Chromium (Debian's ``chromium``), driven over the
DevTools protocol: the page loads from the server alone (no CDN), shows the live devices and
the plan, follows a generation live over SSE; a screenshot is saved as a test artifact."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

websockets_sync = pytest.importorskip("websockets.sync.client")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_serve import start_server, stop_server  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1100"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Cdp:
    """A minimal DevTools protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        self._conn = websockets_sync.connect(ws_url, max_size=64 << 20, open_timeout=20)
        self.ws = self._conn.__enter__()
        self.ids = itertools.count(1)
        self.console: list[str] = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if msg.get("method") in ("Runtime.exceptionThrown",):
                self.console.append(json.dumps(msg["params"])[:500])
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.eval(expr)
            if v:
                return v
            time.sleep(0.1)
        raise AssertionError(f"page never satisfied: {expr}")

    def close(self) -> None:
        self._conn.__exit__(None, None, None)


@pytest.fixture(scope="module")
def server(stories260k_dir):
    proc, base = start_server(["--peers", "local:2", "--steps", "128",
                               "--model", str(stories260k_dir / "stories260K.bin")])
    yield base
    stop_server(proc)


@pytest.fixture
def page(tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port: list[int] = []

    def read() -> None:
        for line in proc.stderr:
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m and not port:
                port.append(int(m.group(1)))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not port:
        assert proc.poll() is None, "chromium exited"
        assert time.monotonic() < deadline, "chromium did not start its DevTools endpoint"
        time.sleep(0.1)
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/json/list", timeout=10).read())
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    cdp = Cdp(ws_url)
    cdp.call("Page.enable")
    cdp.call("Runtime.enable")
    cdp.call("Network.enable")
    yield cdp
    cdp.close()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_dashboard_shows_live_devices_and_plan(server, page, tmp_path_factory):
    page.call("Page.navigate", url=server + "/")
    page.wait("document.readyState === 'complete'")
    page.wait("document.getElementById('conn').textContent === 'live'")
    names = page.wait("(() => { const r = [...document.querySelectorAll('#devices tbody tr')]"
                      ".map(t => t.dataset.device); return r.length >= 2 ? r : null })()")
    assert names == ["local-0", "local-1"]
    assert page.eval("document.getElementById('model-name').textContent") == "stories260K"
    # the plan: one row per layer (5) with KV-group and MLP strips, plus the header row
    assert page.eval("document.querySelectorAll('#plan .strip').length") == 10
    cells = page.eval("[...document.querySelectorAll('#devices tbody tr:first-child td')].map(t => t.textContent)")
    assert any("MAC/s" in c for c in cells) and any("µs" in c for c in cells)
    # a generation shows up live (SSE): the token counter grows without reloading
    before = int(page.eval("document.getElementById('s-tokens').textContent") or 0)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}).encode()
    urllib.request.urlopen(urllib.request.Request(server + "/v1/completions", body,
                                                  {"content-type": "application/json"}), timeout=60).read()
    page.wait(f"+document.getElementById('s-tokens').textContent >= {before + 40}", timeout=15)
    page.wait("[...document.querySelectorAll('#devices tbody tr:first-child td')].some(t => /ms|µs/.test(t.textContent) && t.textContent !== '–')")
    shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    out = Path(os.environ.get("TPFED_ARTIFACTS") or tmp_path_factory.mktemp("dashboard")) / "dashboard.png"
    out.write_bytes(base64.b64decode(shot["data"]))
    print(f"\ndashboard screenshot: {out}")
    assert out.stat().st_size > 10_000
    assert not page.console, page.console
