"""Tests of the quantizer's measurement helpers (anyprec_jax/quantize/bench.py)."""

import jax
import numpy as np
from absl.testing import absltest

from anyprec_jax.quantize import baselines, bench, kmeans, upscaling
from tests import slow


class UpscaleVsIndependentTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.w = rng.standard_normal((8, 96)).astype(np.float32)
    self.f = (np.abs(rng.standard_normal((8, 96))) ** 3).astype(np.float32)

  def test_weighted_error_matches_a_direct_sum(self):
    res = kmeans.seed_kmeans(self.w, self.f, 3, jax.random.key(1))
    want = np.sum(self.f.astype(np.float64)
                  * (self.w - baselines.dequantize_codes(res.codes, res.lut)) ** 2)
    self.assertAlmostEqual(bench.weighted_error(self.w, self.f, res.codes, res.lut), want,
                           places=6)

  @slow.slow("upscale vs independent over every width")
  def test_errors_fall_with_bits_and_are_relative_to_the_weight_energy(self):
    out = bench.upscale_vs_independent(self.w, self.f, 2, 5)
    self.assertEqual(sorted(out), [2, 3, 4, 5])
    up = [out[b]["upscaled"] for b in range(2, 6)]
    self.assertTrue(all(a >= b for a, b in zip(up, up[1:])), up)
    self.assertLess(up[0], 1.0)  # relative to sum f w^2
    energy = np.sum(self.f.astype(np.float64) * self.w.astype(np.float64) ** 2)
    ref = upscaling.seed_and_upscale(self.w, self.f, 2, 5, jax.random.key(0))
    top3 = np.asarray(ref.codes) >> 2
    self.assertAlmostEqual(out[3]["upscaled"],
                           bench.weighted_error(self.w, self.f, top3, ref.luts[3]) / energy,
                           places=9)
    for b in range(2, 6):
      self.assertAlmostEqual(out[b]["ratio"], out[b]["upscaled"] / out[b]["independent"])


if __name__ == "__main__":
  absltest.main()
