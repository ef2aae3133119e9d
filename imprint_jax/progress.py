"""Progress bars on a terminal, plain log lines elsewhere.

A tqdm bar redraws itself with carriage returns: fine on a terminal, one endless line in a log
file (`imprint-jax train > log`, a TPU worker's nohup output). `bar()` returns a tqdm bar when
its stream is a terminal; otherwise the same bar writes each refresh as its own line, at most
every `mininterval` seconds (30 by default), and its final state when it closes.
"""

from __future__ import annotations

import io
import sys
from typing import Any


class _Lines(io.TextIOBase):
  """A text stream that turns tqdm's carriage-return redraws into newline-ended lines."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> int:
    for part in text.replace("\r", "\n").split("\n"):
      part = part.strip()
      if part:
        self.stream.write(part + "\n")
    return len(text)

  def flush(self) -> None:
    self.stream.flush()


def is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def bar(iterable=None, *, file=None, **kw: Any):
  """tqdm(iterable, **kw) on `file` (default stderr): a bar on a terminal, lines elsewhere."""
  from tqdm import tqdm  # on first use: most commands never draw a bar
  stream = sys.stderr if file is None else file
  if is_terminal(stream):
    return tqdm(iterable, file=stream, **kw)
  kw.setdefault("mininterval", 30.0)
  kw.pop("dynamic_ncols", None)
  return tqdm(iterable, file=_Lines(stream), ncols=100, **kw)
