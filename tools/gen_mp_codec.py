#!/usr/bin/env python3
"""Generate the MicroPython protocol codec from the construct schema (shared_protocol/schema.py).

Writes shared_protocol/mp_codec.py: a dependency-free module for MicroPython boards (only
``struct``, plus ``binascii.crc32`` and ``hashlib.sha256`` when the port has them: frames with
the AUTH trailer are parsed always, sealed and verified when the port has SHA-256). The payload layouts are emitted as
data tables walked by a small fixed interpreter, so nothing about the layout is restated by
hand; ``--check`` exits 1 and names the stale file when the committed file differs.

Mapping of schema constructs to table nodes (decoded values are plain ints, floats, str,
bytes, lists and dicts, as ``codec.plain`` gives them on the host):

    run of fixed-width scalars        ('r', fmt, size, names, rebuilds)   one struct call
    Bytes(N)                          ('b', N)
    PascalString(Int8ul, "utf8")      ('t',)                             UTF-8 checked both ways
    GreedyBytes (last field)          ('g',)
    Array(expr, scalar)               ('a', count, fmt char, size)       count: lambda c: ...
    Array(expr, Struct)               ('A', count, struct node)
    Switch(this.key, {v: case})       ('w', key, {v: node})              unknown key: bad payload
    Struct                            ('S', ((name, node), ...), terminated)

Count expressions are rendered by evaluating the construct expression on a symbolic context
(``this.n`` -> ``c['n']``, ``this._.n`` -> ``c['_']['n']``). A ``Rebuild`` count field is
recomputed on encoding from the length of the array(s) whose count is exactly that field
(inferred from the schema, so callables like ``_partial_n`` need no translation).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from construct import (  # noqa: E402
    Array,
    Bytes,
    Error,
    FormatField,
    GreedyBytes,
    Prefixed,
    Rebuild,
    Renamed,
    StringEncoded,
    Struct,
    Switch,
    Terminated,
)
from gen_protocol_c import SCALARS, write_outputs  # noqa: E402  (the scalar formats both codecs support)

from shared_protocol import schema  # noqa: E402
from shared_protocol.layout import unwrap  # noqa: E402

OUT = ROOT / "shared_protocol" / "mp_codec.py"


# --------------------------------------------------------------------------------------------
# Count / key expressions: evaluate the construct expression on a symbolic context.


class Sym:
    """A Python source fragment standing for a value of the context ``c``."""

    def __init__(self, src: str) -> None:
        self.src = src

    def __getitem__(self, key: str) -> Sym:
        return Sym(f"{self.src}[{key!r}]")

    def __getattr__(self, key: str) -> Sym:
        if key.startswith("__"):
            raise AttributeError(key)
        return self[key]

    def _bin(self, op: str, other: Any, reflected: bool = False) -> Sym:
        o = other.src if isinstance(other, Sym) else repr(int(other))
        a, b = (o, self.src) if reflected else (self.src, o)
        return Sym(f"({a} {op} {b})")

    def __add__(self, o: Any) -> Sym:
        return self._bin("+", o)

    def __radd__(self, o: Any) -> Sym:
        return self._bin("+", o, True)

    def __sub__(self, o: Any) -> Sym:
        return self._bin("-", o)

    def __rsub__(self, o: Any) -> Sym:
        return self._bin("-", o, True)

    def __mul__(self, o: Any) -> Sym:
        return self._bin("*", o)

    def __rmul__(self, o: Any) -> Sym:
        return self._bin("*", o, True)

    def __floordiv__(self, o: Any) -> Sym:
        return self._bin("//", o)

    def __rfloordiv__(self, o: Any) -> Sym:
        return self._bin("//", o, True)


def sym(expr: Any) -> str:
    """Python source (over context ``c``) of a construct expression or int."""
    if isinstance(expr, int):
        return repr(int(expr))
    try:
        out = expr(Sym("c"))
    except Exception as e:  # the expression used something Sym cannot render
        raise TypeError(f"cannot render count expression {expr!r}: {e}") from None
    if isinstance(out, int):
        return repr(int(out))
    if not isinstance(out, Sym):
        raise TypeError(f"count expression {expr!r} gave {out!r}")
    src = out.src
    return src[1:-1] if src.startswith("(") and src.endswith(")") else src


def lam(expr: Any) -> str:
    return f"lambda c: {sym(expr)}"


def key_name(expr: Any) -> str:
    """Switch keys must name an earlier field of the same struct: this.<name>."""
    src = sym(expr)
    if not (src.startswith("c['") and src.endswith("']") and src.count("[") == 1):
        raise TypeError(f"Switch key {src} is not a field of the same struct")
    return src[3:-2]


# --------------------------------------------------------------------------------------------
# Schema -> nodes (as Python source)


def fmt_char(con: FormatField) -> str:
    if con.fmtstr not in SCALARS:
        raise TypeError(f"scalar format {con.fmtstr!r} is not supported")
    return {"L": "I"}.get(con.fmtstr[1], con.fmtstr[1])


def rebuild_sources(subcons: list, fname: str) -> list[tuple[str | None, int | None, tuple[str, ...]]]:
    """Where a Rebuild count field's value comes from: (switch key, case value, path) for each
    array whose count is exactly this field (``this.x`` or, one struct down, ``this._.x``)."""
    same, parent = f"c[{fname!r}]", f"c['_'][{fname!r}]"
    out: list[tuple[str | None, int | None, tuple[str, ...]]] = []
    for sc in subcons:
        inner, name, _ = unwrap(sc)
        if name is None:
            continue
        if isinstance(inner, Array) and sym(inner.count) == same:
            out.append((None, None, (name,)))
        elif isinstance(inner, Switch):
            key = key_name(inner.keyfunc)
            for value, case in inner.cases.items():
                c, _, _ = unwrap(case)
                if isinstance(c, Array) and sym(c.count) == same:
                    out.append((key, int(value), (name,)))
                elif isinstance(c, Struct):
                    for sub in c.subcons:
                        si, sn, _ = unwrap(sub)
                        if isinstance(si, Array) and sym(si.count) == parent:
                            out.append((key, int(value), (name, sn)))
    return out


def struct_node(s: Struct, owner: str) -> str:
    items: list[str] = []
    run_fmt, run_names, run_rebuilds = "", [], []
    terminated = False
    subcons = list(s.subcons)

    def flush() -> None:
        nonlocal run_fmt
        if run_names:
            size = struct.calcsize("<" + run_fmt)
            items.append(f"(None, ('r', '<{run_fmt}', {size}, {tuple(run_names)!r}, "
                         f"{tup(run_rebuilds)}))")
            run_fmt = ""
            run_names.clear()
            run_rebuilds.clear()

    for i, sc in enumerate(subcons):
        inner, name, _ = unwrap(sc)
        if inner is Terminated:
            terminated = True
            continue
        if name is None:
            raise TypeError(f"{owner}: unnamed field {sc!r}")
        if isinstance(inner, FormatField):
            run_fmt += fmt_char(inner)
            run_names.append(name)
            rebuilt = _is_rebuild(sc)
            if rebuilt:
                src = rebuild_sources(subcons[i + 1:], name)
                if not src:
                    raise TypeError(f"{owner}.{name}: no array takes its count from this field")
                run_rebuilds.append(repr(tuple(src)))
            else:
                run_rebuilds.append("None")
            continue
        flush()
        last = all(unwrap(x)[0] is Terminated for x in subcons[i + 1:])
        items.append(f"({name!r}, {node(inner, f'{owner}.{name}', last)})")
    flush()
    return f"('S', {tup(items)}, {terminated})"


def tup(items: list[str]) -> str:
    """Python source of a tuple of already-rendered items."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _is_rebuild(con: Any) -> bool:
    while isinstance(con, Renamed):
        con = con.subcon
    return isinstance(con, Rebuild)


