"""The tpfed wire protocol, defined once.

Everything else is derived from this module: the Python codec (``codec.py``), the hot-path
struct formats (``fastpath.py``), the generated C header and codec (``tools/gen_protocol_c.py``),
the golden frames (``tools/gen_golden.py``) and the documentation comments in the C header.
Change the wire format here and nowhere else, then regenerate.

Frame (all integers little-endian)::

    offset  size  field
    0       1     magic    0xA7
    1       1     version  (major << 4) | minor            (this spec: 1.0 -> 0x10)
    2       1     type     MsgType
    3       1     flags    bit0 ACK_REQUESTED, bit1 LAST, bit2 AUTH, other bits reserved (sent as 0)
    4       1     src      device id, 0 = coordinator
    5       1     dst      device id, 0xFF = broadcast
    6       2     seq
    8       2     session  bumped when a plan is re-made
    10      2     length   payload length
    12      n     payload  (layout per MsgType below)
    12+n    4     crc32    zlib.crc32 of bytes [0, 12+n)

With flag AUTH the payload is followed by the authentication trailer (``AuthTrailer``), and the
CRC comes after it::

    12+n    4     counter  per-sender frame counter, 1, 2, ... (u32; never 0, never reused)
    16+n    16    tag      HMAC-SHA256(Ks, bytes [0, 16+n))[:16]: header as sent, payload, counter
    32+n    4     crc32    zlib.crc32 of bytes [0, 32+n)

``length`` stays the payload length. Ks is the session key of the AUTH handshake (``Auth``,
``shared_protocol/auth.py``); frames without AUTH are valid only for the handshake (AUTH) and
for provisioning a board's federation key (PROVISION). The receiver drops, without any reply,
every other frame that lacks AUTH, has a bad tag, names another session or repeats a counter.

A receiver refuses a frame of another major version and accepts any minor version.
Payload structs end with ``Terminated``: trailing bytes after the last field are an error,
except where the last field is ``GreedyBytes`` (it takes the rest of the payload).

Datagram fragments (only when a frame does not fit the link MTU) start with their own header
(``FragmentHeader``, magic 0xA8); a frame that fits is sent as one datagram, unchanged.

Weight shards pushed in WEIGHTS chunks are layer shares (``LayerShareHeader``, magic ``b"TPLS"``)
followed by their tables and Q8_0 matrices; that section layout is documented in
``host/tpfed/shard.py``. The header is defined here so that host and firmware share it.

Conventions the C generator relies on: every field is a named construct from the small set
used below (fixed-width integers and floats, ``Bytes(int)``, ``Const(bytes)`` (checked on decode,
written on encode, no C member), ``GreedyBytes``, a u8-prefixed
UTF-8 ``PascalString``, ``Rebuild`` count fields, ``Array`` whose count is a ``this``
expression, ``Switch`` on an earlier field, nested ``Struct``); the text after ``*`` is the
field's documentation and ends up in the C header.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from construct import (
    Array,
    Bytes,
    Const,
    Default,
    Error,
    Float32l,
    GreedyBytes,
    Int8sl,
    Int8ul,
    Int16sl,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    Rebuild,
    Struct,
    Switch,
    Terminated,
    len_,
    this,
)

# ---------------------------------------------------------------------------------------------
# Constants

MAGIC = 0xA7
FRAG_MAGIC = 0xA8
VERSION_MAJOR = 1
VERSION_MINOR = 0
PROTOCOL_VERSION = (VERSION_MAJOR << 4) | VERSION_MINOR
COORDINATOR = 0
BROADCAST = 0xFF
CRC_SIZE = 4
MAX_PAYLOAD = 0xFFFF
Q8_BLOCK = 32  # int8 values per Q8_0 scale
BATTERY_UNKNOWN = 255  # battery_pct of a mains-powered device or one that cannot tell
TEMPERATURE_UNKNOWN = -32768  # temperature_dc when there is no sensor
SHA256_SIZE = 32
KEY_SIZE = 32  # federation key K and session key Ks
NONCE_SIZE = 16  # handshake nonces
PROOF_SIZE = 32  # handshake proofs: a whole HMAC-SHA256
TAG_SIZE = 16  # frame tag: HMAC-SHA256 truncated to 16 bytes
COUNTER_SIZE = 4

# Integer constants exported to C as TPFED_<NAME> (the generator reads this table).
C_CONSTANTS: dict[str, int] = {
    "MAGIC": MAGIC,
    "FRAG_MAGIC": FRAG_MAGIC,
    "VERSION_MAJOR": VERSION_MAJOR,
    "VERSION_MINOR": VERSION_MINOR,
    "VERSION": PROTOCOL_VERSION,
    "COORDINATOR": COORDINATOR,
    "BROADCAST": BROADCAST,
    "CRC_SIZE": CRC_SIZE,
    "MAX_PAYLOAD": MAX_PAYLOAD,
    "Q8_BLOCK": Q8_BLOCK,
    "BATTERY_UNKNOWN": BATTERY_UNKNOWN,
    "TEMPERATURE_UNKNOWN": TEMPERATURE_UNKNOWN,
    "SHA256_SIZE": SHA256_SIZE,
    "KEY_SIZE": KEY_SIZE,
    "NONCE_SIZE": NONCE_SIZE,
    "PROOF_SIZE": PROOF_SIZE,
    "TAG_SIZE": TAG_SIZE,
}


class MsgType(IntEnum):
    """Frame types. Values are stable: never renumber, only add."""

    HELLO = 0x01  # peer -> coordinator: capabilities
    ASSIGN = 0x02  # coordinator -> peer: model geometry and the peer's share of each layer
    WEIGHTS = 0x03  # coordinator -> peer: one chunk of a weight shard
    READY = 0x04  # peer -> coordinator: shard stored, arena figures
    AUTH = 0x05  # handshake (CHALLENGE, RESPONSE, CONFIRM): proves the key, makes a session
    PROVISION = 0x06  # host -> unkeyed board over its serial line: the federation key
    ACTIVATION = 0x10  # coordinator -> peers: Q8_0 input of one layer stage
    PARTIAL = 0x11  # peer -> coordinator: its partial output vector of that stage
    HEARTBEAT = 0x20
    ACK = 0x21
    NACK = 0x22
    ERROR = 0x23
    BYE = 0x24
    PROBE = 0x30  # link latency / bandwidth probe; the receiver echoes it as PROBE_REPLY
    PROBE_REPLY = 0x31


class Flag(IntFlag):
    """Header flag bits. Bits not listed are reserved: sent as 0, ignored on receipt."""

    ACK_REQUESTED = 0x01
    LAST = 0x02  # last chunk of a sequence (WEIGHTS) or end of a stream
    AUTH = 0x04  # an AuthTrailer (counter, tag) follows the payload


class AuthStep(IntEnum):
    """AUTH.step: the three messages of the handshake."""

    CHALLENGE = 1  # coordinator -> peer: nonce_c, session, device_id
    RESPONSE = 2  # peer -> coordinator: nonce_p, proof_p
    CONFIRM = 3  # coordinator -> peer: proof_c; the peer ACKs it with an AUTH frame


class DeviceClass(IntEnum):
    DESKTOP = 0
    LAPTOP = 1
    PHONE = 2
    ESP32 = 3
    ESP32S3 = 4
    ESP32C3 = 5
    CORTEX_M_EMU = 6
    OTHER = 7


class Feature(IntFlag):
    """HELLO.features bits."""

    FPU = 0x01
    SIMD = 0x02
    DSP = 0x04
    FP16 = 0x08
    DOTPROD = 0x10  # int8 dot-product instructions


class TransportKind(IntFlag):
    """HELLO.transports bits."""

    SERIAL = 0x01
    UDP = 0x02
    BLE = 0x04
    WIFI = 0x08


class Stage(IntEnum):
    ATTENTION = 0
    MLP = 1
    KV = 2  # encoders: append the row's k/v to the attention KV cache only; PARTIAL with n = 0


class ShareFlag(IntFlag):
    """Bits of a layer share's ``flags`` (LayerShareHeader) and of ASSIGN's: what the units need
    beyond llama2.c's (the sections they add are in host/tpfed/compute/share.py). Bits
    SHARE_ACT_SHIFT.. hold the MLP activation (TPFED_ACT_* of tpfed_kernels.h: 0 SiLU, 1 GELU
    tanh, 2 GELU erf). Flags 0 is llama2.c's units."""

    QKV_BIAS = 1  # bq, bk, bv sections per group
    PLAIN_MLP = 2  # no w3 per range (a 2-matrix MLP)
    MLP_BIAS = 4  # b1 (and b3 when gated) sections per range
    NONCAUSAL = 8  # encoder attention over every row appended (Stage.KV)
    ROPE_TABLE = 16  # a head_size/2 float32 frequency table after the tables
    NO_ROPE = 32  # learned positions: no rotation
    WINDOW = 64  # a u32 sliding window after the tables


