"""Tests of incremental upscaling (anyprec_jax/quantize/upscaling.py, split.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import format as fmt
from anyprec_jax import weight as wt
from anyprec_jax.quantize import kmeans, upscaling as upscale
from anyprec_jax.quantize.config import SplitMethod
from tests.quantize import reference as ref
from tests.quantize.test_kmeans import K, N, rows

SEED, PARENT = 3, 8


def _sse(x, s):
  """Weighted squared error of values x around their weighted mean (float64)."""
  if len(x) == 0 or s.sum() <= 0:
    return 0.0
  mean = (s @ x) / s.sum()
  return float(s @ (x - mean) ** 2)


class UpscaleTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.w, cls.f = rows(11)
    cls.w[0, :] = np.resize(np.float32([0.1, -0.3, 0.7, 1.1, 2.0]), K)  # 5 distinct values
    cls.f[1] = 0.0  # zero-Fisher row
    cls.res = upscale.seed_and_upscale(cls.w, cls.f, SEED, PARENT, jax.random.key(0))

  def test_shapes_and_dtypes(self):
    self.assertEqual(self.res.codes.shape, (N, K))
    self.assertEqual(self.res.codes.dtype, np.uint8)
    self.assertEqual(sorted(self.res.luts), list(range(SEED, PARENT + 1)))
    for b, lut in self.res.luts.items():
      self.assertEqual(lut.shape, (N, 1 << b))
      self.assertTrue(np.all(np.isfinite(lut)))

  def test_weighted_error_never_increases(self):
    prev = None
    for b in range(SEED, PARENT + 1):
      codes = self.res.codes.astype(np.int64) >> (PARENT - b)
      err = ref.weighted_error(self.w, self.f, codes, self.res.luts[b])
      if prev is not None:
        np.testing.assert_array_less(err, prev * (1 + 1e-6) + 1e-12)
      prev = err

  def test_each_level_is_contiguous_clusters_with_weighted_mean_luts(self):
    order = np.argsort(self.w, axis=1, kind="stable")
    for b in range(SEED, PARENT + 1):
      codes = self.res.codes.astype(np.int64) >> (PARENT - b)
      # Clusters are ranges of the sorted row: codes nondecreasing in sorted order.
      sorted_codes = np.take_along_axis(codes, order, 1)
      self.assertTrue(np.all(np.diff(sorted_codes, axis=1) >= 0), f"level {b}")
      means = ref.cluster_means(self.w, self.f, codes, 1 << b)
      used = ~np.isnan(means)
      np.testing.assert_allclose(self.res.luts[b][used], means[used], rtol=2e-5, atol=1e-6)

  def test_empty_children_copy_the_parent_centroid(self):
    empties = 0
    for b in range(SEED, PARENT):
      codes = self.res.codes.astype(np.int64) >> (PARENT - b - 1)
      for r in range(N):
        present = np.isin(np.arange(1 << (b + 1)), codes[r])
        for child in np.flatnonzero(~present):
          empties += 1
          self.assertEqual(self.res.luts[b + 1][r, child], self.res.luts[b][r, child >> 1])
    self.assertGreater(empties, 0)  # K = 96 < 256 clusters: there are empty ones

  def test_row_with_few_values_is_exact_at_every_level(self):
    for b in range(SEED, PARENT + 1):
      codes = self.res.codes[:1].astype(np.int64) >> (PARENT - b)
      deq = np.take_along_axis(self.res.luts[b][:1], codes, 1)
      np.testing.assert_array_equal(deq, self.w[:1])

  def test_seed_level_is_the_seed_kmeans(self):
    seed = kmeans.seed_kmeans(self.w, self.f, SEED, jax.random.key(0))
    np.testing.assert_array_equal(self.res.codes >> (PARENT - SEED), seed.codes)
    # Same clusters; the fused path sums the seed clusters from their descendants.
    np.testing.assert_allclose(self.res.luts[SEED], seed.lut, rtol=1e-6, atol=1e-7)

  def test_standalone_upscale_matches_fused(self):
    seed = kmeans.seed_kmeans(self.w, self.f, SEED, jax.random.key(0))
    res = upscale.upscale(self.w, self.f, seed.codes, seed.lut, SEED, PARENT)
    np.testing.assert_array_equal(res.codes, self.res.codes)
    np.testing.assert_array_equal(res.luts[SEED], seed.lut)  # kept as given
    for b in range(SEED + 1, PARENT + 1):
      np.testing.assert_array_equal(res.luts[b], self.res.luts[b])

  def test_truncation_through_bitplanes_is_bit_exact(self):
    planes = fmt.pack_bitplanes(self.res.codes, PARENT)
    self.assertEqual(planes.shape, (PARENT, N, fmt.num_words(K)))  # K % 32 != 0
    weight = wt.from_codes(self.res.codes, self.res.luts, PARENT)
    for b in range(SEED, PARENT + 1):
      code_b = self.res.codes.astype(np.int64) >> (PARENT - b)
      np.testing.assert_array_equal(fmt.unpack_codes(jnp.asarray(planes), b, K), code_b)
      expect = np.take_along_axis(self.res.luts[b], code_b, 1)
      np.testing.assert_array_equal(np.asarray(wt.dequantize(weight, b)), expect)

  def test_seed_equal_parent_is_the_seed(self):
    w, f = rows(2)
    res = upscale.seed_and_upscale(w, f, 3, 3, jax.random.key(0))
    seed = kmeans.seed_kmeans(w, f, 3, jax.random.key(0))
    np.testing.assert_array_equal(res.codes, seed.codes)
    self.assertEqual(list(res.luts), [3])

  def test_optimal_split_is_the_best_split_of_each_cluster(self):
    s = ref.sample_weights(self.w, self.f)
    checked = 0
    for b in range(SEED, PARENT):
      parent = self.res.codes.astype(np.int64) >> (PARENT - b)
      child = (self.res.codes.astype(np.int64) >> (PARENT - b - 1)) & 1
      for r in range(4, N, 5):  # a sample of rows of every kind
        for c in np.unique(parent[r]):
          m = parent[r] == c
          order = np.argsort(self.w[r, m], kind="stable")
          x, sw = self.w[r, m][order].astype(np.float64), s[r, m][order]
          if sw.sum() <= 0:
            sw = np.ones_like(sw)
          best = min(_sse(x[:t], sw[:t]) + _sse(x[t:], sw[t:]) for t in range(len(x) + 1))
          ch = child[r, m][order]
          got = _sse(x[ch == 0], sw[ch == 0]) + _sse(x[ch == 1], sw[ch == 1])
          self.assertLessEqual(got, best * (1 + 1e-5) + 1e-12)
          checked += 1
    self.assertGreater(checked, 100)

  def test_bisection_split_of_the_original(self):
    res = upscale.seed_and_upscale(self.w, self.f, SEED, 5, jax.random.key(0),
                                   split=SplitMethod.BISECTION)
    np.testing.assert_array_equal(res.codes >> 2, self.res.codes >> (PARENT - SEED))
    order = np.argsort(self.w, axis=1, kind="stable")
    prev = None
    for b in range(SEED, 6):
      codes = res.codes.astype(np.int64) >> (5 - b)
      self.assertTrue(np.all(np.diff(np.take_along_axis(codes, order, 1), axis=1) >= 0))
      err = ref.weighted_error(self.w, self.f, codes, res.luts[b])
      if prev is not None:
        np.testing.assert_array_less(err, prev * (1 + 1e-6) + 1e-12)
      prev = err
    # From the same seed clusters, the exact split is never worse than the bisection.
    exact = ref.weighted_error(self.w, self.f, self.res.codes.astype(np.int64) >> 4,
                               self.res.luts[4])
    bisect = ref.weighted_error(self.w, self.f, res.codes.astype(np.int64) >> 1, res.luts[4])
    np.testing.assert_array_less(exact, bisect * (1 + 1e-6) + 1e-12)

  def test_bad_bit_settings_and_seed_codes_raise(self):
    with self.assertRaisesRegex(ValueError, "seed_bits .* must be <= parent_bits"):
      upscale.seed_and_upscale(self.w, self.f, 5, 4, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "bits"):
      upscale.seed_and_upscale(self.w, self.f, 3, 9, jax.random.key(0))
    bad = np.full((N, K), 8, np.uint8)
    with self.assertRaisesRegex(ValueError, "out of range"):
      upscale.upscale(self.w, self.f, bad, np.zeros((N, 8)), 3, 8)
    w = self.w.copy()
    w[4, 4] = np.nan
    with self.assertRaisesRegex(ValueError, "non-finite.*q_proj"):
      upscale.seed_and_upscale(w, self.f, 3, 8, jax.random.key(0), name="q_proj")


if __name__ == "__main__":
  absltest.main()
