"""Tests of the baselines (anyprec_jax/quantize/baselines.py)."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax.quantize import baselines, kmeans
from anyprec_jax.quantize.config import Method, QuantConfig
from tests.quantize.reference import weighted_error as _weighted_error
from tests.quantize.test_kmeans import K, N, rows


def rtn_reference(w: np.ndarray, bits: int) -> np.ndarray:
  """Textbook per-row asymmetric min/max round-to-nearest, float64."""
  w = w.astype(np.float64)
  lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
  scale = (hi - lo) / (2 ** bits - 1)
  q = np.clip(np.round((w - lo) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1)
  return np.where(scale > 0, lo + q * scale, w)


def ref_error(w, f, res):
  return _weighted_error(w, f, res.codes, res.lut)


class BaselinesTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 8)
  def test_rtn_matches_reference(self, bits):
    w, _ = rows(bits)
    w[0] = 0.5  # constant row
    res = baselines.rtn(w, bits)
    self.assertEqual(res.lut.shape, (N, 2 ** bits))
    deq = baselines.dequantize_codes(res.codes, res.lut)
    np.testing.assert_allclose(deq, rtn_reference(w, bits), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.abs(deq - w) <= (w.max(1, keepdims=True) - w.min(1, keepdims=True))
                           / (2 ** bits - 1) / 2 + 1e-6))

  def test_independent_is_seed_kmeans_per_width(self):
    w, f = rows(1)
    key = jax.random.key(3)
    res = baselines.independent(w, f, (2, 3), key)
    self.assertEqual(sorted(res), [2, 3])
    for b in (2, 3):
      ref = kmeans.seed_kmeans(w, f, b, jax.random.fold_in(key, b))
      np.testing.assert_array_equal(res[b].codes, ref.codes)
      np.testing.assert_array_equal(res[b].lut, ref.lut)

  def test_squeezellm_is_one_kmeanspp_start_without_dp(self):
    w, f = rows(2)
    key = jax.random.key(4)
    res = baselines.squeezellm(w, f, (3,), key)
    ref = kmeans.seed_kmeans(w, f, 3, jax.random.fold_in(key, 3), n_init=1, dp_bins=0)
    np.testing.assert_array_equal(res[3].codes, ref.codes)
    np.testing.assert_array_equal(res[3].lut, ref.lut)
    ours = baselines.independent(w, f, (3,), key)[3]
    err = lambda r: np.sum(ref_error(w, f, r))
    self.assertLess(err(ours), err(res[3]))  # the DP start is the stronger baseline
    cfg = QuantConfig(method=Method.SQUEEZELLM, n_init=4, dp_bins=64)
    self.assertEqual((cfg.n_init, cfg.dp_bins), (1, 0))

  def test_rtn_rejects_nan_and_bad_bits(self):
    w, _ = rows(0)
    w[1, 1] = np.inf
    with self.assertRaisesRegex(ValueError, "non-finite.*mlp.up_proj"):
      baselines.rtn(w, 3, name="mlp.up_proj")
    with self.assertRaisesRegex(ValueError, "bits"):
      baselines.rtn(rows(0)[0], 9)


if __name__ == "__main__":
  absltest.main()
