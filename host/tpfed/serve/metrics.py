"""Prometheus metrics of ``tpfed serve`` (``/metrics``), in a registry of their own.

Per-device stage times: the coordinator does not time devices one by one (the UDP fast path
gathers a stage's partials from every owner in one C call), so :func:`instrument` times each
(layer, stage) round trip in the host and attributes it to every device holding part of that
stage: ``tpfed_device_stage_seconds{device,stage}`` is the time of the stages a device took
part in, the slowest owner's time for all of them. Utilisation is that time over the
generation's wall time.
"""

from __future__ import annotations

import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGE_NAMES = ("attention", "mlp")
STAGE_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 1.0, 5.0)
TTFT_BUCKETS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.weight_bytes = Counter("tpfed_weight_bytes_pushed", "WEIGHTS payload bytes pushed to devices",
                                    ["model", "device"], registry=r)
        self.tokens = Counter("tpfed_tokens_generated", "tokens generated (sampled and returned)",
                              ["model"], registry=r)
        self.prompt_tokens = Counter("tpfed_prompt_tokens", "prompt tokens of requests", ["model"],
                                     registry=r)
        self.positions = Counter("tpfed_positions_computed", "forward passes run on the fleet",
                                 ["model"], registry=r)
        self.positions_reused = Counter(
            "tpfed_positions_reused", "prompt positions whose KV cache the devices already held "
            "(a prefix shared with the previous sequence)", ["model"], registry=r)
        self.requests = Counter("tpfed_requests", "API requests", ["endpoint", "status"], registry=r)
        self.stage_seconds = Histogram(
            "tpfed_device_stage_seconds", "time of one layer stage (broadcast to gather) the "
            "device took part in", ["model", "device", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.ttft = Histogram("tpfed_time_to_first_token_seconds",
                              "request received to first token sampled", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tokens_per_s = Gauge("tpfed_tokens_per_second", "positions per second of the last "
                                  "generation", ["model"], registry=r)
        self.queue = Gauge("tpfed_requests_waiting", "requests waiting for the fleet", registry=r)
        self.devices = Gauge("tpfed_devices", "devices connected and planned", ["model"], registry=r)
        self.lost = Counter("tpfed_devices_lost", "devices declared lost", ["device"], registry=r)
        self.recovered = Counter("tpfed_devices_recovered", "lost devices whose units were taken "
                                 "over (re-planned, pushed, KV replayed)", ["device"], registry=r)
        self.bus_devices = Gauge("tpfed_bus_devices", "devices announced online on the MQTT bus",
                                 registry=r)
        self.bus_joins = Counter("tpfed_bus_device_joins", "device announcements on the bus", registry=r)
        self.bus_leaves = Counter("tpfed_bus_device_leaves", "devices gone from the bus (last will or "
                                  "goodbye)", registry=r)
        self.models_loaded = Counter("tpfed_models_loaded", "models loaded", ["source"], registry=r)
        self.model_errors = Counter("tpfed_model_errors", "model announcements refused", registry=r)
        # the lost/recovered counters exist (at 0) before anything is lost
        self.lost.labels(device="any")
        self.recovered.labels(device="any")

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StageTimer:
    """Per-stage timing of one coordinator (see the module docstring). ``owners`` maps
    (layer, stage) to the devices holding part of it. Durations are buffered during a
    generation and observed after it, so the token loop only appends."""

    def __init__(self, metrics: Metrics, model: str, owners: dict[tuple[int, int], list[str]]) -> None:
        self.metrics, self.model, self.owners = metrics, model, owners
        self.buf: list[tuple[int, int, float]] = []
        self.busy_s: dict[str, float] = defaultdict(float)  # since the server started
        self.stage_s: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0])
        self.wall_s = 0.0
        self.last_util: dict[str, float] = {}

    def record(self, layer: int, stage: int, dt: float) -> None:
        self.buf.append((layer, stage, dt))

    def flush(self, wall_s: float) -> None:
        buf, self.buf = self.buf, []
        busy: dict[str, float] = defaultdict(float)
        hist = self.metrics.stage_seconds
        children = {}
        for layer, stage, dt in buf:
            for dev in self.owners.get((layer, stage), ()):
                key = (dev, stage)
                child = children.get(key)
                if child is None:
                    child = children[key] = hist.labels(model=self.model, device=dev,
                                                        stage=STAGE_NAMES[stage])
                child.observe(dt)
                busy[dev] += dt
                acc = self.stage_s[key]
                acc[0] += dt
                acc[1] += 1
        for dev, b in busy.items():
            self.busy_s[dev] += b
            self.last_util[dev] = b / wall_s if wall_s > 0 else 0.0
        self.wall_s += wall_s

    def mean_stage_ms(self, dev: str, stage: int) -> float | None:
        total, n = self.stage_s.get((dev, stage), (0.0, 0))
        return 1e3 * total / n if n else None


def instrument(coord, timer: StageTimer) -> None:
    """Time every (layer, stage) round trip of ``coord`` (wraps its ``partials_remote`` on this
    instance; the coordinator itself is unchanged)."""
    inner = coord.partials_remote
    record, clock = timer.record, time.perf_counter

    async def timed(layer, stage, x, pos):
        t0 = clock()
        out = await inner(layer, stage, x, pos)
        record(layer, int(stage), clock() - t0)
        return out

    coord.partials_remote = timed


def stage_owners(plan) -> dict[tuple[int, int], list[str]]:
    """(layer, stage) -> the names of the devices holding part of it, in plan order."""
    out: dict[tuple[int, int], list[str]] = {}
    for dev in plan.devices:
        for layer, share in dev.layers.items():
            if share.kv_groups:
                out.setdefault((layer, 0), []).append(dev.name)
            if share.mlp_ranges:
                out.setdefault((layer, 1), []).append(dev.name)
    return out
