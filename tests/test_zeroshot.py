"""scripts/zeroshot.py (anyprec_jax/zeroshot.py): the original and every width, one table.

The "original" here is the dense 4-bit reference directory of the tiny checkpoint
(tests/synthetic_checkpoint.py), so its row must equal the checkpoint's 4-bit row.
Skips when lm_eval is not installed.
"""

import json
import pathlib
import shutil
import tempfile
import unittest

from absl.testing import absltest

from tests import synthetic_checkpoint as synth
from tests.char_tokenizer import write_char_tokenizer
from tests.script_runner import run_script

TASKS = pathlib.Path(__file__).resolve().parent / "data" / "lm_eval_tasks"


class ZeroShotScriptTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    try:
      import lm_eval  # noqa: F401
    except ImportError:
      raise unittest.SkipTest("lm_eval not installed (pip install -e .[eval])")
    self.dir, quant, dense = synth.write(seed=7)
    self.dense = synth.dense_reference_dir(quant, dense, 4)
    self.out = pathlib.Path(tempfile.mkdtemp(prefix="anyprec_zeroshot_"))
    for d in (self.dir, self.dense):
      write_char_tokenizer(d)
      self.addCleanup(shutil.rmtree, d, True)
    self.addCleanup(shutil.rmtree, self.out, True)

  def test_every_width_and_the_original_in_one_table(self):
    path = self.out / "zs.json"
    res = run_script("zeroshot", [
        f"--model={self.dense}", f"--quantized={self.dir}", "--precisions=3,4",
        "--tasks=anyprec_tiny_mc", f"--include_path={TASKS}", "--noinclude_defaults",
        "--limit=12", "--batch_size=4", f"--output_json={path}"])
    self.assertEqual(res.code, 0, res.stderr[-3000:])
    record = json.loads(path.read_text())
    rows = record["rows"]
    self.assertEqual([(r["method"], r["bits"]) for r in rows],
                     [("original", 32), ("anyprec", 3), ("anyprec", 4)])
    for r in rows:
      self.assertEqual(r["samples"], {"anyprec_tiny_mc": 12})
      self.assertSetEqual(set(r["results"]["anyprec_tiny_mc"]),
                          {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"})
    self.assertEqual(rows[0]["results"], rows[2]["results"])  # the same 4-bit weights
    table = res.stdout[res.stdout.index("zero-shot accuracy"):]
    for r in rows:
      acc = r["results"]["anyprec_tiny_mc"]["acc"]
      self.assertIn(f"| {r['method']} | {r['bits']} | {100 * acc:.2f} +- ", table)
    self.assertEqual(record["config"]["tasks"], ["anyprec_tiny_mc"])

  def test_needs_a_model(self):
    res = run_script("zeroshot", ["--tasks=anyprec_tiny_mc"])
    self.assertEqual(res.code, 2)
    self.assertIn("--model and/or --quantized", res.stderr)


if __name__ == "__main__":
  absltest.main()
