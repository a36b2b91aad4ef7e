"""Facts derived from the construct schema at import time (struct formats, dtypes, sizes).

The fast paths and the codec use these instead of restating the layout by hand.
"""

from __future__ import annotations

import struct
from typing import Any

from construct import Array, Default, FormatField, Rebuild, Renamed, Struct, Switch


def unwrap(con: Any) -> tuple[Any, str | None, str]:
    """Strip Renamed / Rebuild / Default wrappers: (inner construct, field name, documentation)."""
    name: str | None = None
    docs = ""
    while True:
        if isinstance(con, Renamed):
            name = name or con.name
            docs = docs or (con.docs or "")
            con = con.subcon
        elif isinstance(con, Rebuild | Default):
            con = con.subcon
        else:
            return con, name, docs


def fixed_prefix(s: Struct) -> tuple[str, tuple[str, ...]]:
    """struct format (no byte-order char) and names of the leading fixed-width fields of s."""
    fmt = ""
    names: list[str] = []
    for sc in s.subcons:
        inner, name, _ = unwrap(sc)
        if not isinstance(inner, FormatField) or name is None:
            break
        if inner.fmtstr[0] != "<":
            raise TypeError(f"schema field {name} is not little-endian")
        fmt += inner.fmtstr[1:]
        names.append(name)
    return fmt, tuple(names)


def all_fixed(s: Struct) -> bool:
    """True when every named field of s is a fixed-width scalar."""
    n = len(fixed_prefix(s)[1])
    return n == sum(1 for sc in s.subcons if unwrap(sc)[1] is not None)


def field(s: Struct, name: str) -> Any:
    """The (unwrapped) construct of field ``name`` of s."""
    for sc in s.subcons:
        inner, n, _ = unwrap(sc)
        if n == name:
            return inner
    raise KeyError(name)


def element_format(con: Any) -> str:
    """struct format of an Array's elements ('<H', '<b', '<f')."""
    if not isinstance(con, Array):
        raise TypeError(f"{con!r} is not an Array")
    inner, _, _ = unwrap(con.subcon)
    if not isinstance(inner, FormatField):
        raise TypeError(f"{con!r} does not hold fixed-width scalars")
    return inner.fmtstr


def switch_cases(con: Any) -> dict:
    if not isinstance(con, Switch):
        raise TypeError(f"{con!r} is not a Switch")
    return con.cases


def joined(*fmts: str) -> struct.Struct:
    """One little-endian struct.Struct for consecutive fields given as formats without '<'."""
    return struct.Struct("<" + "".join(fmts))
