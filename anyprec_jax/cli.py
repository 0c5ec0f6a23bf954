"""What the command-line scripts share: a quiet start-up and one-line usage errors.

`run(main)` replaces `absl.app.run(main)`: it silences start-up noise that is not the
user's concern (JAX's "Unable to initialize backend 'tpu'" on machines without one,
transformers' "PyTorch was not found"), and prints a usage error as one line on stderr
(plus a pointer to --help) with exit code 2, instead of the whole flag list first.
"""

from __future__ import annotations

import logging
import os
import sys


def quiet_startup() -> None:
  """Silences start-up messages of JAX and transformers (call before importing them)."""
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  for name in ("jax._src.xla_bridge", "jax._src.cloud_tpu_init"):
    logging.getLogger(name).setLevel(logging.WARNING)


def run(main) -> None:
  """`absl.app.run(main)` with `quiet_startup` and one-line usage errors."""
  quiet_startup()
  from absl import app

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      prog = os.path.basename(sys.argv[0])
      print(f"{prog}: error: {e}\n(run {prog} --help for the flags)", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)


def dir_size(path) -> int:
  """Bytes of the regular files under `path`."""
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      if os.path.isfile(p) and not os.path.islink(p):
        total += os.path.getsize(p)
  return total


def human_bytes(n: float) -> str:
  """1536 -> '1.5 KB' (binary units, B up to GB)."""
  for unit in ("B", "KB", "MB"):
    if n < 1024:
      return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GB"