def node(con: Any, where: str, last: bool) -> str:
    if isinstance(con, Bytes) and isinstance(con.length, int):
        return f"('b', {con.length})"
    if con is GreedyBytes:
        if not last:
            raise TypeError(f"{where}: GreedyBytes must be the last field")
        return "('g',)"
    if isinstance(con, StringEncoded):
        pre = con.subcon
        if not (isinstance(pre, Prefixed) and pre.subcon is GreedyBytes
                and getattr(pre.lengthfield, "fmtstr", "") == "<B"
                and con.encoding in ("utf8", "utf-8")):
            raise TypeError(f"{where}: only u8-prefixed UTF-8 strings are supported")
        return "('t',)"
    if isinstance(con, Array):
        elem, _, _ = unwrap(con.subcon)
        if isinstance(elem, FormatField):
            ch = fmt_char(elem)
            return f"('a', {lam(con.count)}, {ch!r}, {struct.calcsize('<' + ch)})"
        if isinstance(elem, Struct):
            return f"('A', {lam(con.count)}, {struct_node(elem, where)})"
        raise TypeError(f"{where}: unsupported array element {elem!r}")
    if isinstance(con, Switch):
        if con.default is not Error:
            raise TypeError(f"{where}: a Switch must refuse unknown keys (default=Error)")
        key = key_name(con.keyfunc)
        cases = []
        for value, case in sorted(con.cases.items()):
            inner, _, _ = unwrap(case)
            if isinstance(inner, Array):
                cases.append(f"{int(value)}: {node(inner, where, last)}")
            elif isinstance(inner, Struct):
                cases.append(f"{int(value)}: {struct_node(inner, where)}")
            else:
                raise TypeError(f"{where}: unsupported Switch case {inner!r}")
        return f"('w', {key!r}, {{{', '.join(cases)}}})"
    if isinstance(con, Struct):
        return struct_node(con, where)
    raise TypeError(f"{where}: construct {con!r} is not supported by the MicroPython generator")


