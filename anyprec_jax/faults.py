"""Deterministic fault injection, for the kill-and-resume tests.

`ANYPREC_FAULT=<point>[:<n>]` makes the process SIGKILL itself (as `kill -9` would,
no cleanup, no exception handlers) the n-th time (default: the first) it passes the
named point. The points, in the order a quantization run passes them:

  fisher  after each Fisher layer file is written (before the pass is marked complete)
  layer   after each quantized layer is written to the cache
  write   after each output shard is written (before the side files and config.json)

Unset (the normal case), `point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ANYPREC_FAULT"
POINTS = ("fisher", "layer", "write")
_passes: dict[str, int] = {}


def point(name: str) -> None:
  """Kills this process here if `ANYPREC_FAULT` names this point and pass."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  want, _, count = spec.partition(":")
  if want != name:
    return
  _passes[name] = _passes.get(name, 0) + 1
  if _passes[name] == int(count or 1):
    os.kill(os.getpid(), signal.SIGKILL)