SHARE_ACT_SHIFT = 8
SHARE_ACT_MAX = 2  # the highest TPFED_ACT_* value
SHARE_FLAGS_KNOWN = sum(int(f) for f in ShareFlag) | (3 << SHARE_ACT_SHIFT)
C_CONSTANTS["SHARE_ACT_SHIFT"] = SHARE_ACT_SHIFT
C_CONSTANTS["SHARE_ACT_MAX"] = SHARE_ACT_MAX
C_CONSTANTS["SHARE_FLAGS_KNOWN"] = SHARE_FLAGS_KNOWN


class PartialEncoding(IntEnum):
    """PARTIAL.encoding: how the partial vector's n values are stored."""

    F32 = 0  # n x float32
    F16 = 1  # n x IEEE binary16 (raw uint16)
    Q8_0 = 2  # ceil(n/32) fp16 scales then n int8, like ACTIVATION


class ErrorCode(IntEnum):
    """ERROR.code (u16) and NACK.code (u8: only values below 256 are used there)."""

    BAD_FRAME = 1  # magic, length or framing wrong
    BAD_CRC = 2
    VERSION = 3  # other major protocol version
    UNKNOWN_TYPE = 4
    BAD_PAYLOAD = 5  # payload does not match its type's layout
    OVERSIZE = 6  # frame larger than the receiver's max_frame
    OUT_OF_MEMORY = 7  # assignment or shard does not fit the arena
    SHARD_HASH_MISMATCH = 8
    NOT_ASSIGNED = 9  # ACTIVATION for a layer/stage the peer holds nothing of
    BAD_STATE = 10  # message not valid in the peer's current state
    BAD_SESSION = 11  # session/epoch older than the peer's
    UNSUPPORTED = 12  # valid request the peer cannot serve (encoding, geometry)
    BUSY = 13
    TIMEOUT = 14
    INTERNAL = 15