# --------------------------------------------------------------------------------------------
# Emission

BANNER = "# GENERATED by tools/gen_mp_codec.py from shared_protocol/schema.py. Do not edit.\n"

DOC = '''"""tpfed wire protocol codec for MicroPython boards (ESP32 and friends).

Dependency-free: only ``struct`` (ustruct formats) and ``binascii.crc32`` when the port has it
(a table-driven CRC-32 otherwise). Runs unchanged on CPython.

    encode_frame(msg_type, payload, src=0, dst=255, seq=0, session=0, flags=0,
                 counter=0, tag=None) -> bytes            (counter, tag: the AUTH trailer)
    decode_frame(data, max_payload=MAX_PAYLOAD) -> (header dict, payload dict)
                 (an AUTH frame's header dict also holds 'counter' and 'tag')
    seal(ks, frame, counter) -> sealed frame / verify(ks, frame) -> counter   (needs hashlib)
    auth_derive(key, label, nonce_c, nonce_p, device_id, session) -> 32 bytes  (needs hashlib)
    cobs_encode(data) -> bytes / cobs_decode(segment) -> bytes   (no 0x00 delimiter)
    CobsStream(max_frame).feed(data) -> [frame, ...]               serial byte stream

Payload dicts hold the schema's field names; count fields (n, n_entries, ...) are computed
on encoding and may be omitted. Every failure raises a ProtocolError (a ValueError) subclass
named like the host's (shared_protocol/errors.py), with ``status`` set to the C status code.
"""
'''

