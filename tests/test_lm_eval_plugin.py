"""The start-up hook that lets a plain `lm_eval --model anyprec` find the model
(anyprec_jax_lm_eval_hook.py, shipped as anyprec_jax_lm_eval.pth by setup.py).

`RegisterTest` and `NoLmEvalTest` need no installed .pth: they import the hook module
by hand, in this process or in a fresh interpreter. `InstalledTest` checks the
installed .pth in a bare interpreter (skipped where it is not installed); the real
`lm_eval` command line through it is `LmEvalAdapterTest.test_plain_lm_eval_command`.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import unittest
from unittest import mock

from absl.testing import absltest

import anyprec_jax_lm_eval_hook as hook

REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

# Run in a fresh interpreter (cwd: the repository): the hook installed by hand as the
# .pth would, then lm_eval used the way its CLI does. Prints one JSON line.
FRESH_PROCESS = """
import json, sys
import anyprec_jax_lm_eval_hook as hook
from lm_eval.api import registry
out = {"after_registry_import": len(registry.model_registry)}
out["dummy"] = registry.get_model("dummy").__name__  # lm_eval's own models still load
out["anyprec"] = registry.model_registry._objs.get("anyprec")
out["jax_imported"] = "jax" in sys.modules
import lm_eval.models
out["loader_restored"] = type(lm_eval.models.__spec__.loader).__module__ != hook.__name__
out["class"] = registry.get_model("anyprec").__qualname__
out["jax_imported_after_get"] = "jax" in sys.modules
print(json.dumps(out))
"""


def run_fresh(code: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


class RegisterTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not HAVE_LM_EVAL:
      self.skipTest("lm_eval not installed (pip install -e .[eval])")

  def registry(self):
    from lm_eval.api.registry import Registry
    return Registry("model")

  def test_registers_a_lazy_placeholder_once(self):
    reg = self.registry()
    self.assertTrue(hook.register(reg))
    self.assertEqual(reg._objs["anyprec"], hook.TARGET)  # a string: nothing imported
    self.assertTrue(hook.register(reg))  # again: no error, unchanged
    self.assertEqual(reg._objs["anyprec"], hook.TARGET)

  def test_adapter_class_replaces_the_placeholder(self):
    """The adapter's own @register_model("anyprec") after the hook (the usual order)
    and the hook after it (a late import) both leave the class registered."""
    from anyprec_jax.lm_eval_adapter import AnyPrecLM
    self.assertEqual(hook.TARGET, f"{AnyPrecLM.__module__}:{AnyPrecLM.__qualname__}")
    reg = self.registry()
    hook.register(reg)
    reg.register("anyprec")(AnyPrecLM)
    self.assertIs(reg.get("anyprec"), AnyPrecLM)
    self.assertTrue(hook.register(reg))
    self.assertIs(reg.get("anyprec"), AnyPrecLM)

  def test_a_name_taken_by_another_model_is_left_alone(self):
    reg = self.registry()
    reg.register("anyprec", target="someone.else:Model")
    self.assertTrue(hook.register(reg))
    self.assertEqual(reg._objs["anyprec"], "someone.else:Model")

  def test_fails_silently(self):
    self.assertFalse(hook.register(object()))  # a registry of another API
    with mock.patch.dict(sys.modules, {"lm_eval.api.registry": None}):  # no lm_eval
      self.assertFalse(hook.register())

  def test_in_a_fresh_interpreter(self):
    """Nothing registered before lm_eval.models loads (get_model still imports it, so
    its own models stay), `anyprec` registered with it, no jax until looked up, and
    lm_eval.models keeps its own loader."""
    out = run_fresh(FRESH_PROCESS)
    self.assertEqual(out["after_registry_import"], 0)
    self.assertEqual(out["dummy"], "DummyLM")
    self.assertEqual(out["anyprec"], hook.TARGET)
    self.assertFalse(out["jax_imported"])
    self.assertTrue(out["loader_restored"])
    self.assertEqual(out["class"], "AnyPrecLM")
    self.assertTrue(out["jax_imported_after_get"])


class NoLmEvalTest(absltest.TestCase):

  def test_start_up_without_lm_eval(self):
    """With lm_eval unimportable the hook imports nothing and registers nothing."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import anyprec_jax_lm_eval_hook as hook, json\n"
            "print(json.dumps([hook.register(), 'jax' in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('lm_eval') and sys.modules[m])]))")
    self.assertEqual(run_fresh(code), [False, False, []])


class InstalledTest(absltest.TestCase):

  def test_pth_imports_nothing_heavy(self):
    """A bare interpreter start with the hook: no lm_eval, no jax (the .pth runs in
    every Python process of the environment)."""
    if not hook_active():
      self.skipTest(SKIP_REASON)
    code = ("import sys, json; print(json.dumps([m for m in ('lm_eval', 'jax', "
            "'anyprec_jax') if m in sys.modules]))")
    self.assertEqual(run_bare(code), [])

  def test_lm_eval_finds_anyprec(self):
    """What `lm_eval --model anyprec` does first, in a bare interpreter: lm_eval's own
    `get_model`, with no import of ours, finds the adapter (and still its own models).
    Cheap; `LmEvalAdapterTest.test_plain_lm_eval_command` runs the whole command."""
    if not HAVE_LM_EVAL:
      self.skipTest("lm_eval not installed (pip install -e .[eval])")
    if not hook_active():
      self.skipTest(SKIP_REASON)
    code = ("import sys, json\n"
            "from lm_eval.api.registry import get_model\n"
            "out = [get_model('dummy').__name__, 'jax' in sys.modules]\n"
            "cls = get_model('anyprec')\n"
            "print(json.dumps(out + [f'{cls.__module__}:{cls.__qualname__}']))")
    self.assertEqual(run_bare(code), ["DummyLM", False, hook.TARGET])


SKIP_REASON = ("anyprec_jax_lm_eval.pth is not installed in this environment (an install "
               "older than the hook?); `pip install -e .[eval]` installs it")


def run_bare(code: str):
  """`code` in a fresh interpreter outside the repository (nothing of it on the path
  but what is installed); its last stdout line, as JSON."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env,
                        capture_output=True, text=True, timeout=60, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


_ACTIVE = []


def hook_active() -> bool:
  """Whether a fresh interpreter of this environment runs the .pth (i.e. has imported
  the hook before any code of its own). Importing the hook here proves nothing: the
  import installs it."""
  if not _ACTIVE:
    _ACTIVE.append(run_bare(f"import sys; print(int({hook.__name__!r} in sys.modules))") == 1)
  return _ACTIVE[0]


if __name__ == "__main__":
  unittest.main()