class ByeReason(IntEnum):
    NORMAL = 0
    SHUTDOWN = 1
    REPLANNED = 2  # coordinator: this peer has no part in the new plan
    LOW_BATTERY = 3
    OVERHEAT = 4
    ERROR = 5


class Status(IntEnum):
    """Return codes of the generated C codec (tpfed_status_t); 0 is success.

    Each decoding failure maps one-to-one onto a Python error class (see ``errors.py``)."""

    OK = 0
    TRUNCATED = 1  # buffer shorter than the header or than header.length says
    BAD_MAGIC = 2
    VERSION = 3  # other major version
    BAD_LENGTH = 4  # bytes after the CRC (frame longer than header.length says)
    BAD_CRC = 5
    UNKNOWN_TYPE = 6
    OVERSIZE = 7  # payload longer than the receiver's limit
    BAD_PAYLOAD = 8  # payload does not match its type's layout
    NO_SPACE = 9  # encoding: output buffer too small
    BAD_ARG = 10  # encoding: NULL pointer or a value out of range
    BAD_TAG = 11  # AUTH: no trailer where one is needed, wrong session, or the tag does not verify
    REPLAYED = 12  # AUTH: counter 0, already seen, or older than the replay window


# Enums exported to C, in header order: (C type stem, class, constant prefix).
C_ENUMS: list[tuple[str, type[IntEnum] | type[IntFlag], str]] = [
    ("status", Status, "TPFED_E_"),  # Status.OK is emitted as TPFED_OK
    ("msg_type", MsgType, "TPFED_MSG_"),
    ("flag", Flag, "TPFED_FLAG_"),
    ("auth_step", AuthStep, "TPFED_AUTH_"),
    ("device_class", DeviceClass, "TPFED_DEV_"),
    ("feature", Feature, "TPFED_FEAT_"),
    ("transport_kind", TransportKind, "TPFED_TRANSPORT_"),
    ("stage", Stage, "TPFED_STAGE_"),
    ("share_flag", ShareFlag, "TPFED_SHARE_"),
    ("partial_encoding", PartialEncoding, "TPFED_ENC_"),
    ("error_code", ErrorCode, "TPFED_ERR_"),
    ("bye_reason", ByeReason, "TPFED_BYE_"),
]

