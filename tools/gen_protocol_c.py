#!/usr/bin/env python3
"""Generate the C protocol codec from the construct schema (shared_protocol/schema.py).

Writes firmware/lib/tpfed/include/tpfed_proto.h and firmware/lib/tpfed/src/tpfed_proto.c by
walking the schema's structs; nothing about the layout is restated here. ``--check`` exits 1
and names the stale file when the committed files differ from what would be generated.

Mapping of schema constructs to C (variable-length parts point into the frame buffer: zero
copy, no heap; multi-byte array elements stay raw little-endian bytes, read them with
tpfed_rd_*):

    Int8ul..Int64ul, Int8sl, Int16sl, Float32l   scalar member
    Bytes(N)                                      const uint8_t *name          (N bytes)
    Const(b"...")                                 no member: checked on decode (TPFED_E_BAD_MAGIC), written on encode
    PascalString(Int8ul, "utf8")                  const uint8_t *name; uint8_t name_len  (UTF-8 checked)
    GreedyBytes (last field)                      const uint8_t *name; uint16_t name_len
    Array(expr, scalar)                           const uint8_t *name (int8: const int8_t *), expr elements
    Array(expr, fixed Struct)                     const uint8_t *name, expr items of the item struct
    Array(expr, variable Struct)                  const uint8_t *name; uint16_t name_len (bytes), walked with the item decoder
    Switch(this.key, {value: Array|Struct})       const uint8_t *name, size chosen by key (unknown key: bad payload)
"""

from __future__ import annotations

import argparse
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from construct import (  # noqa: E402
    Array,
    Bytes,
    Const,
    FormatField,
    GreedyBytes,
    Prefixed,
    StringEncoded,
    Struct,
    Switch,
    Terminated,
)
from construct.expr import BinExpr  # noqa: E402
from construct.expr import Path as CPath  # noqa: E402

from shared_protocol import schema  # noqa: E402
from shared_protocol.layout import unwrap  # noqa: E402

HEADER_OUT = ROOT / "firmware/lib/tpfed/include/tpfed_proto.h"
SOURCE_OUT = ROOT / "firmware/lib/tpfed/src/tpfed_proto.c"

SCALARS = {  # struct format -> (C type, accessor suffix, size)
    "<B": ("uint8_t", "u8", 1),
    "<b": ("int8_t", "i8", 1),
    "<H": ("uint16_t", "u16", 2),
    "<h": ("int16_t", "i16", 2),
    "<L": ("uint32_t", "u32", 4),
    "<I": ("uint32_t", "u32", 4),
    "<Q": ("uint64_t", "u64", 8),
    "<f": ("float", "f32", 4),
}
OPS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "/"}


# --------------------------------------------------------------------------------------------
# Schema model


@dataclass
class CField:
    name: str
    kind: str  # scalar bytes const string greedy array switch
    docs: str = ""
    ctype: str = ""  # scalar
    acc: str = ""  # scalar accessor suffix
    size: int = 0  # scalar / bytes / const / array element size
    value: bytes = b""  # const
    count: str = ""  # array: C expression of the element count
    count_doc: str = ""
    item: CStruct | None = None  # array of structs
    key: str = ""  # switch key field
    cases: list[tuple[int, str, str]] = field(default_factory=list)  # (value, size expr, doc)


@dataclass
class CStruct:
    name: str
    fields: list[CField]
    terminated: bool
    item: bool  # decoded as a prefix (reports bytes used) rather than a whole payload

    @property
    def fixed_size(self) -> int | None:
        total = 0
        for f in self.fields:
            if f.kind in ("scalar", "bytes", "const"):
                total += f.size
            else:
                return None
        return total


def c_expr(e, doc: bool = False) -> str:
    """A construct count expression -> C (members of the struct being decoded: t.x)."""
    if isinstance(e, int):
        return str(e) if doc else f"{e}u"
    if isinstance(e, CPath):
        names = []
        p = e
        while getattr(p, "_Path__parent", None) is not None:
            names.append(p._Path__field)
            p = p._Path__parent
        names = [n for n in names if n != "_"]
        if not names:
            raise TypeError(f"cannot render {e!r}")
        return names[0] if doc else f"(size_t)t.{names[0]}"
    if isinstance(e, BinExpr):
        if e.op not in OPS:
            raise TypeError(f"operator {e.op} not supported in count expressions")
        return f"({c_expr(e.lhs, doc)} {OPS[e.op]} {c_expr(e.rhs, doc)})"
    raise TypeError(f"unsupported count expression {e!r}")


def c_string(b: bytes) -> str:
    """A C string literal of exactly these bytes (octal escapes never swallow a next digit)."""
    out = []
    for c in b:
        ch = chr(c)
        out.append(ch if 0x20 <= c < 0x7F and ch not in '"\\?' else f"\\{c:03o}")
    return '"' + "".join(out) + '"'


