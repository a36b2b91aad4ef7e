#!/usr/bin/env python3
"""Write the golden frames every codec is tested against: shared_protocol/golden/*.bin and
manifest.json. ``--check`` exits 1 and names stale or missing files instead of writing.

Manifest entries (``entries`` list), by ``kind``:

- ``frame``: a valid frame. ``type`` (MsgType name), ``header`` (src, dst, seq, session, flags,
  version), ``payload`` (decoded fields; bytes as {"$bytes": hex}), ``reencode`` (false when
  re-encoding would not give the same bytes, e.g. another minor version). Frames with the AUTH
  flag also have ``auth``: ``counter`` and ``tag`` (the trailer), ``key`` (the session key Ks
  it was sealed with, hex) and ``valid`` (false: the tag was tampered with after sealing; the
  frame still decodes, but must not verify).
- ``auth_vectors``: one handshake: ``key`` (K), ``nonce_c``, ``nonce_p``, ``device_id``,
  ``session`` and what follows from them: ``proof_p``, ``proof_c``, ``session_key`` (hex).
- ``invalid``: bytes that must be refused. ``error`` (Python class name), ``status`` (C status
  name), optional ``max_payload``.
- ``fragments``: the datagrams ``DatagramFramer(mtu, first_id)`` sends for the frame in
  ``frame`` (another golden file), concatenated; ``sizes`` splits them.
- ``cobs_stream``: a byte stream (garbage included) that a StreamFramer turns into ``frames``
  (golden files, in order) with ``dropped`` segments thrown away.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared_protocol import auth, codec, schema  # noqa: E402
from shared_protocol.framing import DatagramFramer, StreamFramer  # noqa: E402
from shared_protocol.golden_data import to_json  # noqa: E402
from shared_protocol.schema import (  # noqa: E402
    BATTERY_UNKNOWN,
    BROADCAST,
    TEMPERATURE_UNKNOWN,
    DeviceClass,
    ErrorCode,
    Feature,
    Flag,
    MsgType,
    PartialEncoding,
    Stage,
    TransportKind,
)

GOLDEN = ROOT / "shared_protocol" / "golden"
U16, U32, U64 = 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic bytes (no RNG state to drift between Python versions)."""
    return bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(n))


def q8(n: int, seed: int = 0) -> dict[str, list[int]]:
    nb = (n + schema.Q8_BLOCK - 1) // schema.Q8_BLOCK
    qs = [((i * 37 + seed) % 255) - 127 for i in range(n)]
    if n:
        qs[0] = -128  # the full int8 range appears on the wire even if quantisers avoid it
    scales = [(0x2000 + 97 * b + seed) & 0x7BFF for b in range(nb)]
    return {"scales": scales, "qs": qs}


class Builder:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.entries: list[dict[str, Any]] = []

    def frame(self, name: str, frame: codec.Frame, reencode: bool = True) -> bytes:
        data = codec.encode_frame(frame)
        decoded = codec.decode_frame(data)  # the manifest holds what a decoder must return
        self.files[f"{name}.bin"] = data
        self.entries.append({
            "file": f"{name}.bin",
            "kind": "frame",
            "type": decoded.type.name,
            "header": {"src": frame.src, "dst": frame.dst, "seq": frame.seq,
                       "session": frame.session, "flags": frame.flags, "version": frame.version},
            "payload": to_json(decoded.payload),
            "reencode": reencode,
        })
        return data

    def sealed(self, name: str, frame: codec.Frame, ks: bytes, counter: int,
               tamper: bool = False) -> bytes:
        """frame sealed with session key ks and counter (a tag bit flipped if tamper)."""
        data = bytearray(auth.seal(ks, codec.encode_frame(frame), counter))
        if tamper:
            data[-5] ^= 0x01  # last tag byte; the CRC is made right again
            data[-4:] = zlib.crc32(data[:-4]).to_bytes(4, "little")
        data = bytes(data)
        decoded = codec.decode_frame(data)
        assert (auth.verify(ks, data) == counter) if not tamper else decoded.counter == counter
        assert codec.encode_frame(decoded) == data
        self.files[f"{name}.bin"] = data
        self.entries.append({
            "file": f"{name}.bin",
            "kind": "frame",
            "type": decoded.type.name,
            "header": {"src": frame.src, "dst": frame.dst, "seq": frame.seq,
                       "session": frame.session, "flags": decoded.flags, "version": frame.version},
            "payload": to_json(decoded.payload),
            "reencode": True,
            "auth": {"counter": counter, "tag": decoded.tag.hex(), "key": ks.hex(), "valid": not tamper},
        })
        return data

    def raw(self, name: str, data: bytes, kind: str, **info: Any) -> None:
        self.files[f"{name}.bin"] = data
        self.entries.append({"file": f"{name}.bin", "kind": kind, **info})

    def invalid(self, name: str, data: bytes, error: str, max_payload: int | None = None) -> None:
        from shared_protocol import errors

        status = getattr(errors, error).status.name
        info: dict[str, Any] = {"error": error, "status": status}
        if max_payload is not None:
            info["max_payload"] = max_payload
        self.raw(name, data, "invalid", **info)


