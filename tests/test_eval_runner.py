"""eval_runner: the straight-line rows of fractional precisions and their paired report."""

from __future__ import annotations

import math

import numpy as np
from absl.testing import absltest

from anyprec_jax import eval_runner


def _row(method, bits, nll, sha="abc"):
  return {"model": "m", "method": method, "bits": bits,
          "results": {"wt": {"ppl": math.exp(np.mean(nll)), "mean_nll": float(np.mean(nll)),
                             "chunk_nll": list(nll), "chunks_sha1": sha}}}


class InterpolatedRowsTest(absltest.TestCase):

  def test_per_chunk_straight_line_and_paired_against_it(self):
    rows = [_row("anyprec", 3, [4.0, 5.0, 6.0]), _row("anyprec", 4, [2.0, 3.0, 2.0]),
            _row("anyprec", 3.25, [3.0, 4.0, 4.0]), _row("anyprec", 4.5, [1.0, 1.0, 1.0]),
            _row("anyprec-random", 3.25, [3.9, 4.6, 5.0])]
    line = eval_runner.interpolated_rows(rows, ["wt"])
    self.assertLen(line, 1)  # 4.5 has no 5-bit neighbour; other methods are not lines
    self.assertEqual((line[0]["method"], line[0]["bits"]), ("interpolated", 3.25))
    np.testing.assert_allclose(line[0]["results"]["wt"]["chunk_nll"], [3.5, 4.5, 5.0])
    self.assertAlmostEqual(line[0]["results"]["wt"]["ppl"], math.exp(13 / 3))
    paired = {p["method"]: p["paired"]["wt"] for p in
              eval_runner.paired_rows(rows + line, ["wt"], "interpolated")}
    self.assertEqual(sorted(paired), ["anyprec", "anyprec-random"])
    self.assertAlmostEqual(paired["anyprec"]["mean_nll_diff"], -2 / 3)
    rows[1]["results"]["wt"]["chunks_sha1"] = "other"  # other chunks: no line
    self.assertEmpty(eval_runner.interpolated_rows(rows, ["wt"]))


if __name__ == "__main__":
  absltest.main()
