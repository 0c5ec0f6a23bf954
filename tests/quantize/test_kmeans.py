"""Tests of the seed k-means (anyprec_jax/quantize/kmeans.py) against NumPy references."""

import jax
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax.quantize import kmeans
from tests.quantize import reference as ref

N, K = 24, 96  # shared by the quantize tests, so jitted programs are reused
KINDS = ("gauss_uniform", "gauss_rand", "gauss_cubed", "student_heavy")


def rows(seed: int = 0):
  """N rows of K values: N / 4 rows of each kind."""
  rng = np.random.default_rng(seed)
  parts = [ref.random_rows(rng, N // len(KINDS), K, kind) for kind in KINDS]
  w = np.concatenate([p[0] for p in parts]).astype(np.float32)
  f = np.concatenate([p[1] for p in parts]).astype(np.float32)
  return w, f


class SeedKMeansTest(parameterized.TestCase):

  @parameterized.parameters(2, 3)
  def test_objective_within_one_percent_of_exact_optimum(self, bits):
    w, f = rows(bits)
    res = kmeans.seed_kmeans(w, f, bits, jax.random.key(0))
    err = ref.weighted_error(w, f, res.codes, res.lut)
    s = ref.sample_weights(w, f)
    opt = np.array([ref.optimal_error(w[r], s[r], 1 << bits) for r in range(N)])
    self.assertTrue(np.all(opt > 0))
    np.testing.assert_array_less(err, 1.01 * opt)
    np.testing.assert_array_less(opt * (1 - 1e-5), err)  # sanity: never below optimum

  def test_kmeanspp_only_reaches_a_lloyd_fixed_point(self):
    # The original algorithm (k-means++ start, no DP start): the result must be a
    # Lloyd fixed point: centroids = weighted cluster means, codes = nearest centroid.
    w, f = rows(7)
    res = kmeans.seed_kmeans(w, f, 3, jax.random.key(1), dp_bins=0)
    means = ref.cluster_means(w, f, res.codes, 8)
    used = ~np.isnan(means)
    np.testing.assert_allclose(res.lut[used], means[used], rtol=1e-5, atol=1e-6)
    dist = np.abs(w[:, :, None] - res.lut[:, None, :])  # [N, K, 8]
    own = np.take_along_axis(dist, res.codes[:, :, None].astype(np.int64), 2)[..., 0]
    np.testing.assert_array_less(own, dist.min(-1) + 1e-6)

  def test_codes_in_range_and_deterministic(self):
    w, f = rows(3)
    a = kmeans.seed_kmeans(w, f, 3, jax.random.key(5))
    b = kmeans.seed_kmeans(w, f, 3, jax.random.key(5))
    self.assertEqual(a.codes.dtype, np.uint8)
    self.assertEqual(a.lut.shape, (N, 8))
    self.assertLess(int(a.codes.max()), 8)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.lut, b.lut)

  def test_result_does_not_depend_on_chunking(self):
    w, f = rows(4)
    whole = kmeans.seed_kmeans(w, f, 3, jax.random.key(2))
    # 10 rows per chunk: 3 chunks, the last one padded.
    chunked = kmeans.seed_kmeans(w, f, 3, jax.random.key(2), chunk_elements=10 * K)
    np.testing.assert_array_equal(whole.codes, chunked.codes)
    np.testing.assert_array_equal(whole.lut, chunked.lut)

  def test_zero_fisher_row_is_weighted_uniformly(self):
    w, f = rows(5)
    f[3] = 0.0
    uniform = f.copy()
    uniform[3] = 1.0
    a = kmeans.seed_kmeans(w, f, 3, jax.random.key(0))
    b = kmeans.seed_kmeans(w, uniform, 3, jax.random.key(0))
    np.testing.assert_array_equal(a.codes[3], b.codes[3])
    np.testing.assert_allclose(a.lut[3], b.lut[3], rtol=1e-6)
    self.assertTrue(np.all(np.isfinite(a.lut)))

  def test_zero_weights_get_zero_sample_weight(self):
    w, f = rows(6)
    w[:, :10] = 0.0
    big = f.copy()
    big[:, :10] = 1e6  # must be ignored: these weights are exactly 0
    zeroed = f.copy()
    zeroed[:, :10] = 0.0
    a = kmeans.seed_kmeans(w, big, 3, jax.random.key(0))
    b = kmeans.seed_kmeans(w, zeroed, 3, jax.random.key(0))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.lut, b.lut)

  def test_rows_with_few_distinct_values_are_exact(self):
    rng = np.random.default_rng(0)
    w, f = rows(8)
    w[0] = rng.choice(np.float32([-0.5, 0.25, 1.5]), K)  # 3 values < 8 clusters
    w[1] = 0.75  # constant row
    w[2, :] = 0.0  # all zero: every sample weight 0 -> uniform
    res = kmeans.seed_kmeans(w, f, 3, jax.random.key(0))
    deq = np.take_along_axis(res.lut, res.codes.astype(np.int64), 1)
    np.testing.assert_array_equal(deq[:3], w[:3])
    self.assertTrue(np.all(np.isfinite(res.lut)))

  @parameterized.named_parameters(
      ("nan_weight", "w", np.nan, "non-finite.*weight.*layer.x"),
      ("inf_weight", "w", np.inf, "non-finite.*weight.*layer.x"),
      ("nan_fisher", "f", np.nan, "non-finite.*Fisher.*layer.x"),
      ("negative_fisher", "f", -1.0, "negative.*Fisher.*layer.x"))
  def test_bad_values_raise_naming_the_layer(self, which, value, pattern):
    w, f = rows(0)
    (w if which == "w" else f)[2, 5] = value
    with self.assertRaisesRegex(ValueError, pattern):
      kmeans.seed_kmeans(w, f, 3, jax.random.key(0), name="layer.x")

  def test_bad_shapes_and_bits_raise(self):
    w, f = rows(0)
    with self.assertRaisesRegex(ValueError, "Fisher shape"):
      kmeans.seed_kmeans(w, f[:, :-1], 3, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "2-D"):
      kmeans.seed_kmeans(w[0], f[0], 3, jax.random.key(0))
    for bits in (0, 9, 2.5):
      with self.assertRaisesRegex(ValueError, "bits"):
        kmeans.seed_kmeans(w, f, bits, jax.random.key(0))


if __name__ == "__main__":
  absltest.main()
