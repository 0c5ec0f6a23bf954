"""Tests of the scripts' error handling (anyprec_jax/cli.py)."""

import contextlib
import errno
import io
import os
from unittest import mock

from absl import flags, logging
from absl.testing import absltest, parameterized

from anyprec_jax import cli, errors


def _run(main, *args, env=None):
  """(exit code, stderr) of `cli.run(main)` with the command line `prog *args`."""
  err = io.StringIO()
  verbosity = logging.get_verbosity()
  with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stderr(err):
    try:
      cli.run(main, ["prog.py", *args])
      code = 0
    except SystemExit as e:
      code = 0 if e.code is None else e.code
    finally:
      flags.FLAGS.unparse_flags()
      logging.set_verbosity(verbosity)
  return code, err.getvalue()


def _raiser(exc):
  def main(argv):
    del argv
    raise exc
  return main


class CliTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("bad_input", errors.BadInputError("model.safetensors: truncated", hint="re-copy it"),
       1, "prog.py: error: model.safetensors: truncated (re-copy it)\n"),
      ("missing", errors.MissingInputError("no /x/config.json"), 1,
       "prog.py: error: no /x/config.json\n"),
      ("usage", errors.UsageError("--precision must be an int"), 2,
       "prog.py: error: --precision must be an int\n(run prog.py --help for the flags)\n"),
      ("output", errors.OutputError("cannot write /o/x: No space left on device"), 1,
       "prog.py: error: cannot write /o/x: No space left on device\n"),
      ("os_error", PermissionError(errno.EACCES, "Permission denied", "/ro/f"), 1,
       "prog.py: error: /ro/f: Permission denied\n"),
  )
  def test_known_errors_are_one_line(self, exc, code, want):
    self.assertEqual(_run(_raiser(exc)), (code, want))

  def test_multi_line_messages_are_joined(self):
    self.assertEqual(str(errors.BadInputError("a\n  b")), "a b")

  def test_traceback_on_request(self):
    for env, args in (({cli.TRACEBACK_ENV: "1"}, ()), ({}, ("--verbosity=1",))):
      code, err = _run(_raiser(errors.BadInputError("bad file")), *args, env=env)
      self.assertEqual(code, 1)
      self.assertIn("Traceback (most recent call last)", err)
      self.assertTrue(err.endswith("prog.py: error: bad file\n"))

  def test_bugs_keep_their_traceback(self):
    with self.assertRaisesRegex(RuntimeError, "a bug"):
      _run(_raiser(RuntimeError("a bug")))
    with self.assertRaises(ValueError):  # a plain ValueError is not a user error
      _run(_raiser(ValueError("internal")))

  def test_flag_errors_are_usage_errors(self):
    code, err = _run(lambda argv: None, "--no_such_flag=1")
    self.assertEqual(code, 2)
    self.assertLen(err.splitlines(), 2)
    self.assertIn("no_such_flag", err)


if __name__ == "__main__":
  absltest.main()
