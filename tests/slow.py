"""The `slow` marker: end-to-end cases left out of the default run (issue 12).

`python3 -m pytest -q tests` skips them (the default run stays under 10 minutes on 2
idle cores; CI's `.ci/run` runs this default); `ANYPREC_ALL_TESTS=1 python3 -m pytest
-q tests` runs everything. Each one repeats, end to end, what faster cases already check piece
by piece; the README lists them.
"""

from __future__ import annotations

import os
import unittest

ENV = "ANYPREC_ALL_TESTS"


def enabled() -> bool:
  return os.environ.get(ENV, "").strip() not in ("", "0")


def slow(reason: str):
  """Decorator for a test method or class: skipped unless ANYPREC_ALL_TESTS=1."""
  return unittest.skipUnless(enabled(), f"slow ({reason}); set {ENV}=1 to run")
