"""Fault injection through the command line: every bad input is one line, no traceback.

Each case runs a script of scripts/ in this process (tests/script_runner.py, the same
`cli.run` as the command line) on a damaged copy of a tiny model or checkpoint, and
checks the exit code (1: bad data / unwritable output, 2: usage), that the one error
line names the file, tensor or flag, that no traceback escapes, and that nothing was
computed first. One case runs the real command line in a subprocess. The kill -9 /
resume cases are in tests/quantize/test_resume.py, the cache cases in
tests/quantize/test_cache.py.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax.quantize import tensor_io
from anyprec_jax.quantize.tensor_io import OutTensor
from tests import synthetic_checkpoint as synth
from tests.quantize import fixtures
from tests.quantize.test_cache import WEIGHT, set_one_element
from tests.quantize.test_tensor_io import damaged_copies
from tests.script_runner import run_script
from tests.shared_data import REPO

_ROOT: pathlib.Path
_tmp: tempfile.TemporaryDirectory


def setUpModule():
  global _ROOT, _tmp
  _tmp = tempfile.TemporaryDirectory()
  _ROOT = pathlib.Path(_tmp.name)
  fixtures.tiny_llama(_ROOT / "src", dtype="bfloat16")
  fixtures.calibration_files(_ROOT / "calib")
  synth.write(_ROOT / "anyprec")


def tearDownModule():
  _tmp.cleanup()


def _variant(base: str, name: str, edit) -> pathlib.Path:
  """A copy of `_ROOT/base` changed by `edit(directory)`."""
  out = _ROOT / name
  if not out.exists():
    shutil.copytree(_ROOT / base, out)
    edit(out)
  return out


def _damaged(case: str):
  def edit(d):
    scratch = d / "scratch"
    scratch.mkdir()
    bad = damaged_copies(d / "model.safetensors", scratch)[case]
    shutil.move(bad, d / "model.safetensors")
    shutil.rmtree(scratch)
  return edit


_DELETE = object()


def _config(**changes):
  def edit(d):
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
      if value is _DELETE:
        del cfg[key]
      elif isinstance(value, dict):
        cfg[key].update(value)
      else:
        cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
  return edit


def _tensors(fn):
  """Rewrites model.safetensors with fn({name: array}) applied."""
  def edit(d):
    index = tensor_io.TensorIndex([d / "model.safetensors"])
    arrays = {n: index.array(n).copy() for n in index.names()}
    fn(arrays)
    tensor_io.write_safetensors(d / "model.safetensors",
                                [OutTensor.of_array(n, a) for n, a in arrays.items()])
  return edit


def _shape(arrays):
  arrays[WEIGHT] = np.ascontiguousarray(arrays[WEIGHT].T)


def _writable(directory: pathlib.Path) -> bool:
  try:
    tensor_io.check_writable_dir(directory)
  except OSError:
    return False
  return True


class _Base(parameterized.TestCase):

  def assert_fails(self, result, code: int, pattern: str):
    """Exit `code`, exactly one error line matching `pattern`, no traceback."""
    self.assertEqual(result.code, code, result.stderr)
    self.assertNotIn("Traceback", result.stderr)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    self.assertLen(lines, 1, result.stderr)
    self.assertRegex(lines[0], pattern)
    if code == 1:
      self.assertEqual(result.stderr.splitlines()[-1], lines[0])


class QuantizeFaultsTest(_Base):

  def _quantize(self, src, *flags, calibration="calib/calib.txt", cache="cache"):
    cache_dir = _ROOT / f"{cache}-{self._testMethodName}"
    result = run_script("quantize", [
        f"--model={src}", f"--output_dir={_ROOT / ('out-' + self._testMethodName)}",
        f"--calibration={_ROOT / calibration}", f"--cache_dir={cache_dir}",
        "--seed_bits=2", "--parent_bits=3", "--num_samples=2", "--seq_len=16",
        "--nesting=greedy", *flags])  # faults are under test, not the nesting
    # Nothing was computed before the error.
    self.assertEqual(list(cache_dir.glob("*/*.safetensors")), [])
    return result

  @parameterized.named_parameters(
      ("truncated", "truncated", r"/truncated/model\.safetensors: tensor '.*' ends at byte "
       r"\d+ of the data, but the file holds only \d+ data bytes \(truncated\?\)"),
      ("garbage_header", "garbage_header", r"/garbage_header/model\.safetensors: header "
       r"length \d+ exceeds the file size \d+"),
      ("garbage_json", "garbage_json", r"/garbage_json/model\.safetensors: the header is "
       r"not valid JSON"),
  )
  def test_damaged_safetensors(self, case, pattern):
    src = _variant("src", case, _damaged(case))
    self.assert_fails(self._quantize(src), 1, r"quantize\.py: error: .*" + pattern)

  @parameterized.named_parameters(
      ("invalid_json", "bad_json", lambda d: (d / "config.json").write_text("{'hidden':"),
       r"/bad_json/config\.json is not valid JSON \(Expecting property name"),
      ("unknown_model_type", "gpt_neox", _config(model_type="gpt_neox"),
       r"cannot quantize .*/gpt_neox: .*/gpt_neox/config\.json: unsupported model_type "
       r"'gpt_neox'; supported: llama, mistral, opt"),
      ("missing_field", "no_hidden", _config(hidden_size=_DELETE),
       r"cannot quantize .*/no_hidden: .*/no_hidden/config\.json: missing field "
       "'hidden_size'"),
      ("missing_tensor", "no_down",
       _tensors(lambda a: a.pop(WEIGHT)),
       rf"missing keys in checkpoint .*/no_down: {WEIGHT}"),
      ("wrong_shape", "transposed", _tensors(_shape),
       rf"key '{WEIGHT}' in .*/transposed/model\.safetensors has shape \(96, 64\), "
       r"expected \(64, 96\)"),
      ("nan_weight", "nan", lambda d: set_one_element(d, float("nan")),
       rf"non-finite \(NaN/inf\) values in tensor '{WEIGHT}' of .*/nan/model\.safetensors"),
  )
  def test_bad_model(self, name, edit, pattern):
    src = _variant("src", name, edit)
    self.assert_fails(self._quantize(src), 1, pattern)

  def test_bad_calibration(self):
    (_ROOT / "calib" / "empty.jsonl").write_text("")
    src = _ROOT / "src"
    cases = (
        ("calib/missing.jsonl", [], 1, r"calibration dataset '.*/calib/missing\.jsonl' is "
         r"neither 'c4', 'wikitext2' nor an existing local file \(--calibration\)"),
        ("calib/empty.jsonl", [], 1, r"calibration file .*/calib/empty\.jsonl is empty"),
        ("calib/calib.jsonl", ["--seq_len=5000"], 1,
         r"calibration .*/calib/calib\.jsonl: only 0 of 20 documents have >= 5000 tokens; "
         r"2 needed \(lower --num_samples or --seq_len"),
        ("calib/calib.txt", ["--seq_len=5000"], 1,
         r"calibration .*/calib\.txt: the text has \d+ tokens < seq_len 5000 \(lower "
         "--seq_len"),
        ("calib/calib.csv", [], 2, r"unsupported calibration file .*calib\.csv"),
    )
    (_ROOT / "calib" / "calib.csv").write_text("a,b\n")
    for calibration, flags, code, pattern in cases:
      with self.subTest(calibration=calibration, flags=flags):
        self.assert_fails(self._quantize(src, *flags, calibration=calibration), code,
                          pattern)

  def test_bad_flags(self):
    self.assert_fails(self._quantize(_ROOT / "src", "--seed_bits=5", "--parent_bits=4"), 2,
                      r"seed_bits \(5\) must be <= parent_bits \(4\)")
    self.assert_fails(self._quantize(_ROOT / "src", "--dtype=float64"), 2, "--dtype")

  def test_unwritable_outputs_are_found_before_the_work(self):
    src = _ROOT / "src"
    (_ROOT / "a_file").write_text("x")
    unwritable = _ROOT / "read_only"
    unwritable.mkdir(exist_ok=True)
    unwritable.chmod(0o555)
    self.addCleanup(unwritable.chmod, 0o755)
    if _writable(unwritable):  # root: permissions do not stop it, /sys does
      unwritable = pathlib.Path("/sys/kernel")
    cases = [("--output_dir=/proc/foo", r"--output_dir=/proc/foo is not a writable "
              "directory: No such file or directory; choose another one"),
             (f"--output_dir={_ROOT / 'a_file'}", r"--output_dir=.*/a_file is not a "
              "writable directory: exists and is not a directory"),
             (f"--cache_dir={unwritable}/cache", rf"--cache_dir={unwritable}/cache is "
              "not a writable directory"),
             (f"--output_dir={src}", r"--output_dir=.*/src is the source model's "
              "directory; choose another one")]
    if unwritable.is_dir() and not _writable(unwritable):
      cases.append((f"--output_dir={unwritable}", rf"--output_dir={unwritable} is not a "
                    "writable directory: Permission denied"))
    else:
      self.skipTest(f"no unwritable directory to test with ({unwritable} is writable)")
    for flag, pattern in cases:
      with self.subTest(flag=flag):
        self.assert_fails(self._quantize(src, flag), 2, pattern)

  def test_full_disk(self):
    out = _ROOT / "full_disk"
    (out / "w2").mkdir(parents=True)
    # The temporary name the writer opens (same process id) is /dev/full: ENOSPC.
    (out / "w2" / f".model.safetensors.tmp{os.getpid()}").symlink_to("/dev/full")
    result = run_script("quantize", [f"--model={_ROOT / 'src'}", f"--output_dir={out}",
                                     "--method=rtn", "--seed_bits=2", "--parent_bits=2"])
    self.assert_fails(result, 1, r"cannot write .*/full_disk/w2/model\.safetensors: No "
                      r"space left on device \(free some space")

  def test_real_command_line(self):
    """The same through `python scripts/quantize.py` (one subprocess)."""
    src = _variant("src", "garbage_header", _damaged("garbage_header"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "quantize.py"), f"--model={src}",
         f"--output_dir={_ROOT / 'cli_out'}", "--method=rtn"],
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 1)
    self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
    self.assertRegex(proc.stderr, r"^quantize\.py: error: .*/garbage_header/model\."
                     r"safetensors: header length \d+ exceeds the file size")


class LoadFaultsTest(_Base):

  def test_invalid_anyprec_section(self):
    """seed_bits > parent_bits is an invalid checkpoint, not 'supported: []'."""
    bad = _variant("anyprec", "seed_gt_parent",
                   _config(anyprec={"seed_bits": 6, "parent_bits": 4}))
    result = run_script("generate", [f"--model={bad}", "--precision=4"])
    self.assert_fails(result, 1, r"invalid checkpoint: config\.json in .*/seed_gt_parent: "
                      r"anyprec\.seed_bits \(6\) > parent_bits \(4\)")
    self.assertNotIn("supported", result.stderr)

  @parameterized.parameters("truncated", "garbage_header", "garbage_json")
  def test_damaged_checkpoint(self, case):
    bad = _variant("anyprec", f"anyprec_{case}", _damaged(case))
    result = run_script("generate", [f"--model={bad}"])
    self.assert_fails(result, 1, rf"/anyprec_{case}/model\.safetensors: not a readable "
                      r"safetensors file \(.*\) \(the file is damaged")
    self.assertNotIn("memory", result.stderr.lower())

  def test_bad_arguments(self):
    model = _ROOT / "anyprec"
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=9"]), 2,
                      r"precision\(s\) \[9\] not supported by this checkpoint; supported: "
                      r"\[3, 4, 5, 6, 7, 8\]")
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=four"]), 2,
                      r"--precision=four")
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=2.5"]), 2,
                      r"precision 2\.5 is below the seed \(3 bits\)")
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=3.5"]), 2,
                      r"precision 3\.5: the checkpoint .* has no stored allocation")
    self.assert_fails(run_script("evaluate", [f"--quantized={model}", "--precisions=3,x"]),
                      2, r"--precisions must be a comma-separated list of numbers")
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=4",
                                              "--draft_precision=5"]), 2,
                      r"draft_precision \(5\) must be below the target precision \(4\)")
    self.assert_fails(run_script("generate", [f"--model={model}", "--precision=8",
                                              "--draft_precision=3", "--num_draft=9"]), 2,
                      r"num_draft")
    bad = _variant("src", "bad_json", lambda d: (d / "config.json").write_text("{'x':"))
    self.assert_fails(run_script("generate", [f"--model={bad}"]), 1,
                      r"/bad_json/config\.json is not valid JSON")


if __name__ == "__main__":
  absltest.main()