RUNTIME = r'''
class ProtocolError(ValueError):
    status = STATUS_BAD_PAYLOAD


class BadMagic(ProtocolError):
    status = STATUS_BAD_MAGIC


class VersionMismatch(ProtocolError):
    status = STATUS_VERSION


class TruncatedFrame(ProtocolError):
    status = STATUS_TRUNCATED


class BadLength(ProtocolError):
    status = STATUS_BAD_LENGTH


class BadCrc(ProtocolError):
    status = STATUS_BAD_CRC


class UnknownType(ProtocolError):
    status = STATUS_UNKNOWN_TYPE


class OversizeFrame(ProtocolError):
    status = STATUS_OVERSIZE


class BadPayload(ProtocolError):
    status = STATUS_BAD_PAYLOAD


class CobsError(ProtocolError):
    status = STATUS_BAD_PAYLOAD


class BadTag(ProtocolError):
    status = STATUS_BAD_TAG


# --- CRC-32 (zlib's) -------------------------------------------------------------------------

_crc_table = None


def crc32_soft(data, crc=0):
    """zlib.crc32 in plain Python (256-entry table, built on first use)."""
    global _crc_table
    t = _crc_table
    if t is None:
        t = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            t.append(c)
        _crc_table = t
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    from binascii import crc32 as _hw_crc32
except ImportError:
    _hw_crc32 = None

crc32 = _hw_crc32 if _hw_crc32 is not None else crc32_soft


# --- helpers ---------------------------------------------------------------------------------

_LIMITS = {
    'B': (0, 0xFF), 'b': (-0x80, 0x7F), 'H': (0, 0xFFFF), 'h': (-0x8000, 0x7FFF),
    'I': (0, 0xFFFFFFFF), 'Q': (0, 0xFFFFFFFFFFFFFFFF),
}
_FLT_MAX = 3.4028234663852886e38


def _check(where, fmt, v):
    if fmt == 'f':
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadPayload('%s: %r is not a number' % (where, v))
        if _FLT_MAX < abs(v) < float('inf'):
            raise BadPayload('%s: %r does not fit a float32' % (where, v))
        return
    lo, hi = _LIMITS[fmt]
    if not isinstance(v, int) or not lo <= v <= hi:
        raise BadPayload('%s: %r is not an integer in %d..%d' % (where, v, lo, hi))


def _utf8_ok(b):
    """RFC 3629 UTF-8 (no overlongs, surrogates or code points above U+10FFFF)."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if n - i <= k or not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += k + 1
    return True


def _need(where, name, want, off, end):
    if end - off < want:
        raise BadPayload('malformed %s payload: %s needs %d bytes at offset %d, %d left'
                         % (where, name, want, off, end - off))


# --- payload decoding ------------------------------------------------------------------------


def _dec_struct(node, buf, off, end, where, parent):
    c = {'_': parent}
    for name, sub in node[1]:
        if name is None:
            _, fmt, size, names, _ = sub
            if end - off < size:
                _need(where, names[0] + ('..' + names[-1] if len(names) > 1 else ''), size, off, end)
            vals = struct.unpack_from(fmt, buf, off)
            for i in range(len(names)):
                c[names[i]] = vals[i]
            off += size
        else:
            c[name], off = _dec(sub, buf, off, end, where, name, c)
    del c['_']
    return c, off


def _dec(node, buf, off, end, where, name, c):
    k = node[0]
    if k == 'b':
        _need(where, name, node[1], off, end)
        return bytes(buf[off:off + node[1]]), off + node[1]
    if k == 'g':
        return bytes(buf[off:end]), end
    if k == 't':
        _need(where, name, 1, off, end)
        n = buf[off]
        off += 1
        _need(where, name, n, off, end)
        raw = bytes(buf[off:off + n])
        if not _utf8_ok(raw):
            raise BadPayload('malformed %s payload: %s is not valid UTF-8' % (where, name))
        return raw.decode('utf-8'), off + n
    if k == 'a':
        n = node[1](c)
        size = n * node[3]
        _need(where, name, size, off, end)
        if n == 0:
            return [], off
        return list(struct.unpack_from('<%d%s' % (n, node[2]), buf, off)), off + size
    if k == 'A':
        out = []
        for _ in range(node[1](c)):
            item, off = _dec_struct(node[2], buf, off, end, where + '.' + name, c)
            out.append(item)
        return out, off
    if k == 'w':
        sub = node[2].get(c[node[1]])
        if sub is None:
            raise BadPayload('malformed %s payload: no %s layout for %s=%r'
                             % (where, name, node[1], c[node[1]]))
        if sub[0] == 'S':
            return _dec_struct(sub, buf, off, end, where + '.' + name, c)
        return _dec(sub, buf, off, end, where, name, c)
    return _dec_struct(node, buf, off, end, where + '.' + name, c)


def decode_payload(msg_type, payload):
    """Payload bytes of a frame of msg_type -> dict of its fields."""
    node = LAYOUTS.get(msg_type)
    if node is None:
        raise UnknownType('unknown message type %r' % (msg_type,))
    where = TYPE_NAMES[msg_type]
    end = len(payload)
    out, off = _dec_struct(node, payload, 0, end, where, None)
    if node[2] and off != end:
        raise BadPayload('malformed %s payload: %d bytes after the last field' % (where, end - off))
    return out


# --- payload encoding ------------------------------------------------------------------------


def _rebuild(spec, c, where, name):
    for key, value, path in spec:
        if key is None or c.get(key) == value:
            v = c
            for p in path:
                if not isinstance(v, dict) or p not in v:
                    raise BadPayload('%s: missing field %r' % (where, p))
                v = v[p]
            return len(v)
    raise BadPayload('%s: no layout for %s=%r' % (where, spec[0][0], c.get(spec[0][0])))


def _enc_struct(node, value, out, where, parent):
    if not isinstance(value, dict):
        raise BadPayload('%s: expected a dict of fields, got %r' % (where, type(value)))
    c = dict(value)
    c['_'] = parent
    for name, sub in node[1]:
        if name is None:
            _, fmt, size, names, rebuilds = sub
            vals = []
            for i in range(len(names)):
                f = names[i]
                if rebuilds[i] is not None:
                    v = _rebuild(rebuilds[i], c, where, f)
                    if f in value and value[f] != v:
                        raise BadPayload('%s.%s is %r but the data holds %d'
                                         % (where, f, value[f], v))
                    c[f] = v
                elif f not in c:
                    raise BadPayload('%s: missing field %r' % (where, f))
                _check(where + '.' + f, fmt[i + 1], c[f])
                vals.append(c[f])
            out.extend(struct.pack(fmt, *vals))
        else:
            if name not in c:
                raise BadPayload('%s: missing field %r' % (where, name))
            _enc(sub, c[name], out, where + '.' + name, c)


def _enc_bytes(v, where):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise BadPayload('%s: expected bytes, got %r' % (where, type(v)))


def _enc(node, v, out, where, c):
    k = node[0]
    if k == 'b':
        v = _enc_bytes(v, where)
        if len(v) != node[1]:
            raise BadPayload('%s: needs exactly %d bytes, got %d' % (where, node[1], len(v)))
        out.extend(v)
    elif k == 'g':
        out.extend(_enc_bytes(v, where))
    elif k == 't':
        if not isinstance(v, str):
            raise BadPayload('%s: expected str, got %r' % (where, type(v)))
        raw = v.encode('utf-8')
        if len(raw) > 255 or not _utf8_ok(raw):
            raise BadPayload('%s: %d UTF-8 bytes (at most 255 valid ones)' % (where, len(raw)))
        out.append(len(raw))
        out.extend(raw)
    elif k == 'a' or k == 'A':
        n = node[1](c)
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise BadPayload('%s: expected a list of %d items, got %r'
                             % (where, n, len(v) if isinstance(v, (list, tuple)) else type(v)))
        if k == 'A':
            for item in v:
                _enc_struct(node[2], item, out, where, c)
            return
        ch = node[2]
        size = node[3]
        fmt = '<' + ch
        buf = bytearray(n * size)
        for i in range(n):
            x = v[i]
            _check(where, ch, x)
            struct.pack_into(fmt, buf, i * size, x)
        out.extend(buf)
    elif k == 'w':
        sub = node[2].get(c.get(node[1]))
        if sub is None:
            raise BadPayload('%s: no layout for %s=%r' % (where, node[1], c.get(node[1])))
        _enc(sub, v, out, where, c)
    else:
        _enc_struct(node, v, out, where, c)


def encode_payload(msg_type, payload):
    """dict of fields -> payload bytes of msg_type."""
    node = LAYOUTS.get(msg_type)
    if node is None:
        raise UnknownType('unknown message type %r' % (msg_type,))
    out = bytearray()
    _enc_struct(node, payload, out, TYPE_NAMES[msg_type], None)
    if len(out) > MAX_PAYLOAD:
        raise OversizeFrame('%s payload is %d bytes, the limit is %d'
                            % (TYPE_NAMES[msg_type], len(out), MAX_PAYLOAD))
    return bytes(out)


# --- frames ----------------------------------------------------------------------------------


def encode_frame(msg_type, payload, src=COORDINATOR, dst=BROADCAST, seq=0, session=0, flags=0,
                 counter=0, tag=None):
    """Message type + payload dict + header fields -> frame bytes (header, payload, CRC). With
    FLAG_AUTH in flags, counter and tag (16 bytes) make the trailer (or seal() the frame)."""
    hdr = {'magic': MAGIC, 'version': VERSION, 'type': msg_type, 'flags': flags, 'src': src,
           'dst': dst, 'seq': seq, 'session': session, 'length': 0}
    try:
        for i in range(len(HEADER_NAMES)):
            _check('header.' + HEADER_NAMES[i], HEADER_FORMAT[i + 1], hdr[HEADER_NAMES[i]])
    except BadPayload as e:
        raise ProtocolError(str(e)) from None
    if flags & RESERVED_FLAGS:
        raise ProtocolError('flags 0x%02x set reserved bits' % flags)
    trailer = b''
    if flags & FLAG_AUTH:
        if not isinstance(tag, (bytes, bytearray)) or len(tag) != TAG_SIZE:
            raise ProtocolError('an AUTH frame needs a %d-byte tag (or seal() it)' % TAG_SIZE)
        if not isinstance(counter, int) or not 0 <= counter <= 0xFFFFFFFF:
            raise ProtocolError('header.counter=%r out of range' % (counter,))
        trailer = struct.pack('<I', counter) + bytes(tag)
    body = encode_payload(msg_type, payload)
    hdr['length'] = len(body)
    out = bytearray(struct.pack(HEADER_FORMAT, *[hdr[k] for k in HEADER_NAMES]))
    out.extend(body)
    out.extend(trailer)
    out.extend(struct.pack('<I', crc32(out)))
    return bytes(out)


def trailer_size(flags):
    return AUTH_TRAILER_SIZE if flags & FLAG_AUTH else 0


def _version_error(theirs):
    return VersionMismatch(
        'protocol version mismatch: frame is %d.%d, this side speaks %d.%d '
        '(major versions must match)' % (theirs >> 4, theirs & 15, VERSION_MAJOR, VERSION_MINOR))


def decode_header(data, max_payload=MAX_PAYLOAD):
    """Header, size and CRC checks of a whole frame -> header dict (payload not parsed)."""
    n = len(data)
    if n < 1:
        raise TruncatedFrame('empty frame')
    if data[0] != MAGIC:
        raise BadMagic('bad magic 0x%02x, expected 0x%02x' % (data[0], MAGIC))
    if n < HEADER_SIZE:
        raise TruncatedFrame('frame of %d bytes is shorter than the %d-byte header'
                             % (n, HEADER_SIZE))
    vals = struct.unpack_from(HEADER_FORMAT, data, 0)
    h = {}
    for i in range(len(HEADER_NAMES)):
        h[HEADER_NAMES[i]] = vals[i]
    if h['version'] >> 4 != VERSION_MAJOR:
        raise _version_error(h['version'])
    if h['length'] > max_payload:
        raise OversizeFrame('payload of %d bytes exceeds the limit of %d'
                            % (h['length'], max_payload))
    total = HEADER_SIZE + h['length'] + trailer_size(h['flags']) + CRC_SIZE
    if n < total:
        raise TruncatedFrame('frame of %d bytes, header says %d' % (n, total))
    if n > total:
        raise BadLength('frame of %d bytes, header says %d' % (n, total))
    end = total - CRC_SIZE
    mv = memoryview(data)
    if crc32(mv[:end]) != struct.unpack_from('<I', data, end)[0]:
        raise BadCrc('bad CRC in %s frame seq %d' % (TYPE_NAMES.get(h['type'], h['type']), h['seq']))
    if h['type'] not in LAYOUTS:
        raise UnknownType('unknown message type 0x%02x' % h['type'])
    if h['flags'] & FLAG_AUTH:
        at = HEADER_SIZE + h['length']
        h['counter'] = struct.unpack_from('<I', data, at)[0]
        h['tag'] = bytes(data[at + 4:at + AUTH_TRAILER_SIZE])
    return h


def decode_frame(data, max_payload=MAX_PAYLOAD):
    """Frame bytes -> (header dict, payload dict); raises the ProtocolError naming the fault."""
    h = decode_header(data, max_payload)
    mv = memoryview(data)
    return h, decode_payload(h['type'], mv[HEADER_SIZE:HEADER_SIZE + h['length']])


def frame_intact(data):
    """Cheap link-level check: the size matches the header's length field and the CRC holds."""
    n = len(data)
    if n < HEADER_SIZE + CRC_SIZE:
        return False
    end = n - CRC_SIZE
    if struct.unpack_from(HEADER_FORMAT, data, 0)[-1] + trailer_size(data[3]) != end - HEADER_SIZE:
        return False
    return crc32(memoryview(data)[:end]) == struct.unpack_from('<I', data, end)[0]


# --- authentication (shared_protocol/auth.py; needs hashlib.sha256) -------------------------

try:
    from hashlib import sha256 as _sha256
except ImportError:
    _sha256 = None

AUTH_LABELS = (b'tpfed-peer', b'tpfed-coord', b'tpfed-session')


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) on hashlib.sha256."""
    if _sha256 is None:
        raise ProtocolError('this port has no hashlib.sha256: cannot authenticate frames')
    key = bytes(key)
    if len(key) > 64:
        key = _sha256(key).digest()
    key = key + bytes(64 - len(key))
    inner = _sha256(bytes([b ^ 0x36 for b in key]))
    inner.update(bytes(msg))
    outer = _sha256(bytes([b ^ 0x5C for b in key]))
    outer.update(inner.digest())
    return outer.digest()


def auth_derive(key, label, nonce_c, nonce_p, device_id, session):
    """HMAC(key, label || nonce_c || nonce_p || device_id u8 || session u16 LE); label is one
    of AUTH_LABELS (peer proof, coordinator proof, session key)."""
    return hmac_sha256(key, bytes(label) + bytes(nonce_c) + bytes(nonce_p)
                       + struct.pack('<BH', device_id, session))


def _sealed_lengths(frame):
    if len(frame) < HEADER_SIZE + CRC_SIZE:
        raise BadTag('not a frame')
    plen = struct.unpack_from(HEADER_FORMAT, frame, 0)[-1]
    if len(frame) != HEADER_SIZE + plen + trailer_size(frame[3]) + CRC_SIZE:
        raise BadTag('frame size does not match its header')
    return plen


def seal(ks, frame, counter):
    """An unauthenticated frame -> sealed with session key ks and counter (AUTH set, trailer,
    CRC)."""
    plen = _sealed_lengths(frame)
    if frame[3] & FLAG_AUTH:
        raise ProtocolError('frame is sealed already')
    end = HEADER_SIZE + plen
    out = bytearray(frame[:end])
    out[3] |= FLAG_AUTH
    out.extend(struct.pack('<I', counter))
    out.extend(hmac_sha256(ks, out)[:TAG_SIZE])
    out.extend(struct.pack('<I', crc32(out)))
    return bytes(out)


def verify(ks, frame):
    """The counter of a sealed frame whose tag verifies under ks; BadTag otherwise."""
    plen = _sealed_lengths(frame)
    if not frame[3] & FLAG_AUTH:
        raise BadTag('frame is not authenticated')
    at = HEADER_SIZE + plen
    want = hmac_sha256(ks, bytes(frame[:at + 4]))[:TAG_SIZE]
    got = bytes(frame[at + 4:at + AUTH_TRAILER_SIZE])
    diff = 0
    for i in range(TAG_SIZE):
        diff |= want[i] ^ got[i]
    if diff:
        raise BadTag('frame tag does not verify')
    return struct.unpack_from('<I', frame, at)[0]


# --- COBS (serial framing: each frame travels as cobs(frame) + b'\x00') ----------------------


def cobs_encode(data):
    """COBS-encode (without the 0x00 delimiter); same output as the host's cobs.encode."""
    data = bytes(data)
    n = len(data)
    out = bytearray()
    i = 0
    while True:
        z = data.find(b'\x00', i)
        end = n if z < 0 else z
        long_block = False
        while end - i >= 254:
            out.append(0xFF)
            out.extend(data[i:i + 254])
            i += 254
            long_block = True
        if z >= 0 or i < end or not long_block:
            out.append(end - i + 1)
            out.extend(data[i:end])
        if z < 0:
            return bytes(out)
        i = z + 1


def cobs_decode(seg):
    """Decode one COBS segment (no 0x00 delimiter); CobsError when it is not valid COBS."""
    n = len(seg)
    out = bytearray()
    i = 0
    while i < n:
        code = seg[i]
        if code == 0:
            raise CobsError('zero byte inside a COBS segment at %d' % i)
        end = i + code
        if end > n:
            raise CobsError('COBS block at %d runs past the end' % i)
        block = bytes(seg[i + 1:end])
        if b'\x00' in block:
            raise CobsError('zero byte inside a COBS segment')
        out.extend(block)
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


class CobsStream:
    """Incremental COBS stream decoder: feed() bytes as they arrive, get whole frames back.
    Resynchronises on the next 0x00 after garbage; drops (and counts in ``dropped``) segments
    that are not valid COBS, are longer than max_frame, or fail frame_intact (when check)."""

    def __init__(self, max_frame=HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE, check=True):
        self.max_frame = max_frame
        self.check = check
        self.max_encoded = max_frame + max_frame // 254 + 2
        self.buf = bytearray()
        self.skipping = False
        self.frames = 0
        self.dropped = 0

    def feed(self, data):
        out = []
        data = bytes(data)
        start = 0
        n = len(data)
        while start < n:
            z = data.find(b'\x00', start)
            if z < 0:
                if not self.skipping:
                    self.buf.extend(data[start:])
                    if len(self.buf) > self.max_encoded:
                        self.buf = bytearray()
                        self.skipping = True
                        self.dropped += 1
                break
            if self.skipping:
                self.skipping = False
            else:
                self.buf.extend(data[start:z])
                seg = bytes(self.buf)
                self.buf = bytearray()
                if len(seg) > self.max_encoded:
                    self.dropped += 1
                elif seg:
                    self._deliver(seg, out)
            start = z + 1
        return out

    def _deliver(self, seg, out):
        try:
            frame = cobs_decode(seg)
        except CobsError:
            self.dropped += 1
            return
        if len(frame) > self.max_frame or (self.check and not frame_intact(frame)):
            self.dropped += 1
            return
        self.frames += 1
        out.append(frame)
'''


