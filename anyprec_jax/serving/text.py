"""Generated tokens to text, incrementally, with OpenAI `stop` strings.

`TextStream.push(token)` decodes the whole continuation so far and returns the part
that is safe to send: text that could still grow into a stop string, or that ends in
an incomplete character (U+FFFD from a partial byte sequence), is held back until the
next token decides it. The first stop string found ends the stream; the text sent
never contains it (as OpenAI does).
"""

from __future__ import annotations

from typing import Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
  """Incremental detokenizer of one row.

  Attributes:
    tokens: the generated ids pushed so far.
    stopped: a stop string was found.
  """

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self._tok = tokenizer
    self._stop = tuple(s for s in stop if s)
    self.tokens: list[int] = []
    self._sent = 0
    self._text = ""
    self.stopped = False

  def _hold(self, text: str) -> int:
    """Characters at the end of `text` not safe to send yet."""
    hold = 0
    for s in self._stop:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          hold = max(hold, k)
          break
    if text.endswith(_REPLACEMENT):
      hold = max(hold, len(text) - len(text.rstrip(_REPLACEMENT)))
    return hold

  def push(self, token: int) -> str:
    """Adds one generated token; returns the new text that may be sent (maybe "")."""
    self.tokens.append(int(token))
    text = self._tok.decode(self.tokens, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
    if hits:
      self.stopped = True
      text = text[:min(hits)]
      safe = len(text)
    else:
      safe = len(text) - self._hold(text)
    self._text = text
    delta = text[self._sent:max(safe, self._sent)]
    self._sent = max(safe, self._sent)
    return delta

  def flush(self) -> str:
    """The held-back rest, at the end of the row (no stop string found)."""
    delta = self._text[self._sent:]
    self._sent = len(self._text)
    return delta

  @property
  def text(self) -> str:
    """The whole text so far (cut before a stop string)."""
    return self._text
