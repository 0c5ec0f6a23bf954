"""The project's error types: what a user can fix, as opposed to bugs.

Every error a user can cause (a bad file, a bad argument, a full disk) is raised as an
`AnyPrecError` whose message is one line naming the file, tensor or flag and saying
what to do. The scripts (`cli.run`) print that line and exit with `exit_code`; any
other exception is a bug and keeps its traceback.

    AnyPrecError
      BadInputError (ValueError)     exit 1  unreadable / inconsistent input files or data
        MissingInputError (FileNotFoundError)  an input that does not exist
      UsageError (ValueError)        exit 2  bad arguments (flag values, API arguments)
      OutputError (OSError-like)     exit 1  the output cannot be written (disk full, ...)

The subclasses also derive from the builtin type callers caught before this module
existed (ValueError, FileNotFoundError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class AnyPrecError(Exception):
  """An error the user can fix; `str(e)` is one line.

  Attributes:
    hint: optional advice, printed after the message ("what to do").
  """
  exit_code = 1

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(" ".join(str(message).split()))  # always one line
    self.hint = hint


class BadInputError(AnyPrecError, ValueError):
  """An input file or its data is unreadable or inconsistent (exit code 1)."""


class MissingInputError(BadInputError, FileNotFoundError):
  """An input file or directory does not exist (exit code 1)."""


class UsageError(AnyPrecError, ValueError):
  """A bad argument: a flag value or an API argument (exit code 2)."""
  exit_code = 2


class OutputError(AnyPrecError):
  """An output file cannot be written: disk full, read-only, not a directory (exit 1)."""
