"""Streamed text for one request: incremental detokenization and stop-string hold-back, off the engine thread.

The engine's stream events carry token ids only; whoever streams text to a client (the server's event loop)
turns them into text here. Each push decodes a window of a few tokens, not the whole answer (as in vLLM's and
TGI's detokenizers), so a long answer costs linear, not quadratic, time; and the text sent never ends in a
partial character or in the beginning of a stop string that may follow.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Feed a request's new token ids (`push`), get the new text that is safe to send; `finish` with the final
    text gives the rest. Sent text is never taken back: if the tokenizer revises earlier text (rare), the
    final text wins from the point where they diverge."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] is context decoded again for the next piece
        self.read_offset = 0  # tokens before this are in self.text
        self.text = ""  # settled text decoded so far
        self.sent = ""  # text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add new tokens; returns the text to send now (may be empty)."""
        self.tokens.extend(token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # a whole new piece (no partial character)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._release(self._safe(self.text))

    def _safe(self, text: str) -> str:
        """`text` cut before any stop string, and before a tail that may begin one."""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return text[:cut]
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):  # the tokenizer revised earlier text: hold until the final text
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given the request's final text (already cut at its stop string)."""
        delta = final_text[len(self.sent) :]  # if the texts diverged, the final one continues where sending stopped
        self.sent += delta
        return delta