# ---------------------------------------------------------------------------------------------
# Header and fragment header

Header = Struct(
    "magic" / Int8ul * "0xA7",
    "version" / Int8ul * "(major << 4) | minor",
    "type" / Int8ul * "MsgType",
    "flags" / Int8ul * "Flag bits",
    "src" / Int8ul * "sender device id; 0 = coordinator",
    "dst" / Int8ul * "receiver device id; 0xFF = broadcast",
    "seq" / Int16ul * "sequence number (per sender, wraps)",
    "session" / Int16ul * "session/epoch; bumped when a plan is re-made",
    "length" / Int16ul * "payload length in bytes",
)
HEADER_SIZE = Header.sizeof()

FragmentHeader = Struct(
    "magic" / Int8ul * "0xA8",
    "frame_id" / Int16ul * "per-sender frame counter (wraps)",
    "index" / Int8ul * "fragment index, 0 .. count-1",
    "count" / Int8ul * "number of fragments of this frame (1..255)",
)
FRAGMENT_HEADER_SIZE = FragmentHeader.sizeof()
C_CONSTANTS["HEADER_SIZE"] = HEADER_SIZE
C_CONSTANTS["FRAGMENT_HEADER_SIZE"] = FRAGMENT_HEADER_SIZE
C_CONSTANTS["FRAME_OVERHEAD"] = HEADER_SIZE + CRC_SIZE

AuthTrailer = Struct(
    "counter" / Int32ul * "per-sender frame counter: 1, 2, ...; checked against a replay window",
    "tag" / Bytes(TAG_SIZE) * "HMAC-SHA256(Ks, header || payload || counter)[:16]",
)
AUTH_TRAILER_SIZE = AuthTrailer.sizeof()
assert AUTH_TRAILER_SIZE == COUNTER_SIZE + TAG_SIZE
C_CONSTANTS["AUTH_TRAILER_SIZE"] = AUTH_TRAILER_SIZE
C_CONSTANTS["AUTH_FRAME_OVERHEAD"] = HEADER_SIZE + AUTH_TRAILER_SIZE + CRC_SIZE

# ---------------------------------------------------------------------------------------------
# Layer share (the content of a weight shard, not a frame payload)

SHARE_MAGIC = b"TPLS"
SHARE_VERSION = 1

LayerShareHeader = Struct(
    "magic" / Const(SHARE_MAGIC) * '"TPLS"',
    "version" / Int16ul * "layer-share format version (SHARE_VERSION)",
    "header_size" / Int16ul * "bytes of this header (SHARE_HEADER_SIZE)",
    "layer" / Int32ul * "layer index",
    "dim" / Int32ul,
    "hidden_dim" / Int32ul,
    "head_size" / Int16ul,
    "group_size" / Int16ul * "query heads per KV group",
    "n_groups" / Int16ul * "KV groups in this share",
    "n_ranges" / Int16ul * "MLP column ranges in this share",
    "n_kv_heads" / Int16ul * "of the model (group indices are below it)",
    "flags" / Int16ul * "ShareFlag bits (host/tpfed/compute/share.py); 0 = llama2.c's units",
    "total" / Int64ul * "share size in bytes, header included",
)
SHARE_HEADER_SIZE = LayerShareHeader.sizeof()
C_CONSTANTS["SHARE_VERSION"] = SHARE_VERSION
C_CONSTANTS["SHARE_HEADER_SIZE"] = SHARE_HEADER_SIZE

# ---------------------------------------------------------------------------------------------
# Payloads


