"""Desktop peer processes started on loopback for ``--peers local:N`` (and the tests).

Each peer is a real ``tpfed peer`` process on its own UDP port; the port is read from the
first line it prints. Processes are stopped on exit, also when startup fails half-way, and on
Linux the kernel kills them if the starting process itself is killed. They hold the federation
key given (or a fresh one), read from a private temporary file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tpfed.errors import PeerError
from tpfed.protocol import auth
from tpfed.runtime.process import die_with_parent

_LISTENING = re.compile(r"listening on (udp://\S+)")


@dataclass
class LocalPeers:
    """``async with LocalPeers(n) as uris:`` starts n peers and yields their ``udp://`` URIs."""

    count: int
    startup_timeout_s: float = 30.0
    extra_args: tuple[str, ...] = ()
    key: bytes | None = None
    """The federation key the peers hold (a fresh random one when not given)."""
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    key_file: str | None = None
    """Where the peers read the key from (a private temporary file, removed at stop)."""
    first: int = 0
    """The peers are named ``local-{first}``, ``local-{first + 1}``, ... (peers started later
    for the same fleet, by a join, go on from the ones before)."""

    async def __aenter__(self) -> list[str]:
        if self.key is None:
            self.key = auth.new_key()
        self._keydir = tempfile.TemporaryDirectory(prefix="tpfed-key-")
        self.key_file = str(auth.write_key_file(Path(self._keydir.name) / "federation.key", self.key))
        try:
            for i in range(self.count):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tpfed", "peer", "--key-file", self.key_file, "--quiet",
                    "--listen", "udp://127.0.0.1:0", "--name", f"local-{self.first + i}", *self.extra_args,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    preexec_fn=die_with_parent(),
                )
                self.procs.append(proc)
            for i, proc in enumerate(self.procs):
                self.uris.append(await self._read_uri(i, proc))
        except BaseException:
            await self.stop()
            raise
        return list(self.uris)

    async def _read_uri(self, i: int, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        code = await proc.wait()
                        raise PeerError(f"local peer local-{self.first + i} exited with code {code} "
                                        "before listening")
                    m = _LISTENING.search(line.decode(errors="replace"))
                    if m:
                        return m.group(1)
        except TimeoutError:
            raise PeerError(
                f"local peer local-{self.first + i} did not start within {self.startup_timeout_s:.0f} s"
            ) from None

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()
        keydir = getattr(self, "_keydir", None)
        if keydir is not None:
            keydir.cleanup()
            self._keydir = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
