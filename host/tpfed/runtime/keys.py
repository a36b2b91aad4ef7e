"""Where the federation key comes from (DESIGN: Security).

Every peer and coordinator of a federation holds one 32-byte key. It is read from
``--key-file PATH``, else from ``$TPFED_KEY_FILE``, else from the default file
``$XDG_CONFIG_HOME/tpfed/federation.key`` (``~/.config/tpfed/federation.key``) when it exists.
A ``tpfed peer`` on loopback with no key creates the default file (mode 0600) and says so, so
that a coordinator on the same machine finds it. Peers the coordinator starts itself
(``local:N``, ``emu:N``) get a fresh random key for the run when there is no key at all.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from tpfed.errors import TpfedError
from tpfed.protocol import auth

ENV = "TPFED_KEY_FILE"


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "tpfed" / "federation.key"


def key_source(key_file: str | os.PathLike[str] | None) -> Path | None:
    """The key file in force: the one given, ``$TPFED_KEY_FILE``, or the default file if it
    exists; None when there is none."""
    if key_file:
        return Path(key_file)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    p = default_key_path()
    return p if p.is_file() else None


def load_key(path: Path) -> bytes:
    """The key in ``path``, or one clear error."""
    try:
        return auth.read_key_file(path)
    except OSError as exc:
        raise TpfedError(f"cannot read the federation key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TpfedError(f"not a federation key: {exc}") from None


def find_key(key_file: str | os.PathLike[str] | None) -> bytes | None:
    src = key_source(key_file)
    return None if src is None else load_key(src)


def create_default_key() -> Path:
    """Write a fresh key to the default path (mode 0600, directory 0700) and return it."""
    p = default_key_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        auth.write_key_file(p, auth.new_key())
    except OSError as exc:
        raise TpfedError(f"cannot write a federation key to {p}: {exc.strerror or exc}") from None
    return p


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ENV", "create_default_key", "default_key_path", "find_key", "is_loopback", "key_source",
           "load_key"]