def constants() -> list[str]:
    L = ["# --- constants ---", ""]
    for k, v in schema.C_CONSTANTS.items():
        L.append(f"{k} = {v}")
    reserved = 0xFF & ~sum(int(f) for f in schema.Flag)
    L.append(f"RESERVED_FLAGS = 0x{reserved:02X}")
    for _stem, cls, prefix in schema.C_ENUMS:
        L.append("")
        short = "STATUS_" if cls is schema.Status else prefix.removeprefix("TPFED_")
        for member in cls:
            L.append(f"{short}{member.name} = {int(member.value)}")
    L.append("")
    L.append("TYPE_NAMES = {")
    for t in schema.MsgType:
        L.append(f"    {int(t)}: {t.name!r},")
    L.append("}")
    return L


def header_table() -> list[str]:
    fmt, names = "<", []
    for sc in schema.Header.subcons:
        inner, name, _ = unwrap(sc)
        if not isinstance(inner, FormatField) or name is None:
            raise TypeError("the header must be fixed-width scalars only")
        fmt += fmt_char(inner)
        names.append(name)
    need = {"magic", "version", "type", "flags", "src", "dst", "seq", "session", "length"}
    if set(names) != need or names[-1] != "length":
        raise TypeError(f"header fields {names} are not what the codec expects")
    if struct.calcsize(fmt) != schema.HEADER_SIZE:
        raise TypeError("header size differs from schema.HEADER_SIZE")
    return [f"HEADER_FORMAT = {fmt!r}", f"HEADER_NAMES = {tuple(names)!r}"]


def layouts() -> list[str]:
    L = ["# --- payload layouts (one node tree per message type) ---", ""]
    done: dict[int, str] = {}
    for t, s in schema.PAYLOADS.items():
        var = "_" + t.name
        if id(s) in done:
            L.append(f"{var} = {done[id(s)]}")
        else:
            L.append(f"{var} = {struct_node(s, t.name)}")
            done[id(s)] = var
    L.append("")
    L.append("LAYOUTS = {")
    for t in schema.PAYLOADS:
        L.append(f"    {int(t)}: _{t.name},")
    L.append("}")
    return L


def generate() -> str:
    L = [BANNER.rstrip(), "# MicroPython-compatible: %-formatting, no f-strings or type hints.",
         "# ruff: noqa: UP031",
         DOC.rstrip(), "", "import struct", ""]
    L += constants()
    L.append("")
    L += header_table()
    L.append("")
    L += layouts()
    L += ["", ""]
    L += RUNTIME.strip("\n").splitlines()
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the committed file differs from what would be generated")
    args = ap.parse_args(argv)
    text = generate()
    compile(text, str(OUT), "exec")
    return write_outputs({OUT: text}, check=args.check, tool="gen_mp_codec.py")


if __name__ == "__main__":
    sys.exit(main())