def reframe(header: bytes, payload: bytes) -> bytes:
    """Header (12 bytes, length patched) + payload + a correct CRC: for crafted bad payloads."""
    h = bytearray(header[:12])
    h[10:12] = len(payload).to_bytes(2, "little")
    body = bytes(h) + payload
    return body + zlib.crc32(body).to_bytes(4, "little")


def build() -> Builder:
    b = Builder()
    F = codec.Frame
    sha = hashlib.sha256(b"tpfed shard").digest()

    # --- HELLO -------------------------------------------------------------------------------
    hello = dict(
        device_class=DeviceClass.ESP32S3, name="Küche-ESP32 ✓", ram_kb=512, psram_kb=8192,
        flash_kb=16384, cpu_mhz=240, cores=2, features=int(Feature.FPU | Feature.SIMD | Feature.DSP),
        int8_macs=123_456_789, battery_pct=87, temperature_dc=412,
        transports=int(TransportKind.SERIAL | TransportKind.WIFI | TransportKind.BLE),
        max_frame=4096, arena_kb=6000,
    )
    hello_frame = b.frame("hello_esp32s3", F(MsgType.HELLO, hello, src=3, dst=0, seq=1, session=0))
    b.frame("hello_unknowns_max", F(MsgType.HELLO, dict(
        device_class=DeviceClass.OTHER, name="", ram_kb=U32, psram_kb=U32, flash_kb=U32,
        cpu_mhz=U16, cores=255, features=0xFF, int8_macs=U64, battery_pct=BATTERY_UNKNOWN,
        temperature_dc=TEMPERATURE_UNKNOWN, transports=0xFF, max_frame=U16, arena_kb=U32,
    ), src=254, dst=BROADCAST, seq=U16, session=U16, flags=int(Flag.ACK_REQUESTED | Flag.LAST)))
    b.frame("hello_long_name", F(MsgType.HELLO, dict(hello, name="€" * 85, device_class=DeviceClass.DESKTOP,
                                                     temperature_dc=-400, battery_pct=0), src=1))

    # --- ASSIGN ------------------------------------------------------------------------------
    geometry = dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, seq_len=512,
                    norm_eps=1e-5, rope_theta=10000.0, flags=0)
    b.frame("assign_stories260k", F(MsgType.ASSIGN, dict(geometry, entries=[
        dict(layer=layer, kv_groups=[0, 2], mlp_ranges=[dict(start=0, end=86)]) for layer in range(5)
    ]), dst=3, seq=2, session=1, flags=int(Flag.ACK_REQUESTED)))
    b.frame("assign_no_entries", F(MsgType.ASSIGN, dict(geometry, entries=[]), dst=4, seq=3, session=1))
    b.frame("assign_extremes", F(MsgType.ASSIGN, dict(
        dim=U16, hidden_dim=U32, n_layers=U16, n_heads=U16, n_kv_heads=U16, seq_len=U16,
        norm_eps=1e-6, rope_theta=1e6, flags=U16, entries=[
            dict(layer=U16, kv_groups=list(range(U16 - 254, U16 + 1)),
                 mlp_ranges=[dict(start=i * 1000, end=U32 - i) for i in range(255)]),
            dict(layer=0, kv_groups=[], mlp_ranges=[]),
            dict(layer=7, kv_groups=[1], mlp_ranges=[]),
        ]), dst=9, seq=4, session=U16))

    # --- WEIGHTS -----------------------------------------------------------------------------
    b.frame("weights_chunk", F(MsgType.WEIGHTS, dict(shard_id=7, offset=0, total=4096, sha256=sha,
                                                     data=pattern(1000)),
                               dst=3, seq=10, session=1, flags=int(Flag.ACK_REQUESTED)))
    b.frame("weights_empty_last", F(MsgType.WEIGHTS, dict(shard_id=U16, offset=U32, total=U32,
                                                          sha256=bytes(32), data=b""),
                                    dst=3, seq=11, session=1, flags=int(Flag.LAST)))
    weights_max = b.frame("weights_max_payload", F(MsgType.WEIGHTS, dict(
        shard_id=1, offset=65536, total=1 << 20, sha256=sha, data=pattern(schema.MAX_PAYLOAD - 42, 3),
    ), dst=5, seq=12, session=2))

    # --- READY, ACTIVATION, PARTIAL ----------------------------------------------------------
    b.frame("ready", F(MsgType.READY, dict(shard_bytes=75_000, arena_used=80_000, arena_free=U32),
                       src=3, dst=0, seq=3, session=1))
    b.frame("activation_dim64", F(MsgType.ACTIVATION, dict(layer=2, stage=Stage.ATTENTION, pos=17, **q8(64)),
                                  dst=BROADCAST, seq=100, session=1))
    b.frame("activation_n33", F(MsgType.ACTIVATION, dict(layer=4, stage=Stage.MLP, pos=U16, **q8(33, 5)),
                                dst=3, seq=101, session=1))
    b.frame("activation_empty", F(MsgType.ACTIVATION, dict(layer=0, stage=0, pos=0, **q8(0)), dst=3))
    n_max = 61672  # largest n whose ACTIVATION payload fits 65535 bytes
    act_max = b.frame("activation_max", F(MsgType.ACTIVATION, dict(layer=U16, stage=Stage.MLP, pos=1,
                                                                   **q8(n_max, 9)), dst=2, seq=U16))
    f32_values = [0.0, -0.0, 1.0, -2.5, 3.4028234663852886e38, 1.401298464324817e-45,
                  -1.1754943508222875e-38] + [i / 8 - 4 for i in range(57)]
    b.frame("partial_f32_dim64", F(MsgType.PARTIAL, dict(layer=2, stage=Stage.ATTENTION, pos=17,
                                                         encoding=PartialEncoding.F32, data=f32_values),
                                   src=3, dst=0, seq=200, session=1))
    b.frame("partial_f16_n33", F(MsgType.PARTIAL, dict(layer=1, stage=Stage.MLP, pos=5,
                                                       encoding=PartialEncoding.F16,
                                                       data=[0, 0x8000, 0x3C00, 0x7BFF, 0x7C00, 0x0001]
                                                       + [0x3000 + i for i in range(27)]),
                                 src=4, dst=0, seq=201, session=1))
    b.frame("partial_q8_n33", F(MsgType.PARTIAL, dict(layer=1, stage=Stage.MLP, pos=5,
                                                      encoding=PartialEncoding.Q8_0, data=q8(33, 2)),
                                src=5, dst=0, seq=202, session=1))
    b.frame("partial_f32_empty", F(MsgType.PARTIAL, dict(layer=0, stage=0, pos=0,
                                                         encoding=PartialEncoding.F32, data=[]), src=6))

    # --- small control messages ---------------------------------------------------------------
    b.frame("heartbeat", F(MsgType.HEARTBEAT, dict(uptime_ms=U32, load_pct=100), src=3, dst=0, seq=9))
    b.frame("ack", F(MsgType.ACK, dict(acked_seq=U16, acked_type=MsgType.WEIGHTS), src=3, dst=0, seq=4))
    b.frame("nack", F(MsgType.NACK, dict(acked_seq=12, acked_type=MsgType.WEIGHTS,
                                         code=ErrorCode.SHARD_HASH_MISMATCH), src=3, dst=0, seq=5))
    b.frame("error_text", F(MsgType.ERROR, dict(code=ErrorCode.OUT_OF_MEMORY,
                                                text="arena: 6 KiB fehlen — 需要更多内存"), src=3, dst=0))
    b.frame("error_max", F(MsgType.ERROR, dict(code=U16, text="x" * 255), src=3, dst=0))
    b.frame("bye", F(MsgType.BYE, dict(reason=schema.ByeReason.REPLANNED), dst=BROADCAST, seq=77))
    b.frame("probe_empty_pad", F(MsgType.PROBE, dict(nonce=0xDEADBEEF, t_send_us=1_700_000_000_000_000,
                                                     pad=b""), dst=3))
    b.frame("probe_reply_pad", F(MsgType.PROBE_REPLY, dict(nonce=1, t_send_us=U64, pad=pattern(1000, 7)),
                                 src=3, dst=0))
    b.frame("version_minor_1_15", F(MsgType.BYE, dict(reason=0), version=0x1F), reencode=False)

    # --- authentication: handshake, provisioning, sealed frames ---------------------------------
    key = hashlib.sha256(b"tpfed golden federation key").digest()
    nonce_c, nonce_p, device_id, session = pattern(16, 11), pattern(16, 12), 3, 0x5EED
    hs = (nonce_c, nonce_p, device_id, session)
    proof_p, proof_c = auth.peer_proof(key, *hs), auth.coordinator_proof(key, *hs)
    ks = auth.session_key(key, *hs)
    b.entries.append({"kind": "auth_vectors", "key": key.hex(), "nonce_c": nonce_c.hex(),
                      "nonce_p": nonce_p.hex(), "device_id": device_id, "session": session,
                      "proof_p": proof_p.hex(), "proof_c": proof_c.hex(), "session_key": ks.hex()})
    b.frame("auth_challenge", F(MsgType.AUTH, auth.challenge(nonce_c, session, device_id),
                                src=0, dst=device_id, seq=1, session=session))
    b.frame("auth_response", F(MsgType.AUTH, auth.response(nonce_p, proof_p),
                               src=device_id, dst=0, seq=1, session=session))
    b.frame("auth_confirm", F(MsgType.AUTH, auth.confirm(proof_c), src=0, dst=device_id, seq=2,
                              session=session))
    b.frame("provision", F(MsgType.PROVISION, dict(key=key), dst=BROADCAST, seq=1))
    b.sealed("sealed_ack_auth", F(MsgType.ACK, dict(acked_seq=2, acked_type=MsgType.AUTH),
                                  src=device_id, dst=0, seq=1, session=session), ks, 1)
    b.sealed("sealed_hello", F(MsgType.HELLO, dict(hello, name="musca-b1"), src=device_id, dst=0,
                               seq=2, session=session), ks, 2)
    b.sealed("sealed_activation_dim64", F(MsgType.ACTIVATION, dict(layer=2, stage=Stage.ATTENTION,
                                                                   pos=17, **q8(64)),
                                          dst=device_id, seq=100, session=session,
                                          flags=int(Flag.ACK_REQUESTED)), ks, 7)
    b.sealed("sealed_partial_f32_dim64", F(MsgType.PARTIAL, dict(layer=2, stage=Stage.ATTENTION, pos=17,
                                                                encoding=PartialEncoding.F32,
                                                                data=f32_values),
                                           src=device_id, dst=0, seq=100, session=session), ks, U32)
    b.sealed("sealed_bye", F(MsgType.BYE, dict(reason=schema.ByeReason.NORMAL), dst=device_id, seq=101,
                             session=session), ks, 8)
    b.sealed("sealed_bye_bad_tag", F(MsgType.BYE, dict(reason=schema.ByeReason.NORMAL), dst=device_id,
                                     seq=101, session=session), ks, 9, tamper=True)

    # --- frames that must be refused ----------------------------------------------------------
    good = hello_frame
    b.invalid("bad_magic", b"\xa6" + good[1:], "BadMagic")
    b.invalid("empty", b"", "TruncatedFrame")
    b.invalid("truncated_header", good[:7], "TruncatedFrame")
    b.invalid("truncated_payload", good[:-5], "TruncatedFrame")
    b.invalid("trailing_byte", good + b"\x00", "BadLength")
    bad_crc = bytearray(good)
    bad_crc[20] ^= 0x40
    b.invalid("bad_crc", bytes(bad_crc), "BadCrc")
    b.invalid("unknown_type", reframe(b"\xa7\x10\x7f" + good[3:12], b"\x01\x02"), "UnknownType")
    b.invalid("version_major_2", reframe(b"\xa7\x20" + good[2:12], good[12:-4]), "VersionMismatch")
    b.invalid("oversize_for_limit", good, "OversizeFrame", max_payload=16)
    b.invalid("hello_short_payload", reframe(good, good[12:-10]), "BadPayload")
    bad_name = bytearray(codec.encode_payload(MsgType.HELLO, dict(hello, name="ab")))
    bad_name[2:4] = b"\xc3\x28"  # not UTF-8
    b.invalid("hello_bad_utf8", reframe(good, bytes(bad_name)), "BadPayload")
    b.invalid("ready_trailing_byte", reframe(b"\xa7\x10\x04" + good[3:12], bytes(12) + b"\x00"), "BadPayload")
    b.invalid("partial_unknown_encoding", reframe(b"\xa7\x10\x11" + good[3:12],
                                                  b"\x01\x00\x00\x05\x00\x07\x01\x00" + b"\x00" * 4),
              "BadPayload")
    sealed_bye = b.files["sealed_bye.bin"]
    no_trailer = bytearray(b.files["bye.bin"])
    no_trailer[3] |= int(Flag.AUTH)  # AUTH set, but no room for the trailer
    b.invalid("sealed_without_trailer", reframe(bytes(no_trailer), no_trailer[12:-4]), "TruncatedFrame")
    b.invalid("sealed_cut_in_trailer", sealed_bye[:-10], "TruncatedFrame")
    b.invalid("sealed_trailing_byte", sealed_bye + b"\x00", "BadLength")
    cleared = bytearray(sealed_bye)
    cleared[3] &= ~int(Flag.AUTH) & 0xFF  # the trailer is then read as 20 extra bytes
    b.invalid("sealed_flag_cleared", reframe(bytes(cleared), bytes(cleared[12:-4])), "BadPayload")
    b.invalid("auth_unknown_step", reframe(b"\xa7\x10\x05" + good[3:12], b"\x04" + bytes(32)),
              "BadPayload")
    b.invalid("auth_challenge_short", reframe(b"\xa7\x10\x05" + good[3:12], b"\x01" + bytes(18)),
              "BadPayload")
    b.invalid("activation_short_qs", reframe(b"\xa7\x10\x10" + good[3:12],
                                             b"\x01\x00\x00\x05\x00\x21\x00" + b"\x00" * 4 + b"\x01" * 32),
              "BadPayload")

    # --- datagram fragment sets ---------------------------------------------------------------
    for name, frame_name, frame, mtu, first_id in (
        ("frags_weights_max_mtu1400", "weights_max_payload.bin", weights_max, 1400, 0x1234),
        ("frags_activation_max_mtu512", "activation_max.bin", act_max, 512, 0xFFFF),
        ("frags_hello_mtu20", "hello_esp32s3.bin", hello_frame, 20, 0),
    ):
        parts = DatagramFramer(mtu=mtu, first_id=first_id).split(frame)
        b.raw(name, b"".join(parts), "fragments", frame=frame_name, mtu=mtu, first_id=first_id,
              sizes=[len(p) for p in parts])

    # --- COBS streams ---------------------------------------------------------------------------
    enc = StreamFramer.encode
    frames = ["hello_esp32s3.bin", "activation_dim64.bin", "partial_q8_n33.bin", "ack.bin"]
    fb = [b.files[f] for f in frames]
    stream = (
        b"\x13\x37garbage before sync"  # no delimiter yet: dropped at the first 0x00
        + b"\x00" + enc(fb[0]) + enc(fb[1])
        + b"\x00\x00"  # empty segments are ignored
        + enc(bytes(bad_crc))  # valid COBS, bad CRC: dropped
        + b"\x05\x01\x00"  # malformed COBS: dropped
        + enc(fb[2]) + enc(fb[3])
    )
    b.raw("stream_mixed", stream, "cobs_stream", frames=frames, dropped=3)
    b.raw("stream_weights_max", enc(weights_max), "cobs_stream", frames=["weights_max_payload.bin"],
          dropped=0)
    return b


