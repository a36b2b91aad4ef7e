"""Hugging Face ``tokenizer.json`` tokenizers, through the ``tokenizers`` library, behind the
interface of the llama2.c :class:`~tpfed.model.tokenizer.Tokenizer`: ``encode``, ``piece``,
``decode_bytes``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``.

``encode(text, bos=True)`` adds the special tokens the tokenizer's own post-processor adds, as
transformers' ``tokenizer(text)`` does: BOS for Llama and Mistral, ``[CLS] ... [SEP]`` for BERT,
nothing for GPT-2 and Qwen2. ``decode`` is the library's (special tokens skipped).
``piece(prev, token)`` gives one token's bytes for streaming, following the decoder the file
names: byte-level (GPT-2, Qwen2), ``▁`` with byte fallback (Llama, Mistral), WordPiece (BERT).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tpfed.errors import ModelError

_RAW_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _token_id(tok, value, fallback: int) -> int:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        tid = tok.token_to_id(value)
        if tid is not None:
            return int(tid)
    return fallback


class JsonTokenizer:
    """A ``tokenizer.json`` (see the module docstring)."""

    def __init__(self, tok, bos_id: int = -1, eos_id: int = -1, name: str = "tokenizer") -> None:
        self.tok = tok
        self.name = name
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        spec = json.loads(tok.to_str())
        self._special = {int(t["id"]) for t in spec.get("added_tokens") or [] if t.get("special")}
        decoder = json.dumps(spec.get("decoder") or {}, ensure_ascii=False)
        if '"ByteLevel"' in decoder:
            self.style = "bytelevel"
            self._bytes = _byte_decoder()
        elif '"WordPiece"' in decoder:
            self.style = "wordpiece"
            self._prefix = (spec.get("decoder") or {}).get("prefix", "##")
        elif "▁" in decoder or '"Metaspace"' in decoder:
            self.style = "metaspace"
        else:
            self.style = "plain"
        self._strip_first = '"Strip"' in decoder or '"Metaspace"' in decoder

    @classmethod
    def load(cls, path: str | os.PathLike[str], bos_id: int = -1, eos_id: int = -1) -> JsonTokenizer:
        """Read ``tokenizer.json`` (or the one in a folder). Special ids come from
        ``tokenizer_config.json`` beside it when it names them, else from the arguments (the
        model's config)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"tokenizer not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library's parse errors
            raise ModelError(f"{path}: not a readable tokenizer.json ({exc})") from None
        tc_path = path.parent / "tokenizer_config.json"
        if tc_path.is_file():
            try:
                tc = json.loads(tc_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{tc_path}: not readable ({exc})") from None
            bos_id = _token_id(tok, tc.get("bos_token"), bos_id)
            eos_id = _token_id(tok, tc.get("eos_token"), eos_id)
        return cls(tok, bos_id=bos_id, eos_id=eos_id, name=str(path))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=bos).ids)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_with_types(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """Ids and token types (BERT segments) with the post-processor's special tokens."""
        enc = self.tok.encode(text, pair, add_special_tokens=True)
        return list(enc.ids), list(enc.type_ids)

    def piece(self, prev_token: int, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            raise ModelError(f"token id {token} outside the vocabulary (size {self.vocab_size})")
        if token in self._special:
            return b""
        s = self.tok.id_to_token(token) or ""
        first = prev_token < 0 or prev_token == self.bos_id or prev_token in self._special
        if self.style == "bytelevel":
            return bytes(self._bytes.get(ch, 0x3F) for ch in s)
        if self.style == "wordpiece":
            if s.startswith(self._prefix):
                return s[len(self._prefix):].encode()
            return (s if first else " " + s).encode()
        if self.style == "metaspace":
            m = _RAW_BYTE.fullmatch(s)
            if m:
                return bytes([int(m.group(1), 16)])
            s = s.replace("▁", " ")
            if first and self._strip_first and s.startswith(" "):
                s = s[1:]
            return s.encode()
        return s.encode()

    def decode_bytes(self, tokens: Iterable[int], prev_token: int = -1) -> bytes:
        out = bytearray()
        prev = prev_token
        for t in tokens:
            out += self.piece(prev, t)
            prev = t
        return bytes(out)

    def decode(self, tokens: Iterable[int], prev_token: int = -1) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)
