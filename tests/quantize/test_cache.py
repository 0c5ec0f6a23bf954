"""The content-keyed quantization cache (anyprec_jax/quantize/cache.py) end to end.

A tiny random Llama (tests/quantize/fixtures.py) is quantized once through the
command line (in this process, tests/script_runner.py) with a named --cache_dir; the
tests then change weights, calibration text and options behind the cache's back.
"""

import pathlib
import shutil
import tempfile

import numpy as np
from absl.testing import absltest

from anyprec_jax import errors
from anyprec_jax.quantize import (CalibrationConfig, Method, QuantConfig, RunOptions,
                                  quantize_model, tensor_io)
from tests.quantize import fixtures
from tests.script_runner import run_script

BITS = ["--seed_bits=3", "--parent_bits=4", "--num_samples=4", "--seq_len=32"]
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def same_size_copy(src: pathlib.Path, dst: pathlib.Path, value: float) -> pathlib.Path:
  """A copy of `src` whose model.safetensors differs in one element of WEIGHT only
  (same file size, same header)."""
  shutil.copytree(src, dst)
  set_one_element(dst, value)
  return dst


def set_one_element(dst: pathlib.Path, value: float) -> None:
  """Sets one element of WEIGHT in dst/model.safetensors in place (same size)."""
  entry = tensor_io.read_header(dst / "model.safetensors")[WEIGHT]
  data = bytearray((dst / "model.safetensors").read_bytes())
  old = np.frombuffer(bytes(data[entry.start:entry.stop]), tensor_io.DTYPES[entry.dtype])
  new = old.copy()
  new[7] = value
  data[entry.start:entry.stop] = new.tobytes()
  (dst / "model.safetensors").write_bytes(bytes(data))