class Model:
    def __init__(self) -> None:
        self.structs: dict[str, CStruct] = {}  # in emission order (dependencies first)
        self.by_id: dict[int, CStruct] = {}  # construct Struct id -> its CStruct

    def struct(self, name: str, s: Struct, item: bool) -> CStruct:
        if name in self.structs:
            return self.structs[name]
        fields: list[CField] = []
        terminated = False
        subcons = list(s.subcons)
        for i, sc in enumerate(subcons):
            inner, fname, docs = unwrap(sc)
            if inner is Terminated:
                terminated = True
                continue
            if fname is None:
                raise TypeError(f"{name}: unnamed field {sc!r}")
            fields.append(self.field(name, fname, inner, docs, last=i == len(subcons) - 1
                                     or unwrap(subcons[-1])[0] is Terminated and i == len(subcons) - 2))
        cs = CStruct(name, fields, terminated, item)
        self.structs[name] = cs
        self.by_id[id(s)] = cs
        return cs

    def field(self, owner: str, name: str, con, docs: str, last: bool) -> CField:
        if isinstance(con, FormatField):
            ctype, acc, size = SCALARS[con.fmtstr]
            return CField(name, "scalar", docs, ctype, acc, size)
        if isinstance(con, Bytes) and isinstance(con.length, int):
            return CField(name, "bytes", docs, size=con.length)
        if isinstance(con, Const):
            if not isinstance(con.value, bytes) or not con.value:
                raise TypeError(f"{owner}.{name}: only non-empty bytes constants are supported")
            return CField(name, "const", docs, size=len(con.value), value=con.value)
        if con is GreedyBytes:
            if not last:
                raise TypeError(f"{owner}.{name}: GreedyBytes must be the last field")
            return CField(name, "greedy", docs)
        if isinstance(con, StringEncoded):
            pre = con.subcon
            if not (isinstance(pre, Prefixed) and pre.subcon is GreedyBytes
                    and getattr(pre.lengthfield, "fmtstr", "") == "<B"
                    and con.encoding in ("utf8", "utf-8")):
                raise TypeError(f"{owner}.{name}: only u8-prefixed UTF-8 strings are supported")
            return CField(name, "string", docs)
        if isinstance(con, Array):
            return self.array(owner, name, con, docs)
        if isinstance(con, Switch):
            key = c_expr(con.keyfunc, doc=True)
            cases = []
            for value, case in con.cases.items():
                size, doc = self.case_size(owner, name, case)
                cases.append((int(value), size, doc))
            return CField(name, "switch", docs, key=key, cases=sorted(cases))
        raise TypeError(f"{owner}.{name}: construct {con!r} is not supported by the C generator")

    def array(self, owner: str, name: str, con: Array, docs: str) -> CField:
        elem, ename, _ = unwrap(con.subcon)
        count = c_expr(con.count)
        count_doc = c_expr(con.count, doc=True)
        if isinstance(elem, FormatField):
            ctype, _, size = SCALARS[elem.fmtstr]
            return CField(name, "array", docs, ctype=ctype, size=size, count=count, count_doc=count_doc)
        if isinstance(elem, Struct):
            item = self.struct(ename or f"{owner}_{name}_item", elem, item=True)
            return CField(name, "array", docs, size=item.fixed_size or 0, count=count,
                          count_doc=count_doc, item=item)
        raise TypeError(f"{owner}.{name}: unsupported array element {elem!r}")

    def case_size(self, owner: str, name: str, case) -> tuple[str, str]:
        inner, _, _ = unwrap(case)
        if isinstance(inner, Array):
            f = self.array(owner, name, inner, "")
            if f.item is not None:
                raise TypeError(f"{owner}.{name}: struct arrays inside a Switch are not supported")
            return f"{f.count} * {f.size}u", f"{f.count_doc} x {f.ctype}"
        if isinstance(inner, Struct) and id(inner) in self.by_id and self.by_id[id(inner)].fixed_size:
            # A named fixed-size struct (schema.C_EXTRA_STRUCTS): decode it with its own codec.
            cs = self.by_id[id(inner)]
            return f"{cs.fixed_size}u", f"tpfed_{cs.name}_t"
        if isinstance(inner, Struct):
            sizes, docs = [], []
            for sc in inner.subcons:
                s, d = self.case_size(owner, name, sc)
                sizes.append(s)
                docs.append(f"{unwrap(sc)[1]}: {d}")
            return " + ".join(f"({s})" for s in sizes), "; ".join(docs)
        raise TypeError(f"{owner}.{name}: unsupported Switch case {inner!r}")


def build_model() -> tuple[Model, dict[int, str]]:
    m = Model()
    m.struct("header", schema.Header, item=True)
    for name, s in schema.C_EXTRA_STRUCTS.items():
        m.struct(name, s, item=True)
    by_type: dict[int, str] = {}
    seen: dict[int, str] = {}
    for t, s in schema.PAYLOADS.items():
        name = seen.get(id(s), t.name.lower())
        seen[id(s)] = name
        m.struct(name, s, item=False)
        by_type[int(t)] = name
    return m, by_type


# --------------------------------------------------------------------------------------------
# Emission

BANNER = "// GENERATED by tools/gen_protocol_c.py from shared_protocol/schema.py. Do not edit.\n"


