"""Set-up progress for the commands that reach peers (``run``, ``demo``, ``chat``): a spinner per
phase (starting local peers and emulated boards, whose firmware is built first; connecting:
boards boot, keys, HELLO, link probes) and bars for the weight push (overall, and per device for small fleets), on standard
error and only when it is a terminal. Status lines (``tpfed: ...``) go to standard error always,
above the bars while they show.

Use: ``p = SetupProgress(); Fleet(..., on_status=p.status, on_phase=p.phase, on_push=p.push)``
(or the same keywords of :func:`tpfed.runtime.session.run`), and ``p.close()`` at the end.
"""

from __future__ import annotations

import sys

MAX_DEVICE_BARS = 8  # more devices than this: only the overall push bar


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_start(facts: dict) -> str:
    """What the start phase does, from the facts :class:`tpfed.runtime.session.Fleet` gives."""
    parts = []
    if facts.get("local"):
        parts.append(_plural(facts["local"], "local peer"))
    for env, n in (facts.get("emu") or {}).items():
        parts.append(f"{n} {env}")
    if facts.get("remote"):
        parts.append(_plural(facts["remote"], "link"))
    return "starting " + ", ".join(parts) if parts else "starting"


class SetupProgress:
    """Progress of a fleet's set-up on standard error (see the module docstring)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._phase_task = None
        self._push_total = None
        self._push_tasks: dict[str, int] = {}

    # -- hooks -------------------------------------------------------------------------------
    def status(self, msg: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"tpfed: {msg}", markup=False, highlight=False,
                                         soft_wrap=True)
        else:
            print(f"tpfed: {msg}", file=sys.stderr, flush=True)

    def phase(self, name: str, facts: dict) -> None:
        if not self.enabled:
            return
        if name == "done":
            self.close()
            return
        progress = self._live()
        self._end_phase()
        if name == "start":
            what = describe_start(facts)
        elif name == "connect":
            what = f"connecting to {_plural(facts.get('peers', 0), 'peer')}"
        elif name == "push":
            sizes: dict[str, int] = facts.get("bytes") or {}
            total = sum(sizes.values()) or None
            self._push_total = progress.add_task(
                "pushing weights",
                total=total, unit=True)
            if 1 < len(sizes) <= MAX_DEVICE_BARS:
                for dev, n in sizes.items():
                    self._push_tasks[dev] = progress.add_task(f"  {dev}", total=n or None, unit=True)
            return
        else:
            what = name
        self._phase_task = progress.add_task(what, total=None, unit=False)

    def push(self, device: str, nbytes: int) -> None:
        if self._progress is None or self._push_total is None:
            return
        self._progress.advance(self._push_total, nbytes)
        task = self._push_tasks.get(device)
        if task is not None:
            self._progress.advance(task, nbytes)

    def close(self) -> None:
        """End the display (the bars vanish; the status lines stay)."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()
        self._phase_task = self._push_total = None
        self._push_tasks = {}

    # -- internals ---------------------------------------------------------------------------
    def _live(self):
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            class _Bytes(DownloadColumn):
                def render(self, task):  # phases without bytes show only their time
                    return super().render(task) if task.fields.get("unit") else ""

            class _Speed(TransferSpeedColumn):
                def render(self, task):
                    return super().render(task) if task.fields.get("unit") else ""

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), _Bytes(),
                _Speed(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True)
            self._progress.start()
        return self._progress

    def _end_phase(self) -> None:
        if self._phase_task is not None and self._progress is not None:
            self._progress.update(self._phase_task, total=1, completed=1)
            self._phase_task = None
