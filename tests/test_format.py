"""Tests for the bitplane format and AnyPrecWeight."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import format as fmt
from anyprec_jax import weight as wt


class FormatTest(parameterized.TestCase):

  @parameterized.product(bits=[1, 3, 8], k=[1, 31, 32, 33, 172])
  def test_pack_unpack_round_trip(self, bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 1 << bits, size=(5, k))
    planes = fmt.pack_bitplanes(codes, bits)
    self.assertEqual(planes.shape, (bits, 5, fmt.num_words(k)))
    self.assertEqual(planes.dtype, np.uint32)
    np.testing.assert_array_equal(fmt.unpack_codes(jnp.asarray(planes), bits, k), codes)
    np.testing.assert_array_equal(fmt.unpack_codes_np(planes, bits, k), codes)

  def test_layout_msb_first_and_column_order(self):
    codes = np.zeros((1, 40), np.int64)
    codes[0, 33] = 0b101  # 3-bit code at column 33 = word 1, bit 1
    planes = fmt.pack_bitplanes(codes, 3)
    self.assertEqual(planes[0, 0, 1], 1 << 1)  # MSB plane
    self.assertEqual(planes[1, 0, 1], 0)
    self.assertEqual(planes[2, 0, 1], 1 << 1)
    self.assertTrue((planes[:, :, 0] == 0).all())

  def test_top_bits_truncation(self):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(4, 70))
    planes = jnp.asarray(fmt.pack_bitplanes(codes, 8))
    for b in range(1, 9):
      np.testing.assert_array_equal(fmt.unpack_codes(planes, b, 70), codes >> (8 - b))

  def test_bad_codes_raise(self):
    with self.assertRaisesRegex(ValueError, "out of range"):
      fmt.pack_bitplanes(np.array([[8]]), 3)
    with self.assertRaisesRegex(ValueError, r"\[N, K\]"):
      fmt.pack_bitplanes(np.array([1, 2]), 3)


class WeightTest(parameterized.TestCase):

  def _weight(self, n=6, k=45, seed=3, parent=5):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << parent, size=(n, k))
    luts = {b: rng.standard_normal((n, 1 << b)).astype(np.float16)
            for b in range(seed, parent + 1)}
    return codes, luts, wt.from_codes(codes, luts, parent)

  def test_dequantize_matches_numpy(self):
    codes, luts, w = self._weight()
    for b in luts:
      expect = np.take_along_axis(luts[b].astype(np.float32), codes >> (5 - b), axis=1)
      np.testing.assert_array_equal(wt.dequantize(w, b), expect)

  def test_set_precision_changes_treedef_and_jit_cache(self):
    _, _, w = self._weight()
    tree = {"a": w, "b": jnp.ones(3)}
    t4 = wt.set_precision(tree, 4)
    self.assertEqual(t4["a"].bits, 4)
    self.assertNotEqual(jax.tree_util.tree_structure(t4),
                        jax.tree_util.tree_structure(wt.set_precision(tree, 5)))
    f = jax.jit(lambda t: wt.dequantize(t["a"]))
    np.testing.assert_array_equal(f(t4), wt.dequantize(w, 4))

  def test_unsupported_precision_lists_supported(self):
    _, _, w = self._weight()
    with self.assertRaisesRegex(ValueError, r"supported: \[3, 4, 5\]"):
      w.with_bits(7)


if __name__ == "__main__":
  absltest.main()
