"""Build steps only; pyproject.toml holds all the metadata.

Ships `anyprec_jax_lm_eval.pth` at the root of site-packages, in the wheel and in the
editable wheel (`pip install -e .`). Its one line imports `anyprec_jax_lm_eval_hook`
(standard library only, no jax), which registers the lm_eval model `anyprec` lazily
when lm_eval loads its models: a plain `lm_eval --model anyprec` then works.

- wheel: `build_py` writes the .pth into build_lib, whose root becomes the wheel's
  root, i.e. site-packages;
- editable wheel: setuptools' `editable_wheel` puts nothing from build_lib into the
  wheel (it maps the sources with its own finder and .pth), so after it has built the
  wheel, the .pth is added to its root and to its RECORD (the wheel format, no
  setuptools internals).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "anyprec_jax_lm_eval.pth"
# A .pth line that starts with "import" is executed at start-up; a failure (e.g. the
# editable source tree moved away) must not print a traceback for every python run.
PTH_TEXT = ('import sys; exec("try:\\n import anyprec_jax_lm_eval_hook\\n'
            'except Exception:\\n pass")\n').encode()


class build_py_with_pth(build_py):
  """build_py, plus the .pth at the root of build_lib."""

  def run(self):
    super().run()
    pathlib.Path(self.build_lib).mkdir(parents=True, exist_ok=True)
    pathlib.Path(self.build_lib, PTH_NAME).write_bytes(PTH_TEXT)

  def get_outputs(self, include_bytecode=True):
    return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


def _add_to_wheel(wheel: pathlib.Path, name: str, data: bytes) -> None:
  """Rewrites `wheel` with `name` (a file at its root) added and listed in RECORD."""
  tmp = wheel.with_name(wheel.name + ".tmp")
  with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    [record] = [n for n in src.namelist()
                if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    for info in src.infolist():
      if info.filename not in (record, name):
        dst.writestr(info, src.read(info))
    info = zipfile.ZipInfo(name, date_time=src.getinfo(record).date_time)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    dst.writestr(info, data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines = [line for line in src.read(record).decode().splitlines()
             if line and not line.startswith(name + ",")]
    lines.insert(0, f"{name},sha256={digest},{len(data)}")
    dst.writestr(src.getinfo(record), "\n".join(lines) + "\n")
  os.replace(tmp, wheel)


class editable_wheel_with_pth(editable_wheel):
  """setuptools' editable wheel, plus the .pth at its root."""

  def run(self):
    super().run()
    wheels = sorted(pathlib.Path(self.dist_dir).glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
      raise RuntimeError(f"editable_wheel built no wheel in {self.dist_dir}; "
                         f"cannot add {PTH_NAME}")
    _add_to_wheel(wheels[-1], PTH_NAME, PTH_TEXT)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