def members(s: CStruct) -> list[str]:
    out = []
    for f in s.fields:
        doc = f" // {f.docs}" if f.docs else ""
        if f.kind == "const":
            continue
        if f.kind == "scalar":
            out.append(f"    {f.ctype} {f.name};{doc}")
        elif f.kind == "bytes":
            out.append(f"    const uint8_t *{f.name}; // {f.size} bytes{': ' + f.docs if f.docs else ''}")
        elif f.kind == "string":
            out.append(f"    const uint8_t *{f.name}; // not NUL-terminated{': ' + f.docs if f.docs else ''}")
            out.append(f"    uint8_t {f.name}_len;")
        elif f.kind == "greedy":
            out.append(f"    const uint8_t *{f.name};{doc}")
            out.append(f"    uint16_t {f.name}_len;")
        elif f.kind == "array" and f.item is not None and f.item.fixed_size is None:
            out.append(f"    const uint8_t *{f.name}; // {f.count_doc} x tpfed_{f.item.name}_t, "
                       f"variable size, {f.name}_len bytes{': ' + f.docs if f.docs else ''}")
            out.append(f"    uint16_t {f.name}_len;")
        elif f.kind == "array" and f.item is not None:
            out.append(f"    const uint8_t *{f.name}; // {f.count_doc} x tpfed_{f.item.name}_t "
                       f"({f.item.fixed_size} bytes each, raw){': ' + f.docs if f.docs else ''}")
        elif f.kind == "array":
            t = "const int8_t" if f.ctype == "int8_t" else "const uint8_t"
            raw = "" if f.size == 1 else ", raw little-endian"
            out.append(f"    {t} *{f.name}; // {f.count_doc} x {f.ctype}{raw}"
                       f"{': ' + f.docs if f.docs else ''}")
        elif f.kind == "switch":
            out.append(f"    const uint8_t *{f.name}; // size by {f.key}{': ' + f.docs if f.docs else ''}")
    return out


def layout_comment(s: CStruct) -> list[str]:
    lines = [f"// tpfed_{s.name}_t wire layout (little-endian):"]
    off: int | None = 0
    for f in s.fields:
        where = f"{off:3d}" if off is not None else "  +"
        if f.kind == "scalar":
            desc = f"{f.ctype}"
        elif f.kind == "bytes":
            desc = f"{f.size} bytes"
        elif f.kind == "const":
            desc = f"{f.size} bytes {c_string(f.value)} (checked, no member)"
        elif f.kind == "string":
            desc = "u8 length, then that many UTF-8 bytes"
        elif f.kind == "greedy":
            desc = "the rest of the payload"
        elif f.kind == "array" and f.item is not None:
            desc = f"{f.count_doc} x tpfed_{f.item.name}_t"
        elif f.kind == "array":
            desc = f"{f.count_doc} x {f.ctype}"
        else:
            desc = "; ".join(f"{f.key}={v}: {d}" for v, _, d in f.cases)
        lines.append(f"//   {where}  {f.name:<15} {desc}")
        if off is not None and f.kind in ("scalar", "bytes", "const"):
            off += f.size
        else:
            off = None
    if s.terminated:
        lines.append("//   (no bytes may follow the last field)")
    return lines


def prototypes(s: CStruct) -> list[str]:
    t = f"tpfed_{s.name}_t"
    if s.item:
        return [
            f"int tpfed_{s.name}_decode(const uint8_t *p, size_t len, {t} *m, size_t *used);",
            f"int tpfed_{s.name}_encode(uint8_t *p, size_t cap, const {t} *m, size_t *out_len);",
        ]
    return [
        f"int tpfed_{s.name}_decode(const uint8_t *p, size_t len, {t} *m);",
        f"int tpfed_{s.name}_encode(uint8_t *p, size_t cap, const {t} *m, size_t *out_len);",
    ]


def enum_block(stem: str, cls, prefix: str) -> list[str]:
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"// {doc[0]}"] if doc and not doc[0].startswith("An enumeration") and "Support for integer" not in doc[0] else []
    lines.append("typedef enum {")
    for member in cls:
        cname = "TPFED_OK" if cls is schema.Status and member == schema.Status.OK else prefix + member.name
        lines.append(f"    {cname} = {int(member.value)},")
    lines.append(f"}} tpfed_{stem}_t;")
    return lines


