"""Makes a plain `lm_eval --model anyprec ...` find the model `anyprec`.

lm_eval 0.4.13 discovers no third-party models (no entry-point group): its registry
knows the names that `lm_eval.models` registers, as lazy "module:object" strings,
when that package is first imported. anyprec-jax installs `anyprec_jax_lm_eval.pth`
into site-packages (setup.py puts it in the wheel and in the editable wheel); at
every interpreter start-up its one line imports this module, which only puts a
finder at the front of `sys.meta_path`. The finder ignores every import except
`lm_eval.models`; once that package has run, `register()` adds

    model_registry.register("anyprec", target="anyprec_jax.lm_eval_adapter:AnyPrecLM")

beside lm_eval's own models: a string, so neither jax nor the adapter is imported
until lm_eval looks the name up (`get_model("anyprec")`). The adapter's own
`@register_model("anyprec")` later replaces the string with the class (lm_eval's
registry allows that upgrade when the string names that class).

Why `lm_eval.models` and not `lm_eval.api.registry`: `get_model` imports
`lm_eval.models` only while the registry is empty, so a name registered as soon as
the registry exists would hide every built-in model (`--model hf` would fail).

Costs nothing measurable when lm_eval is not used, and fails silently (no
registration) when lm_eval is absent or its registry API differs. Standard library
only; keep it that way (it is imported by every Python process of the environment).
"""

import _thread  # built in; `threading` would cost ~4 ms of start-up
import sys

ALIAS = "anyprec"
TARGET = "anyprec_jax.lm_eval_adapter:AnyPrecLM"
WATCHED = "lm_eval.models"


def register(registry=None) -> bool:
  """Registers `ALIAS` as the lazy placeholder `TARGET` unless the name is taken.

  Args:
    registry: lm_eval's model registry; None: `lm_eval.api.registry.model_registry`.

  Returns:
    True when the name is registered afterwards (by this call or before it), False
    when lm_eval is missing or its registry does not work as 0.4.13's does.
  """
  try:
    if registry is None:
      from lm_eval.api.registry import model_registry as registry
    if ALIAS not in registry:
      registry.register(ALIAS, target=TARGET)
    return ALIAS in registry
  except Exception:  # noqa: BLE001  (any lm_eval without this API: no registration)
    return False


class _Loader:
  """Runs the real loader of `lm_eval.models`, then `register()`; any other loader
  attribute (resource readers, `get_source`, ...) is the real loader's."""

  def __init__(self, loader):
    self._loader = loader

  def __getattr__(self, name):
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    try:
      self._loader.exec_module(module)
    finally:  # the module keeps its own loader, as if this one had never been here
      module.__loader__ = self._loader
      spec = getattr(module, "__spec__", None)
      if spec is not None and spec.loader is self:
        spec.loader = self._loader
    register()


class _Finder:
  """A `sys.meta_path` finder that wraps the loader of `lm_eval.models` only."""

  def __init__(self):
    self._busy = set()  # threads inside find_spec (a finder below may ask us again)

  def find_spec(self, fullname, path=None, target=None):
    if fullname != WATCHED:
      return None
    me = _thread.get_ident()
    if me in self._busy:
      return None
    self._busy.add(me)
    try:
      spec = None
      for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if finder is self or find is None:
          continue
        spec = find(fullname, path, target)
        if spec is not None:
          break
    except Exception:  # noqa: BLE001  (let the import system report it itself)
      return None
    finally:
      self._busy.discard(me)
    if spec is None or not hasattr(spec.loader, "exec_module"):
      return None
    spec.loader = _Loader(spec.loader)
    return spec


def install() -> None:
  """Puts one `_Finder` at the front of `sys.meta_path` (once per process)."""
  if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
  if WATCHED in sys.modules:  # installed late: lm_eval's models are registered already
    register()


try:
  install()
except Exception:  # noqa: BLE001  (never break interpreter start-up)
  pass