def files(directory: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


class CacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.root = pathlib.Path(cls.tmp.name)
    cls.src = fixtures.tiny_llama(cls.root / "src", dtype="bfloat16")
    cls.calib = fixtures.calibration_files(cls.root / "calib")["txt"]
    cls.cache = cls.root / "cache"
    cls.base = run_script("quantize", cls._args(cls.src, cls.root / "base", cls.calib))

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  @classmethod
  def _args(cls, src, out, calib, *extra):
    # Greedy nesting: the cache, not the nesting, is under test (the default's DP
    # compiles more on the CPU; test_pipeline runs the default end to end).
    return [f"--model={src}", f"--output_dir={out}", f"--calibration={calib}",
            f"--cache_dir={cls.cache}", "--nesting=greedy", *BITS, *extra]

  def _fisher_dirs(self):
    return sorted(self.cache.glob("fisher-*"))

  def test_base_run_through_the_cli(self):
    self.assertEqual(self.base.code, 0, self.base.stderr)
    self.assertIn("wrote", self.base.stdout)
    self.assertTrue((self.root / "base" / "config.json").exists())

  def test_same_size_nan_weights_are_rejected_not_served_from_the_cache(self):
    """The reported bug: model.safetensors replaced in place by a same-size file with a
    NaN; the old key (path, config, file names and sizes) matched, so the old output
    came back with exit 0."""
    model = shutil.copytree(self.src, self.root / "nan_model")
    out = self.root / "nan_out"
    first = run_script("quantize", self._args(model, out, self.calib))
    self.assertEqual(first.code, 0, first.stderr)
    fisher = self._fisher_dirs()
    set_one_element(model, float("nan"))
    result = run_script("quantize", self._args(model, out, self.calib))
    self.assertEqual(result.code, 1)
    self.assertRegex(result.stderr, rf"error: non-finite \(NaN/inf\) values in tensor "
                     rf"'{WEIGHT}' of {model}/model.safetensors")
    self.assertNotIn("Traceback", result.stderr)
    self.assertEqual(self._fisher_dirs(), fisher)  # rejected before any work

  def test_calibration_text_changed_in_place_recomputes_the_fisher_pass(self):
    calib = self.root / "calib_edit.txt"
    shutil.copy(self.calib, calib)
    first = run_script("quantize", self._args(self.src, self.root / "calib_a", calib))
    self.assertEqual(first.code, 0, first.stderr)
    before = self._fisher_dirs()
    # Same name, same size, other words.
    calib.write_text(" ".join(reversed(self.calib.read_text().split(" "))))
    self.assertEqual(calib.stat().st_size, self.calib.stat().st_size)
    result = run_script("quantize", self._args(self.src, self.root / "calib_b", calib))
    self.assertEqual(result.code, 0, result.stderr)
    self.assertIn("are for other weights, calibration data or dtype: computing a new one",
                  result.stderr)
    self.assertLen(self._fisher_dirs(), len(before) + 1)
    self.assertNotEqual(files(self.root / "calib_b")["model.safetensors"],
                        files(self.root / "calib_a")["model.safetensors"])

  def test_quantization_option_keeps_the_fisher_pass(self):
    before = self._fisher_dirs()
    out = self.root / "seed1"
    result = run_script("quantize", self._args(self.src, out, self.calib, "--seed=1"))
    self.assertEqual(result.code, 0, result.stderr)
    self.assertIn("cache: reusing the Fisher pass", result.stderr)
    self.assertEqual(self._fisher_dirs(), before)
    self.assertNotIn("reusing", result.stderr.split("Fisher pass")[-1])  # layers are new
    again = run_script("quantize", self._args(self.src, out, self.calib, "--seed=1"))
    self.assertIn("reusing 2 of 2 quantized layers", again.stderr)

  def test_rtn_requantizes_only_the_changed_layer(self):
    cache = self.root / "rtn_cache"
    opts = RunOptions(progress=False, cache_dir=str(cache))
    rtn = QuantConfig(2, 3, method=Method.RTN)
    calib = CalibrationConfig(dataset=str(self.calib))
    cached = lambda: {p.name: p.stat().st_mtime_ns for p in cache.glob("rtn-*/layer_*")}
    quantize_model(str(self.src), str(self.root / "rtn_a"), rtn, calib, opts)
    first = cached()
    self.assertLen(first, 2)
    # An unchanged copy under another path: everything reused.
    model = shutil.copytree(self.src, self.root / "rtn_model")
    quantize_model(str(model), str(self.root / "rtn_b"), rtn, calib, opts)
    self.assertEqual(cached(), first)
    # One element of layer 1 changed in place: layer 0 reused, layer 1 quantized again.
    set_one_element(model, 0.5)
    quantize_model(str(model), str(self.root / "rtn_b"), rtn, calib, opts)
    now = cached()
    self.assertLen(now, 3)
    self.assertEqual({n: t for n, t in now.items() if n.startswith("layer_00000")},
                     {n: t for n, t in first.items() if n.startswith("layer_00000")})
    # The result equals a fresh run on the new weights, not the old output.
    quantize_model(str(model), str(self.root / "rtn_fresh"), rtn, calib,
                   RunOptions(progress=False))
    for b in (2, 3):
      self.assertEqual(files(self.root / "rtn_b" / f"w{b}"),
                       files(self.root / "rtn_fresh" / f"w{b}"))
      self.assertNotEqual(files(self.root / "rtn_b" / f"w{b}")["model.safetensors"],
                          files(self.root / "rtn_a" / f"w{b}")["model.safetensors"])

  def test_output_checked_before_the_work(self):
    cache = self.root / "unused_cache"
    for output, pattern in (("/proc/anyprec-out", r"--output_dir=/proc/anyprec-out is not "
                             "a writable directory"),
                            (str(self.calib), "is not a writable directory: exists and "
                             "is not a directory")):
      with self.assertRaisesRegex(errors.UsageError, pattern):
        quantize_model(str(self.src), output, QuantConfig(3, 4),
                       CalibrationConfig(dataset=str(self.calib)),
                       RunOptions(progress=False, cache_dir=str(cache)))
    self.assertFalse(cache.exists())  # nothing computed, nothing left behind


if __name__ == "__main__":
  absltest.main()