def gen_header(model: Model, by_type: dict[int, str]) -> str:
    L = [BANNER.rstrip(), "//",
         "// tpfed wire protocol: constants, message types, payload structs and their codecs.",
         "// Frame = 12-byte header + payload [+ AUTH trailer: counter u32, tag[16]] + crc32 (zlib)",
         "// of everything before it, little-endian (see shared_protocol/schema.py).",
         "// Decoders never read outside [p, p+len) and point into the buffer (no copies): keep",
         "// the buffer alive while the struct is used. Encoders never write outside [p, p+cap).",
         "// Every function returns a tpfed_status_t (0 = TPFED_OK).",
         "#ifndef TPFED_PROTO_H", "#define TPFED_PROTO_H", "",
         "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>", "",
         "// cffi:begin"]
    for k, v in schema.C_CONSTANTS.items():
        L.append(f"#define TPFED_{k} {v}")
    L.append("")
    for stem, cls, prefix in schema.C_ENUMS:
        L += enum_block(stem, cls, prefix)
        L.append("")
    for s in model.structs.values():
        L += layout_comment(s)
        L.append("typedef struct {")
        L += members(s)
        L.append(f"}} tpfed_{s.name}_t;")
        L += prototypes(s)
        L.append("")
    L += [
        "// zlib-compatible CRC-32: tpfed_crc32(0, p, n) == zlib.crc32(p[:n]); chainable.",
        "uint32_t tpfed_crc32(uint32_t crc, const uint8_t *p, size_t n);",
        "// Check a whole frame: magic, major version, length (payload <= max_payload), CRC and a",
        "// known type, in that order. On success fills *h and points *payload at the payload.",
        "// A frame with TPFED_FLAG_AUTH has TPFED_AUTH_TRAILER_SIZE bytes (counter, tag) between",
        "// payload and CRC (tpfed_frame_trailer); the tag is not checked here (tpfed_auth.h).",
        "int tpfed_frame_decode(const uint8_t *buf, size_t len, size_t max_payload,",
        "                       tpfed_header_t *h, const uint8_t **payload);",
        "// The AUTH trailer of a frame tpfed_frame_decode accepted: *counter and *tag (16 bytes,",
        "// in buf). TPFED_E_BAD_TAG if the frame has no trailer (flags without AUTH).",
        "int tpfed_frame_trailer(const uint8_t *buf, const tpfed_header_t *h, uint32_t *counter,",
        "                        const uint8_t **tag);",
        "// tpfed_frame_decode, then the payload's own decoder: TPFED_OK iff the frame is valid.",
        "int tpfed_frame_validate(const uint8_t *buf, size_t len, size_t max_payload);",
        "// Decode-check a payload of the given type (TPFED_E_UNKNOWN_TYPE for an unknown type).",
        "int tpfed_payload_validate(uint8_t type, const uint8_t *p, size_t len);",
        "// The payload has been encoded at buf + TPFED_HEADER_SIZE: write the header from *h",
        "// (magic, version and length are set here) and the CRC. *frame_len = whole frame size.",
        "// With TPFED_FLAG_AUTH in h->flags the trailer's room is kept (and covered by the CRC as",
        "// it stands): seal such frames with tpfed_auth_finish (tpfed_auth.h) instead.",
        "int tpfed_frame_finish(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,",
        "                       size_t *frame_len);",
        "// tpfed_frame_finish without the CRC: the header only, room checked for payload, trailer",
        "// (if AUTH) and CRC. *frame_len = the whole frame's size.",
        "int tpfed_frame_begin(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,",
        "                      size_t *frame_len);",
        "// Write the CRC of buf[0 .. frame_len - 4) at buf + frame_len - 4.",
        "void tpfed_frame_put_crc(uint8_t *buf, size_t frame_len);",
        "// Short English name of a status code.",
        "const char *tpfed_status_str(int status);",
        "// 1 if p[0..n) is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or > U+10FFFF).",
        "int tpfed_utf8_valid(const uint8_t *p, size_t n);",
        "// cffi:end",
        "",
        "// Little-endian accessors for raw array elements and fields.",
    ]
    L += ACCESSORS.strip().splitlines()
    L += ["", "#endif", ""]
    return "\n".join(L)


ACCESSORS = """
static inline uint16_t tpfed_rd_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t tpfed_rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t tpfed_rd_u64(const uint8_t *p) {
    return (uint64_t)tpfed_rd_u32(p) | ((uint64_t)tpfed_rd_u32(p + 4) << 32);
}
static inline uint8_t tpfed_rd_u8(const uint8_t *p) { return p[0]; }
static inline int8_t tpfed_rd_i8(const uint8_t *p) { return (int8_t)p[0]; }
static inline int16_t tpfed_rd_i16(const uint8_t *p) { return (int16_t)tpfed_rd_u16(p); }
static inline float tpfed_rd_f32(const uint8_t *p) {
    uint32_t u = tpfed_rd_u32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void tpfed_wr_u8(uint8_t *p, uint8_t v) { p[0] = v; }
static inline void tpfed_wr_i8(uint8_t *p, int8_t v) { p[0] = (uint8_t)v; }
static inline void tpfed_wr_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void tpfed_wr_i16(uint8_t *p, int16_t v) { tpfed_wr_u16(p, (uint16_t)v); }
static inline void tpfed_wr_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void tpfed_wr_u64(uint8_t *p, uint64_t v) {
    tpfed_wr_u32(p, (uint32_t)v);
    tpfed_wr_u32(p + 4, (uint32_t)(v >> 32));
}
static inline void tpfed_wr_f32(uint8_t *p, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    tpfed_wr_u32(p, u);
}
"""


