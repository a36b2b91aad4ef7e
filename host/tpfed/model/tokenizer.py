"""The llama2.c tokenizer (``tokenizer.bin`` / ``tok512.bin``), encoding and decoding exactly as
llama2.c's ``run.c`` does.

File layout (little-endian)::

    int32 max_token_length
    then vocab_size times:  float32 score, int32 length, length bytes (the piece, no NUL)

Ids 0, 1 and 2 are ``<unk>``, BOS and EOS; ids 3..258 are the raw bytes ``<0x00>``..``<0xFF>``
(byte fallback: byte ``b`` is token ``b + 3``).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tpfed.errors import ModelError

BOS = 1
EOS = 2
BYTE_OFFSET = 3
_RAW_BYTE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Tokenizer:
    vocab: list[bytes]
    scores: list[float]
    max_token_length: int
    bos_id: int = BOS
    eos_id: int = EOS
    byte_offset: int = BYTE_OFFSET
    """Id of the byte fallback token ``<0x00>`` (the 256 byte tokens are consecutive)."""
    _lookup: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.vocab) != len(self.scores):
            raise ModelError("tokenizer: vocab and scores differ in length")
        # llama2.c binary-searches a sorted copy; with duplicate pieces it could return any of
        # them. Vocabularies we load have none; keep the lowest id to stay deterministic.
        self._lookup = {}
        for i, piece in enumerate(self.vocab):
            self._lookup.setdefault(piece, i)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def load(cls, path: str | os.PathLike[str], vocab_size: int | None = None) -> Tokenizer:
        """Read a llama2.c tokenizer file. With ``vocab_size`` the file must hold exactly that
        many tokens (the model's)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"tokenizer file not found: {path}")
        data = path.read_bytes()
        return cls.from_bytes(data, vocab_size=vocab_size, name=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, vocab_size: int | None = None, name: str = "tokenizer") -> Tokenizer:
        if len(data) < 4:
            raise ModelError(f"{name}: too short for a tokenizer ({len(data)} bytes)")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= 1024:
            raise ModelError(f"{name}: not a llama2.c tokenizer (max_token_length {max_len})")
        vocab: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data):
            if off + 8 > len(data):
                raise ModelError(f"{name}: truncated in the header of token {len(vocab)}")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or n > max_len or off + n > len(data):
                raise ModelError(
                    f"{name}: token {len(vocab)} has length {n} (max {max_len}, "
                    f"{len(data) - off} bytes left): truncated or not a tokenizer"
                )
            vocab.append(bytes(data[off : off + n]))
            scores.append(score)
            off += n
            if vocab_size is not None and len(vocab) == vocab_size and off != len(data):
                raise ModelError(f"{name}: {len(data) - off} bytes after the {vocab_size} tokens expected")
        if vocab_size is not None and len(vocab) != vocab_size:
            raise ModelError(f"{name}: holds {len(vocab)} tokens, the model expects {vocab_size}")
        if len(vocab) < BYTE_OFFSET + 256:
            raise ModelError(f"{name}: only {len(vocab)} tokens, fewer than the 259 special and byte tokens")
        return cls(vocab=vocab, scores=scores, max_token_length=max_len)

    def lookup(self, piece: bytes) -> int:
        """Id of a piece, or -1 (llama2.c ``str_lookup``)."""
        return self._lookup.get(piece, -1)

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """llama2.c ``encode``: dummy-prefix space, one token per UTF-8 codepoint (byte fallback
        to ``byte + 3``), then repeatedly merge the consecutive pair whose concatenation is the
        best-scoring vocabulary entry (first such pair on ties)."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        tokens: list[int] = []
        if bos:
            tokens.append(self.bos_id)
        if raw:
            tokens.append(self.lookup(b" "))
        i = 0
        n = len(raw)
        while i < n:
            # A codepoint: a lead byte followed by at most three continuation bytes (run.c
            # stops collecting at 4 bytes whatever follows).
            j = i + 1
            while j < n and (raw[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            piece = raw[i:j]
            tid = self.lookup(piece)
            if tid != -1:
                tokens.append(tid)
            else:
                tokens.extend(b + self.byte_offset for b in piece)
            i = j
        vocab = self.vocab
        scores = self.scores
        while True:
            best_score = -1e10
            best_id = -1
            best_idx = -1
            for k in range(len(tokens) - 1):
                tid = self._lookup.get(vocab[tokens[k]] + vocab[tokens[k + 1]], -1)
                if tid != -1 and scores[tid] > best_score:
                    best_score = scores[tid]
                    best_id = tid
                    best_idx = k
            if best_idx == -1:
                break
            tokens[best_idx : best_idx + 2] = [best_id]
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def piece(self, prev_token: int, token: int) -> bytes:
        """Bytes of ``token`` as llama2.c ``decode`` gives them: a leading space is dropped
        right after BOS, and ``<0xXX>`` pieces become the raw byte."""
        if not 0 <= token < len(self.vocab):
            raise ModelError(f"token id {token} outside the vocabulary (size {len(self.vocab)})")
        p = self.vocab[token]
        if prev_token == self.bos_id and p.startswith(b" "):
            p = p[1:]
        m = _RAW_BYTE.fullmatch(p)
        if m:
            return bytes([int(m.group(1), 16)])
        return p

    def decode_bytes(self, tokens: Iterable[int], prev_token: int = -1) -> bytes:
        out = bytearray()
        prev = prev_token
        for t in tokens:
            if t in (self.bos_id, self.eos_id):
                prev = t
                continue
            out += self.piece(prev, t)
            prev = t
        return bytes(out)

    def decode(self, tokens: Iterable[int], prev_token: int = -1) -> str:
        """Text of a token sequence (BOS/EOS produce nothing; invalid UTF-8 is replaced)."""
        return self.decode_bytes(tokens, prev_token).decode("utf-8", errors="replace")
