"""Text around the token loop: chat formatting, stop sequences and incremental UTF-8 decoding.

Chat formatting uses the model's own template when its tokenizer config has one (a Hugging
Face folder's ``tokenizer_config.json`` ``chat_template``, rendered with jinja2 in a sandbox as
``transformers`` does). Otherwise it uses the plain template below, documented in the README::

    {system}\\n\\n                 (only if there is a system message)
    User: {user}\\n
    Assistant: {assistant}\\n      (earlier turns)
    User: {user}\\n
    Assistant:

With the plain template generation also stops at ``\\nUser:``, so the model does not go on
writing the user's next turn.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tpfed.errors import TpfedError

PLAIN_STOPS = ("\nUser:",)


class ChatError(TpfedError, ValueError):
    """Chat messages that cannot be formatted."""


@dataclass
class ChatFormat:
    """How a conversation becomes a prompt (and which stop sequences come with it)."""

    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    source: str = "plain"

    @classmethod
    def for_model(cls, model_path: str | Path | None) -> ChatFormat:
        """The chat template of the model at ``model_path`` (a file or a folder), or plain."""
        if model_path is None:
            return cls()
        p = Path(model_path)
        folder = p if p.is_dir() else p.parent
        cfg = folder / "tokenizer_config.json"
        if not cfg.is_file():
            return cls()
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return cls()
        tmpl = data.get("chat_template")
        if isinstance(tmpl, list):  # several named templates: the default one
            by_name = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = by_name.get("default")
        if not isinstance(tmpl, str) or not tmpl:
            return cls()

        def token(v) -> str:
            return v.get("content", "") if isinstance(v, dict) else (v or "")

        return cls(tmpl, token(data.get("bos_token")), token(data.get("eos_token")), str(cfg))

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.template else PLAIN_STOPS

    def render(self, messages: Sequence[dict]) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ChatError("every message needs a role and a content")
        msgs = [{"role": m["role"], "content": content_text(m.get("content"))} for m in messages]
        if self.template:
            return self._render_template(msgs)
        out = []
        for m in msgs:
            role = m["role"]
            if role in ("system", "developer"):
                out.append(f"{m['content']}\n\n")
            elif role == "user":
                out.append(f"User: {m['content']}\n")
            elif role == "assistant":
                out.append(f"Assistant: {m['content']}\n")
            else:
                raise ChatError(f"unknown role {role!r} (system, user or assistant)")
        return "".join(out) + "Assistant:"

    def _render_template(self, msgs: list[dict]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template).render(
                messages=msgs, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except TemplateError as exc:
            raise ChatError(f"chat template ({self.source}): {exc}") from None

    def encode(self, tokenizer, messages: Sequence[dict]) -> list[int]:
        """Token ids of the conversation, BOS first (a template's leading BOS text is the
        tokenizer's BOS id, not its spelling)."""
        text = self.render(messages)
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tokenizer.encode(text, bos=True)


def content_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ChatError("only text content parts are supported")
        return "".join(parts)
    raise ChatError("message content must be a string or a list of text parts")


class TextStream:
    """Token bytes in, text out, with stop sequences: text that might begin a stop sequence is
    held back until it is clear; a stop sequence cuts the text there and ends the stream."""

    def __init__(self, stops: Sequence[str] = (), *, lstrip: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.lstrip = lstrip  # drop leading whitespace (a chat reply after "Assistant:")
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.text = ""  # everything emitted so far

    def feed(self, data: bytes) -> str:
        """Text that is safe to emit after ``data``; after a stop sequence, nothing more."""
        if self.stopped:
            return ""
        self._pending += self._dec.decode(data)
        return self._emit(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.lstrip and not self.text:
            self._pending = self._pending.lstrip()
        p = self._pending
        cut = min((i for i in (p.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = p[:cut], "", True
        elif final or not self.stops:
            out, self._pending = p, ""
        else:
            keep = 0  # the longest tail of p that begins some stop sequence
            for s in self.stops:
                for k in range(min(len(s) - 1, len(p)), keep, -1):
                    if s.startswith(p[-k:]):
                        keep = k
                        break
            out, self._pending = p[:len(p) - keep], p[len(p) - keep:]
        self.text += out
        return out