def _q8_fields(count):
    """Q8_0 vector of ``count`` values: ceil(count/32) fp16 scales (raw u16), then count int8."""
    return (
        "scales" / Array((count + (Q8_BLOCK - 1)) // Q8_BLOCK, Int16ul)
        * "ceil(n/32) fp16 scales, raw uint16 little-endian",
        "qs" / Array(count, Int8sl) * "n int8 values",
    )


def _partial_n(ctx) -> int:
    data = ctx.data
    return len(data["qs"]) if ctx.encoding == PartialEncoding.Q8_0 else len(data)


Hello = Struct(
    "device_class" / Int8ul * "DeviceClass",
    "name" / PascalString(Int8ul, "utf8") * "device name, UTF-8, u8 byte-length prefix",
    "ram_kb" / Int32ul * "RAM, KiB",
    "psram_kb" / Int32ul * "PSRAM, KiB",
    "flash_kb" / Int32ul * "flash, KiB",
    "cpu_mhz" / Int16ul * "CPU clock, MHz",
    "cores" / Int8ul * "CPU cores",
    "features" / Int8ul * "Feature bits",
    "int8_macs" / Int64ul * "measured int8 MAC/s",
    "battery_pct" / Int8ul * "0..100; 255 = unknown or mains",
    "temperature_dc" / Int16sl * "deci-degrees C; INT16_MIN = unknown",
    "transports" / Int8ul * "TransportKind bits",
    "max_frame" / Int16ul * "largest frame (header+payload+crc) it accepts",
    "arena_kb" / Int32ul * "memory it can give to weights and KV cache, KiB",
    Terminated,
)

MlpRange = "mlp_range" / Struct(
    "start" / Int32ul * "first hidden column",
    "end" / Int32ul * "one past the last hidden column",
)

LayerEntry = "layer_entry" / Struct(
    "layer" / Int16ul,
    "n_kv_groups" / Rebuild(Int8ul, len_(this.kv_groups)) * "number of KV groups",
    "kv_groups" / Array(this.n_kv_groups, Int16ul) * "KV group ids (u16 each)",
    "n_mlp_ranges" / Rebuild(Int8ul, len_(this.mlp_ranges)) * "number of MLP column ranges",
    "mlp_ranges" / Array(this.n_mlp_ranges, MlpRange) * "MLP hidden column ranges",
    "sha256" / Default(Bytes(SHA256_SIZE), bytes(SHA256_SIZE))
    * "SHA-256 of the layer share wanted here; the peer answers (ACK held) whether it holds it "
    "already; all zero: none named",
)

Assign = Struct(
    "dim" / Int16ul,
    "hidden_dim" / Int32ul,
    "n_layers" / Int16ul,
    "n_heads" / Int16ul,
    "n_kv_heads" / Int16ul,
    "seq_len" / Int16ul,
    "norm_eps" / Float32l,
    "rope_theta" / Float32l,
    "flags" / Default(Int16ul, 0)
    * "ShareFlag bits of every layer share of the model (0 = llama2.c's units); sizes the shares",
    "n_entries" / Rebuild(Int16ul, len_(this.entries)) * "number of layer entries",
    "entries" / Array(this.n_entries, LayerEntry) * "the peer's share, one entry per layer",
    Terminated,
)

Weights = Struct(
    "shard_id" / Int16ul,
    "offset" / Int32ul * "byte offset of this chunk in the shard",
    "total" / Int32ul * "shard size in bytes",
    "sha256" / Bytes(SHA256_SIZE) * "SHA-256 of the whole shard",
    "data" / GreedyBytes * "chunk bytes: the rest of the payload",
)

Ready = Struct(
    "shard_bytes" / Int32ul,
    "arena_used" / Int32ul,
    "arena_free" / Int32ul,
    Terminated,
)

Activation = Struct(
    "layer" / Int16ul,
    "stage" / Int8ul * "Stage",
    "pos" / Int16ul * "token position",
    "n" / Rebuild(Int16ul, len_(this.qs)) * "number of values",
    *_q8_fields(this.n),
    Terminated,
)

Partial = Struct(
    "layer" / Int16ul,
    "stage" / Int8ul * "Stage",
    "pos" / Int16ul * "token position",
    "encoding" / Int8ul * "PartialEncoding",
    "n" / Rebuild(Int16ul, _partial_n) * "number of values",
    "data"
    / Switch(
        this.encoding,
        {
            PartialEncoding.F32: Array(this.n, Float32l),
            PartialEncoding.F16: Array(this.n, Int16ul),
            PartialEncoding.Q8_0: Struct(*_q8_fields(this._.n)),
        },
        default=Error,
    )
    * "F32: n x f32; F16: n x raw fp16; Q8_0: ceil(n/32) raw fp16 scales then n int8",
    Terminated,
)

Heartbeat = Struct(
    "uptime_ms" / Int32ul,
    "load_pct" / Int8ul,
    Terminated,
)

Ack = Struct(
    "acked_seq" / Int16ul,
    "acked_type" / Int8ul * "MsgType",
    "held" / Default(GreedyBytes, b"")
    * "ACK of ASSIGN: one bit per layer entry (entry i: byte i/8, bit i%8), set when the peer "
    "holds that entry's share (its sha256) already and needs no WEIGHTS for it; else empty",
)

Nack = Struct(
    "acked_seq" / Int16ul,
    "acked_type" / Int8ul * "MsgType",
    "code" / Int8ul * "ErrorCode (< 256)",
    Terminated,
)

ErrorMsg = Struct(
    "code" / Int16ul * "ErrorCode",
    "text" / PascalString(Int8ul, "utf8") * "UTF-8, u8 byte-length prefix",
    Terminated,
)

Bye = Struct(
    "reason" / Int8ul * "ByeReason",
    Terminated,
)

Probe = Struct(
    "nonce" / Int32ul,
    "t_send_us" / Int64ul * "sender clock, microseconds",
    "pad" / GreedyBytes * "padding, echoed back unchanged",
)

AuthChallenge = Struct(
    "nonce_c" / Bytes(NONCE_SIZE) * "coordinator nonce, fresh per handshake",
    "session" / Int16ul * "the session number the coordinator chose (random)",
    "device_id" / Int8ul * "the device id the coordinator gives this peer",
)

AuthResponse = Struct(
    "nonce_p" / Bytes(NONCE_SIZE) * "peer nonce, fresh per handshake",
    "proof_p" / Bytes(PROOF_SIZE)
    * 'HMAC(K, "tpfed-peer" || nonce_c || nonce_p || device_id || session LE)',
)

AuthConfirm = Struct(
    "proof_c" / Bytes(PROOF_SIZE)
    * 'HMAC(K, "tpfed-coord" || nonce_c || nonce_p || device_id || session LE)',
)

Auth = Struct(
    "step" / Int8ul * "AuthStep",
    "body"
    / Switch(
        this.step,
        {
            AuthStep.CHALLENGE: AuthChallenge,
            AuthStep.RESPONSE: AuthResponse,
            AuthStep.CONFIRM: AuthConfirm,
        },
        default=Error,
    )
    * "CHALLENGE: tpfed_auth_challenge_t; RESPONSE: tpfed_auth_response_t; CONFIRM: tpfed_auth_confirm_t",
    Terminated,
)

Provision = Struct(
    "key" / Bytes(KEY_SIZE) * "the federation key K",
    Terminated,
)

# The payload layout of every message type. PROBE_REPLY shares PROBE's layout.
PAYLOADS: dict[MsgType, Struct] = {
    MsgType.HELLO: Hello,
    MsgType.ASSIGN: Assign,
    MsgType.WEIGHTS: Weights,
    MsgType.READY: Ready,
    MsgType.AUTH: Auth,
    MsgType.PROVISION: Provision,
    MsgType.ACTIVATION: Activation,
    MsgType.PARTIAL: Partial,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.ACK: Ack,
    MsgType.NACK: Nack,
    MsgType.ERROR: ErrorMsg,
    MsgType.BYE: Bye,
    MsgType.PROBE: Probe,
    MsgType.PROBE_REPLY: Probe,
}

# Extra structs the C generator emits with a codec of their own (not frame payloads).
C_EXTRA_STRUCTS: dict[str, Struct] = {
    "fragment_header": FragmentHeader,
    "share_header": LayerShareHeader,
    "auth_trailer": AuthTrailer,
    "auth_challenge": AuthChallenge,
    "auth_response": AuthResponse,
    "auth_confirm": AuthConfirm,
}