def decode_body(s: CStruct) -> list[str]:
    t = f"tpfed_{s.name}_t"
    L = []
    if s.item:
        L.append(f"int tpfed_{s.name}_decode(const uint8_t *p, size_t len, {t} *m, size_t *used) {{")
        L.append("    if (!m || !used || (!p && len)) return TPFED_E_BAD_ARG;")
    else:
        L.append(f"int tpfed_{s.name}_decode(const uint8_t *p, size_t len, {t} *m) {{")
        L.append("    if (!m || (!p && len)) return TPFED_E_BAD_ARG;")
    L += [f"    {t} t;", "    size_t off = 0;", "    size_t sz = 0;", "    (void)sz;",
          "    memset(&t, 0, sizeof t);"]
    for f in s.fields:
        n = f.name
        if f.kind == "scalar":
            L.append(f"    if (len - off < {f.size}u) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n} = tpfed_rd_{f.acc}(p + off);")
            L.append(f"    off += {f.size}u;")
        elif f.kind == "bytes":
            L.append(f"    if (len - off < {f.size}u) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n} = p + off;")
            L.append(f"    off += {f.size}u;")
        elif f.kind == "const":
            L.append(f"    if (len - off < {f.size}u) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    if (memcmp(p + off, {c_string(f.value)}, {f.size}u) != 0) return TPFED_E_BAD_MAGIC;")
            L.append(f"    off += {f.size}u;")
        elif f.kind == "string":
            L.append("    if (len - off < 1u) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n}_len = p[off];")
            L.append("    off += 1u;")
            L.append(f"    if (len - off < t.{n}_len) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    if (!tpfed_utf8_valid(p + off, t.{n}_len)) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n} = p + off;")
            L.append(f"    off += t.{n}_len;")
        elif f.kind == "greedy":
            L.append("    if (len - off > 0xFFFFu) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n} = p + off;")
            L.append(f"    t.{n}_len = (uint16_t)(len - off);")
            L.append("    off = len;")
        elif f.kind == "array" and f.item is not None and f.item.fixed_size is None:
            L.append("    {")
            L.append("        size_t start = off, i;")
            L.append(f"        for (i = 0; i < {f.count}; i++) {{")
            L.append(f"            tpfed_{f.item.name}_t it;")
            L.append("            size_t u;")
            L.append(f"            int rc = tpfed_{f.item.name}_decode(p + off, len - off, &it, &u);")
            L.append("            if (rc != TPFED_OK) return TPFED_E_BAD_PAYLOAD;")
            L.append("            off += u;")
            L.append("        }")
            L.append("        if (off - start > 0xFFFFu) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"        t.{n} = p + start;")
            L.append(f"        t.{n}_len = (uint16_t)(off - start);")
            L.append("    }")
        elif f.kind == "array":
            size = f.item.fixed_size if f.item is not None else f.size
            L.append(f"    sz = {f.count} * {size}u;")
            L.append("    if (len - off < sz) return TPFED_E_BAD_PAYLOAD;")
            cast = "(const int8_t *)" if f.ctype == "int8_t" else ""
            L.append(f"    t.{n} = {cast}(p + off);")
            L.append("    off += sz;")
        elif f.kind == "switch":
            L += switch_size(f, "TPFED_E_BAD_PAYLOAD")
            L.append("    if (len - off < sz) return TPFED_E_BAD_PAYLOAD;")
            L.append(f"    t.{n} = p + off;")
            L.append("    off += sz;")
    if s.item:
        L.append("    *used = off;")
    elif s.terminated:
        L.append("    if (off != len) return TPFED_E_BAD_PAYLOAD;")
    L += ["    *m = t;", "    return TPFED_OK;", "}", ""]
    return L


def switch_size(f: CField, err: str) -> list[str]:
    L = [f"    switch (t.{f.key}) {{"]
    for value, size, _ in f.cases:
        L.append(f"    case {value}u: sz = {size}; break;")
    L.append(f"    default: return {err};")
    L.append("    }")
    return L


def encode_body(s: CStruct) -> list[str]:
    t = f"tpfed_{s.name}_t"
    L = [f"int tpfed_{s.name}_encode(uint8_t *p, size_t cap, const {t} *m, size_t *out_len) {{",
         "    if (!m || !out_len || (!p && cap)) return TPFED_E_BAD_ARG;",
         f"    {t} t = *m;", "    size_t off = 0;", "    size_t sz = 0;", "    (void)sz;"]
    for f in s.fields:
        n = f.name
        if f.kind == "scalar":
            L.append(f"    if (cap - off < {f.size}u) return TPFED_E_NO_SPACE;")
            L.append(f"    tpfed_wr_{f.acc}(p + off, t.{n});")
            L.append(f"    off += {f.size}u;")
            continue
        if f.kind == "const":
            L.append(f"    if (cap - off < {f.size}u) return TPFED_E_NO_SPACE;")
            L.append(f"    memcpy(p + off, {c_string(f.value)}, {f.size}u);")
            L.append(f"    off += {f.size}u;")
            continue
        if f.kind == "bytes":
            L.append(f"    sz = {f.size}u;")
        elif f.kind == "string":
            L.append(f"    sz = t.{n}_len;")
            L.append(f"    if (sz && !t.{n}) return TPFED_E_BAD_ARG;")
            L.append(f"    if (sz && !tpfed_utf8_valid(t.{n}, sz)) return TPFED_E_BAD_ARG;")
            L.append("    if (cap - off < 1u) return TPFED_E_NO_SPACE;")
            L.append(f"    p[off] = t.{n}_len;")
            L.append("    off += 1u;")
        elif f.kind == "greedy":
            L.append(f"    sz = t.{n}_len;")
        elif f.kind == "array" and f.item is not None and f.item.fixed_size is None:
            L.append(f"    sz = t.{n}_len;")
            L.append(f"    if (sz && !t.{n}) return TPFED_E_BAD_ARG;")
            L.append("    {")
            L.append("        size_t o = 0, i;")
            L.append(f"        for (i = 0; i < {f.count}; i++) {{")
            L.append(f"            tpfed_{f.item.name}_t it;")
            L.append("            size_t u;")
            L.append(f"            if (tpfed_{f.item.name}_decode(t.{n} + o, sz - o, &it, &u) != TPFED_OK)")
            L.append("                return TPFED_E_BAD_ARG;")
            L.append("            o += u;")
            L.append("        }")
            L.append("        if (o != sz) return TPFED_E_BAD_ARG;")
            L.append("    }")
        elif f.kind == "array":
            size = f.item.fixed_size if f.item is not None else f.size
            L.append(f"    sz = {f.count} * {size}u;")
        elif f.kind == "switch":
            L += switch_size(f, "TPFED_E_BAD_ARG")
        L.append(f"    if (sz && !t.{n}) return TPFED_E_BAD_ARG;")
        L.append("    if (cap - off < sz) return TPFED_E_NO_SPACE;")
        L.append(f"    if (sz) memcpy(p + off, t.{n}, sz);")
        L.append("    off += sz;")
    L += ["    *out_len = off;", "    return TPFED_OK;", "}", ""]
    return L


FRAME_C = """
// CRC-32 (reflected, polynomial 0xEDB88320), a byte at a time with a 256-entry table (1 KiB of
// flash; every frame is CRCed once per hop, sealed ones too, so it is worth it).
static const uint32_t crc_table[256] = {
    0x00000000u, 0x77073096u, 0xEE0E612Cu, 0x990951BAu, 0x076DC419u, 0x706AF48Fu,
    0xE963A535u, 0x9E6495A3u, 0x0EDB8832u, 0x79DCB8A4u, 0xE0D5E91Eu, 0x97D2D988u,
    0x09B64C2Bu, 0x7EB17CBDu, 0xE7B82D07u, 0x90BF1D91u, 0x1DB71064u, 0x6AB020F2u,
    0xF3B97148u, 0x84BE41DEu, 0x1ADAD47Du, 0x6DDDE4EBu, 0xF4D4B551u, 0x83D385C7u,
    0x136C9856u, 0x646BA8C0u, 0xFD62F97Au, 0x8A65C9ECu, 0x14015C4Fu, 0x63066CD9u,
    0xFA0F3D63u, 0x8D080DF5u, 0x3B6E20C8u, 0x4C69105Eu, 0xD56041E4u, 0xA2677172u,
    0x3C03E4D1u, 0x4B04D447u, 0xD20D85FDu, 0xA50AB56Bu, 0x35B5A8FAu, 0x42B2986Cu,
    0xDBBBC9D6u, 0xACBCF940u, 0x32D86CE3u, 0x45DF5C75u, 0xDCD60DCFu, 0xABD13D59u,
    0x26D930ACu, 0x51DE003Au, 0xC8D75180u, 0xBFD06116u, 0x21B4F4B5u, 0x56B3C423u,
    0xCFBA9599u, 0xB8BDA50Fu, 0x2802B89Eu, 0x5F058808u, 0xC60CD9B2u, 0xB10BE924u,
    0x2F6F7C87u, 0x58684C11u, 0xC1611DABu, 0xB6662D3Du, 0x76DC4190u, 0x01DB7106u,
    0x98D220BCu, 0xEFD5102Au, 0x71B18589u, 0x06B6B51Fu, 0x9FBFE4A5u, 0xE8B8D433u,
    0x7807C9A2u, 0x0F00F934u, 0x9609A88Eu, 0xE10E9818u, 0x7F6A0DBBu, 0x086D3D2Du,
    0x91646C97u, 0xE6635C01u, 0x6B6B51F4u, 0x1C6C6162u, 0x856530D8u, 0xF262004Eu,
    0x6C0695EDu, 0x1B01A57Bu, 0x8208F4C1u, 0xF50FC457u, 0x65B0D9C6u, 0x12B7E950u,
    0x8BBEB8EAu, 0xFCB9887Cu, 0x62DD1DDFu, 0x15DA2D49u, 0x8CD37CF3u, 0xFBD44C65u,
    0x4DB26158u, 0x3AB551CEu, 0xA3BC0074u, 0xD4BB30E2u, 0x4ADFA541u, 0x3DD895D7u,
    0xA4D1C46Du, 0xD3D6F4FBu, 0x4369E96Au, 0x346ED9FCu, 0xAD678846u, 0xDA60B8D0u,
    0x44042D73u, 0x33031DE5u, 0xAA0A4C5Fu, 0xDD0D7CC9u, 0x5005713Cu, 0x270241AAu,
    0xBE0B1010u, 0xC90C2086u, 0x5768B525u, 0x206F85B3u, 0xB966D409u, 0xCE61E49Fu,
    0x5EDEF90Eu, 0x29D9C998u, 0xB0D09822u, 0xC7D7A8B4u, 0x59B33D17u, 0x2EB40D81u,
    0xB7BD5C3Bu, 0xC0BA6CADu, 0xEDB88320u, 0x9ABFB3B6u, 0x03B6E20Cu, 0x74B1D29Au,
    0xEAD54739u, 0x9DD277AFu, 0x04DB2615u, 0x73DC1683u, 0xE3630B12u, 0x94643B84u,
    0x0D6D6A3Eu, 0x7A6A5AA8u, 0xE40ECF0Bu, 0x9309FF9Du, 0x0A00AE27u, 0x7D079EB1u,
    0xF00F9344u, 0x8708A3D2u, 0x1E01F268u, 0x6906C2FEu, 0xF762575Du, 0x806567CBu,
    0x196C3671u, 0x6E6B06E7u, 0xFED41B76u, 0x89D32BE0u, 0x10DA7A5Au, 0x67DD4ACCu,
    0xF9B9DF6Fu, 0x8EBEEFF9u, 0x17B7BE43u, 0x60B08ED5u, 0xD6D6A3E8u, 0xA1D1937Eu,
    0x38D8C2C4u, 0x4FDFF252u, 0xD1BB67F1u, 0xA6BC5767u, 0x3FB506DDu, 0x48B2364Bu,
    0xD80D2BDAu, 0xAF0A1B4Cu, 0x36034AF6u, 0x41047A60u, 0xDF60EFC3u, 0xA867DF55u,
    0x316E8EEFu, 0x4669BE79u, 0xCB61B38Cu, 0xBC66831Au, 0x256FD2A0u, 0x5268E236u,
    0xCC0C7795u, 0xBB0B4703u, 0x220216B9u, 0x5505262Fu, 0xC5BA3BBEu, 0xB2BD0B28u,
    0x2BB45A92u, 0x5CB36A04u, 0xC2D7FFA7u, 0xB5D0CF31u, 0x2CD99E8Bu, 0x5BDEAE1Du,
    0x9B64C2B0u, 0xEC63F226u, 0x756AA39Cu, 0x026D930Au, 0x9C0906A9u, 0xEB0E363Fu,
    0x72076785u, 0x05005713u, 0x95BF4A82u, 0xE2B87A14u, 0x7BB12BAEu, 0x0CB61B38u,
    0x92D28E9Bu, 0xE5D5BE0Du, 0x7CDCEFB7u, 0x0BDBDF21u, 0x86D3D2D4u, 0xF1D4E242u,
    0x68DDB3F8u, 0x1FDA836Eu, 0x81BE16CDu, 0xF6B9265Bu, 0x6FB077E1u, 0x18B74777u,
    0x88085AE6u, 0xFF0F6A70u, 0x66063BCAu, 0x11010B5Cu, 0x8F659EFFu, 0xF862AE69u,
    0x616BFFD3u, 0x166CCF45u, 0xA00AE278u, 0xD70DD2EEu, 0x4E048354u, 0x3903B3C2u,
    0xA7672661u, 0xD06016F7u, 0x4969474Du, 0x3E6E77DBu, 0xAED16A4Au, 0xD9D65ADCu,
    0x40DF0B66u, 0x37D83BF0u, 0xA9BCAE53u, 0xDEBB9EC5u, 0x47B2CF7Fu, 0x30B5FFE9u,
    0xBDBDF21Cu, 0xCABAC28Au, 0x53B39330u, 0x24B4A3A6u, 0xBAD03605u, 0xCDD70693u,
    0x54DE5729u, 0x23D967BFu, 0xB3667A2Eu, 0xC4614AB8u, 0x5D681B02u, 0x2A6F2B94u,
    0xB40BBE37u, 0xC30C8EA1u, 0x5A05DF1Bu, 0x2D02EF8Du,
};

//@crc-slices
uint32_t tpfed_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    size_t i = 0;
    crc = ~crc;
#if defined(TPFED_HOST)
    for (; i + 8 <= n; i += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[i] | (uint32_t)p[i + 1] << 8 | (uint32_t)p[i + 2] << 16 |
                             (uint32_t)p[i + 3] << 24);
        uint32_t hi = (uint32_t)p[i + 4] | (uint32_t)p[i + 5] << 8 | (uint32_t)p[i + 6] << 16 |
                      (uint32_t)p[i + 7] << 24;
        crc = crc_slices[7][lo & 0xFFu] ^ crc_slices[6][(lo >> 8) & 0xFFu] ^
              crc_slices[5][(lo >> 16) & 0xFFu] ^ crc_slices[4][lo >> 24] ^
              crc_slices[3][hi & 0xFFu] ^ crc_slices[2][(hi >> 8) & 0xFFu] ^
              crc_slices[1][(hi >> 16) & 0xFFu] ^ crc_slices[0][hi >> 24];
    }
#endif
    for (; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

int tpfed_utf8_valid(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        size_t k;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F; // no surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F; // <= U+10FFFF
        } else {
            return 0;
        }
        if (n - i <= k) return 0;
        if (p[i + 1] < lo || p[i + 1] > hi) return 0;
        for (size_t j = 2; j <= k; j++) {
            if (p[i + j] < 0x80 || p[i + j] > 0xBF) return 0;
        }
        i += k + 1;
    }
    return 1;
}

static int type_known(uint8_t type) {
    switch (type) {
@TYPE_CASES@
        return 1;
    default:
        return 0;
    }
}

int tpfed_frame_decode(const uint8_t *buf, size_t len, size_t max_payload,
                       tpfed_header_t *h, const uint8_t **payload) {
    tpfed_header_t t;
    size_t used, total;
    if (!h || !payload || (!buf && len)) return TPFED_E_BAD_ARG;
    if (len < 1u) return TPFED_E_TRUNCATED;
    if (buf[0] != TPFED_MAGIC) return TPFED_E_BAD_MAGIC;
    if (len < TPFED_HEADER_SIZE) return TPFED_E_TRUNCATED;
    if (tpfed_header_decode(buf, len, &t, &used) != TPFED_OK) return TPFED_E_TRUNCATED;
    if ((t.version >> 4) != TPFED_VERSION_MAJOR) return TPFED_E_VERSION;
    if (t.length > max_payload) return TPFED_E_OVERSIZE;
    total = (size_t)TPFED_HEADER_SIZE + t.length + TPFED_CRC_SIZE;
    if (t.flags & TPFED_FLAG_AUTH) total += TPFED_AUTH_TRAILER_SIZE;
    if (len < total) return TPFED_E_TRUNCATED;
    if (len > total) return TPFED_E_BAD_LENGTH;
    if (tpfed_crc32(0, buf, total - TPFED_CRC_SIZE) != tpfed_rd_u32(buf + total - TPFED_CRC_SIZE))
        return TPFED_E_BAD_CRC;
    if (!type_known(t.type)) return TPFED_E_UNKNOWN_TYPE;
    *h = t;
    *payload = buf + TPFED_HEADER_SIZE;
    return TPFED_OK;
}

int tpfed_frame_trailer(const uint8_t *buf, const tpfed_header_t *h, uint32_t *counter,
                        const uint8_t **tag) {
    const uint8_t *t;
    if (!buf || !h || !counter || !tag) return TPFED_E_BAD_ARG;
    if (!(h->flags & TPFED_FLAG_AUTH)) return TPFED_E_BAD_TAG;
    t = buf + TPFED_HEADER_SIZE + h->length;
    *counter = tpfed_rd_u32(t);
    *tag = t + 4;
    return TPFED_OK;
}

int tpfed_payload_validate(uint8_t type, const uint8_t *p, size_t len) {
    switch (type) {
@VALIDATE_CASES@
    default:
        return TPFED_E_UNKNOWN_TYPE;
    }
}

int tpfed_frame_validate(const uint8_t *buf, size_t len, size_t max_payload) {
    tpfed_header_t h;
    const uint8_t *payload;
    int rc = tpfed_frame_decode(buf, len, max_payload, &h, &payload);
    if (rc != TPFED_OK) return rc;
    return tpfed_payload_validate(h.type, payload, h.length);
}

int tpfed_frame_begin(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,
                      size_t *frame_len) {
    size_t used, end;
    if (!buf || !h || !frame_len) return TPFED_E_BAD_ARG;
    if (payload_len > TPFED_MAX_PAYLOAD) return TPFED_E_BAD_ARG;
    end = (size_t)TPFED_HEADER_SIZE + payload_len;
    if (h->flags & TPFED_FLAG_AUTH) end += TPFED_AUTH_TRAILER_SIZE;
    if (cap < end || cap - end < TPFED_CRC_SIZE) return TPFED_E_NO_SPACE;
    h->magic = TPFED_MAGIC;
    h->version = TPFED_VERSION;
    h->length = (uint16_t)payload_len;
    if (tpfed_header_encode(buf, TPFED_HEADER_SIZE, h, &used) != TPFED_OK) return TPFED_E_NO_SPACE;
    *frame_len = end + TPFED_CRC_SIZE;
    return TPFED_OK;
}

void tpfed_frame_put_crc(uint8_t *buf, size_t frame_len) {
    size_t end = frame_len - TPFED_CRC_SIZE;
    tpfed_wr_u32(buf + end, tpfed_crc32(0, buf, end));
}

int tpfed_frame_finish(uint8_t *buf, size_t cap, tpfed_header_t *h, size_t payload_len,
                       size_t *frame_len) {
    int rc = tpfed_frame_begin(buf, cap, h, payload_len, frame_len);
    if (rc != TPFED_OK) return rc;
    tpfed_frame_put_crc(buf, *frame_len);
    return TPFED_OK;
}

const char *tpfed_status_str(int status) {
    switch (status) {
@STATUS_CASES@
    default: return "unknown status";
    }
}
"""


def _crc_slices_c() -> str:
    """Slicing-by-8 tables for the host build (8 KiB; boards keep the byte-wise 1 KiB table):
    eight bytes per step, several times faster on the large frames of weight pushes."""
    base = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        base.append(c)
    slices = [base]
    for _ in range(7):
        prev = slices[-1]
        slices.append([(v >> 8) ^ base[v & 0xFF] for v in prev])
    out = ["#if defined(TPFED_HOST)", "static const uint32_t crc_slices[8][256] = {"]
    for t in slices:
        out.append("    {")
        for i in range(0, 256, 6):
            out.append("        " + " ".join(f"0x{v:08X}u," for v in t[i:i + 6]))
        out.append("    },")
    out += ["};", "#endif", ""]
    return "\n".join(out) + "\n"


FRAME_C = FRAME_C.replace("//@crc-slices\n", _crc_slices_c())


def gen_source(model: Model, by_type: dict[int, str]) -> str:
    L = [BANNER.rstrip(), '#include "tpfed_proto.h"', ""]
    for s in model.structs.values():
        L += decode_body(s)
        L += encode_body(s)
    type_cases = "\n".join(f"    case TPFED_MSG_{schema.MsgType(t).name}:" for t in sorted(by_type))
    validate = []
    for t in sorted(by_type):
        name = by_type[t]
        validate += [f"    case TPFED_MSG_{schema.MsgType(t).name}: {{",
                     f"        tpfed_{name}_t m;",
                     f"        return tpfed_{name}_decode(p, len, &m);",
                     "    }"]
    status = "\n".join(
        f'    case {"TPFED_OK" if s == schema.Status.OK else "TPFED_E_" + s.name}: '
        f'return "{s.name.lower().replace("_", " ")}";' for s in schema.Status
    )
    L += FRAME_C.replace("@TYPE_CASES@", type_cases).replace(
        "@VALIDATE_CASES@", "\n".join(validate)).replace("@STATUS_CASES@", status).strip().splitlines()
    L.append("")
    return "\n".join(L)


def generate() -> dict[Path, str]:
    model, by_type = build_model()
    return {HEADER_OUT: gen_header(model, by_type), SOURCE_OUT: gen_source(model, by_type)}


def write_outputs(outputs: dict[Path, str], *, check: bool, tool: str) -> int:
    """Write generated files (atomically, only when changed), or with ``check`` name each
    stale one and return 1. Shared by the generators in tools/."""
    if check:
        stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run: python tools/{tool})", file=sys.stderr)
        return 1 if stale else 0
    for p, text in outputs.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text() != text:
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(p)
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the committed files differ from what would be generated")
    args = ap.parse_args(argv)
    outputs = generate()
    return write_outputs(outputs, check=args.check, tool="gen_protocol_c.py")


if __name__ == "__main__":
    sys.exit(main())
