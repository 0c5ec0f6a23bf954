"""What the command-line scripts share: a quiet start-up and one-line errors.

`run(main)` replaces `absl.app.run(main)`: it silences start-up noise that is not the
user's concern (JAX's "Unable to initialize backend 'tpu'" on machines without one,
transformers' "PyTorch was not found"), and turns the errors a user can fix into one
line on stderr instead of a traceback:
- usage errors (bad flag values, `app.UsageError`, `errors.UsageError`): the message
  plus a pointer to --help, exit code 2;
- bad input and unwritable output (`errors.AnyPrecError`, `OSError`): the message,
  naming the file / tensor / flag and what to do, exit code 1.
Any other exception is a bug and keeps its traceback. `--verbosity=1` or the
environment variable `ANYPREC_TRACEBACK=1` prints the traceback of every error.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback


def quiet_startup() -> None:
  """Silences start-up messages of JAX and transformers (call before importing them)."""
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  for name in ("jax._src.xla_bridge", "jax._src.cloud_tpu_init"):
    logging.getLogger(name).setLevel(logging.WARNING)


TRACEBACK_ENV = "ANYPREC_TRACEBACK"


def _want_traceback() -> bool:
  from absl import flags
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  return "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].value >= 1


def _fail(prog: str, message: str, code: int, hint: str | None = None,
          show_traceback: bool = False) -> None:
  if show_traceback:
    traceback.print_exc()
  line = f"{prog}: error: {message}" + (f" ({hint})" if hint else "")
  if code == 2:
    line += f"\n(run {prog} --help for the flags)"
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def _os_message(e: OSError) -> str:
  if e.filename is None:
    return str(e)
  return f"{e.filename}: {e.strerror or e}"


def run(main, argv: list[str] | None = None) -> None:
  """`absl.app.run(main)` with `quiet_startup` and one-line errors (module docstring).

  Args:
    main: the script's main(argv).
    argv: command line including the program name; None: `sys.argv`.
  """
  quiet_startup()
  from absl import app, flags  # noqa: PLC0415 (after quiet_startup)
  from anyprec_jax import errors  # noqa: PLC0415
  argv = list(sys.argv if argv is None else argv)
  prog = os.path.basename(argv[0])

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      _fail(prog, str(e), 2)

  def wrapped(args):
    try:
      return main(args)
    except app.UsageError as e:
      _fail(prog, str(e), 2, show_traceback=_want_traceback())
    except errors.AnyPrecError as e:
      _fail(prog, str(e), e.exit_code, e.hint, _want_traceback())
    except OSError as e:  # the environment (permissions, disk), not a bug
      _fail(prog, _os_message(e), 1, show_traceback=_want_traceback())

  app.run(wrapped, argv=argv, flags_parser=parse)


def parse_precisions(values, flag: str) -> list:
  """A list flag's texts as precisions ("4" -> 4, "3.5" -> 3.5; `weight.as_precision`).

  Raises:
    errors.UsageError: a value that is not a number, naming `flag`.
  """
  from anyprec_jax import errors, weight  # noqa: PLC0415
  out = []
  for text in values:
    try:
      value = int(text)
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        raise errors.UsageError(
            f"{flag} must be a comma-separated list of numbers (bits, e.g. 3,3.5,4), "
            f"got {','.join(values)!r}") from None
    out.append(weight.as_precision(value, flag))
  return out


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
