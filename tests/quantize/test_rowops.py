"""Tests of the per-row building blocks (anyprec_jax/quantize/rowops.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from anyprec_jax.quantize import rowops


class RowOpsTest(absltest.TestCase):

  def test_double_float_range_sums_are_accurate_where_float32_is_not(self):
    rng = np.random.default_rng(0)
    k = 4096
    v = (rng.standard_normal(k) * np.exp(rng.uniform(-25, 5, k))).astype(np.float32)
    v[100:200] = 0.0
    row = jax.jit(rowops.sort_row)(jnp.asarray(np.sort(v)), jnp.ones(k, jnp.float32))
    x = np.sort(v).astype(np.float64)
    start = rng.integers(0, k, 500)
    stop = np.minimum(start + rng.integers(0, 30, 500), k)
    got = np.asarray(jax.jit(rowops.range_sums)(row, jnp.asarray(start), jnp.asarray(stop)))
    want = np.array([x[a:b].sum() for a, b in zip(start, stop)])
    # Documented accuracy: float32 rounding of the range sum itself plus ~1e-13 of the
    # row's magnitude (the double-float prefixes); plain float32 prefixes miss it.
    size = np.array([np.abs(x[a:b]).sum() for a, b in zip(start, stop)])
    bound = 1e-6 * size + 1e-12 * np.abs(x).sum()
    np.testing.assert_array_less(np.abs(got[:, rowops.X] - want), bound)
    f32 = np.concatenate([[0], np.cumsum(np.sort(v))]).astype(np.float64)
    self.assertFalse(np.all(np.abs((f32[stop] - f32[start]) - want) < bound))
    counts = got[:, rowops.S]  # s = 1: the sums of s are the range lengths
    np.testing.assert_array_equal(counts, stop - start)

  def test_ranges_of_zeros_sum_to_exactly_zero(self):
    s = jnp.asarray([0.0, 3.0, 0.0, 0.0, 0.0, 1e-30, 5.0])
    row = rowops.sort_row(jnp.arange(7.0), s, order=jnp.arange(7))
    sums = rowops.range_sums(row, jnp.asarray([2, 0, 6]), jnp.asarray([5, 1, 6]))
    self.assertEqual(float(sums[0, rowops.S]), 0.0)
    self.assertEqual(float(sums[1, rowops.S]), 0.0)
    self.assertEqual(float(sums[2, rowops.S]), 0.0)

  def test_codes_and_cluster_sums_with_empty_clusters(self):
    borders = jnp.asarray([0, 0, 3, 3, 3, 7], jnp.int32)  # clusters 0, 2, 3 empty
    codes = rowops.codes_from_borders(borders, 7)
    np.testing.assert_array_equal(codes, [1, 1, 1, 4, 4, 4, 4])
    x = jnp.asarray([0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    s = jnp.asarray([1.0, 0.0, 2.0, 1e-8, 3.0, 1.0, 0.5])
    row = rowops.sort_row(x, s, order=jnp.arange(7))
    sums = np.asarray(rowops.cluster_sums(row, borders))
    np.testing.assert_allclose(sums[1], [3.0, 4.5, 3.5, 3.0], rtol=1e-6)
    xs, ss = np.asarray(x[3:], np.float64), np.asarray(s[3:], np.float64)
    np.testing.assert_allclose(sums[4], [ss.sum(), ss @ xs, xs.sum(), 4.0], rtol=1e-6)
    np.testing.assert_array_equal(sums[[0, 2, 3]], 0.0)

  def test_chunking_is_balanced_and_aligned(self):
    self.assertEqual(rowops.chunk_rows_for(100, 64, 1 << 20), 100)
    rows = rowops.chunk_rows_for(11008, 4096, 1 << 24)
    self.assertEqual(rows % 64, 0)
    self.assertGreaterEqual(rows * -(-11008 // rows), 11008)
    self.assertLess(rows * -(-11008 // rows) - 11008, 64 * 3)


if __name__ == "__main__":
  absltest.main()
