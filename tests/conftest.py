"""pytest session setup: one temporary root for the whole suite, removed at the end.

Tests and their helpers (`synthetic_checkpoint.dense_reference_dir`, scripts run in a
subprocess) make directories with `tempfile.mkdtemp` and leave them; every such call
now lands under this root (`tempfile.tempdir` in process, `TMPDIR` for subprocesses),
so a run leaves nothing behind in /tmp.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_ROOT: str | None = None
_SAVED_TMPDIR: str | None = None


def pytest_configure(config):
  del config
  global _ROOT, _SAVED_TMPDIR
  _ROOT = tempfile.mkdtemp(prefix="anyprec_tests_")
  _SAVED_TMPDIR = os.environ.get("TMPDIR")
  os.environ["TMPDIR"] = _ROOT
  tempfile.tempdir = _ROOT


def pytest_unconfigure(config):
  del config
  tempfile.tempdir = None
  if _SAVED_TMPDIR is None:
    os.environ.pop("TMPDIR", None)
  else:
    os.environ["TMPDIR"] = _SAVED_TMPDIR
  if _ROOT:
    shutil.rmtree(_ROOT, ignore_errors=True)