def outputs() -> dict[Path, bytes]:
    b = build()
    out = {GOLDEN / name: data for name, data in b.files.items()}
    # One entry per line: readable diffs without a line per array element.
    lines = [json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in b.entries]
    text = (
        f'{{"protocol_version": {schema.PROTOCOL_VERSION}, "generator": "tools/gen_golden.py",\n'
        ' "entries": [\n' + ",\n".join(lines) + "\n]}\n"
    )
    json.loads(text)
    out[GOLDEN / "manifest.json"] = text.encode()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the committed golden files differ from what would be generated")
    args = ap.parse_args(argv)
    out = outputs()
    present = {p for p in GOLDEN.glob("*") if p.suffix in (".bin", ".json")}
    extra = sorted(present - set(out))
    if args.check:
        stale = [p for p, data in out.items() if not p.is_file() or p.read_bytes() != data]
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run: python tools/gen_golden.py)", file=sys.stderr)
        for p in extra:
            print(f"not generated (remove it): {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if stale or extra else 0
    GOLDEN.mkdir(parents=True, exist_ok=True)
    written = 0
    for p, data in out.items():
        if not p.is_file() or p.read_bytes() != data:
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
            written += 1
    for p in extra:
        p.unlink()
    print(f"golden: {len(out)} files, {written} written, {len(extra)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
