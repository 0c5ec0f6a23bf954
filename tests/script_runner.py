"""Runs a script of scripts/ in this process, as its command line would (for tests).

`run_script("quantize", ["--model=..."])` loads `scripts/quantize.py` as a fresh module,
runs `cli.run(main, argv)` with stdout and stderr captured, and returns the exit code
and both texts. The script's absl flags are removed again afterwards, so scripts that
define flags of the same name (every script has --model) can run one after another in
one test process. An exception escaping `cli.run` (what would print a traceback on
the command line) propagates to the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
from unittest import mock

from absl import app, flags, logging

from anyprec_jax import cli
from tests.shared_data import REPO

app.define_help_flags()  # absl's own flags exist before any script's (kept across runs)


@dataclasses.dataclass(frozen=True)
class ScriptResult:
  code: int
  stdout: str
  stderr: str


def run_script(name: str, args: list[str], env: dict[str, str] | None = None
               ) -> ScriptResult:
  """Runs scripts/<name>.py with `args`; returns exit code, stdout and stderr."""
  path = REPO / "scripts" / f"{name}.py"
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
  module = importlib.util.module_from_spec(spec)
  out, err = io.StringIO(), io.StringIO()
  code = 0
  verbosity = logging.get_verbosity()
  try:
    spec.loader.exec_module(module)  # defines the script's flags
    with (mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err)):
      try:
        cli.run(module.main, [str(path), *args])
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)
  return ScriptResult(code, out.getvalue(), err.getvalue())
