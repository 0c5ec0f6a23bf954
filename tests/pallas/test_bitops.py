"""Word-wide bit manipulation of the kernels against plain NumPy definitions."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import format as fmt
from anyprec_jax.pallas import bitops


def _prmt_spec(a: int, b: int, c: int) -> int:
  """PTX ISA prmt.b32 default mode, written from the manual."""
  table = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF
                                                        for i in range(4)]
  out = 0
  for i in range(4):
    nib = (c >> (4 * i)) & 0xF
    byte = table[nib & 7]
    if nib & 8:
      byte = 0xFF if byte & 0x80 else 0
    out |= byte << (8 * i)
  return out


class BitopsTest(parameterized.TestCase):

  def test_prmt_emulation_matches_spec(self):
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 2**32, size=300, dtype=np.uint64).astype(np.uint32)
               for _ in range(3))
    got = np.asarray(bitops.prmt(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)))
    want = [_prmt_spec(int(x), int(y), int(z)) for x, y, z in zip(a, b, c)]
    np.testing.assert_array_equal(got, np.array(want, np.uint32))
    for pattern in (0x5140, 0x7362, 0x3210, 0x8F80):
      got = np.asarray(bitops.prmt(jnp.asarray(a), jnp.asarray(b), pattern))
      want = [_prmt_spec(int(x), int(y), pattern) for x, y in zip(a, b)]
      np.testing.assert_array_equal(got, np.array(want, np.uint32))

  @parameterized.parameters(range(1, 9))
  def test_transpose8_gives_byte_codes(self, bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(5, 64))
    planes = fmt.pack_bitplanes(codes, bits)  # [b, 5, 2]
    out = bitops.transpose8([jnp.asarray(planes[p]) for p in range(bits)])
    cols = codes.reshape(5, 2, 32)
    for s in range(8):
      for t in range(4):
        np.testing.assert_array_equal((np.asarray(out[s]) >> (8 * t)) & 0xFF,
                                      cols[:, :, 8 * t + s])

  @parameterized.parameters(1, 2, 3, 4)
  def test_field_words_give_nibble_codes(self, bits):
    rng = np.random.default_rng(10 + bits)
    codes = rng.integers(0, 1 << bits, size=(3, 96))
    planes = [jnp.asarray(p) for p in fmt.pack_bitplanes(codes, bits)]
    cols = codes.reshape(3, 3, 32)
    for s in range(4):
      word = np.asarray(bitops.field_words(planes, [bits - 1 - i for i in range(bits)], s))
      for t in range(8):
        np.testing.assert_array_equal((word >> (4 * t)) & 0xF, cols[:, :, 4 * t + s])

  @parameterized.parameters(3, 4, 5, 8)
  def test_kernel_order_is_a_permutation(self, bits):
    order = bitops.kernel_order(bits)
    np.testing.assert_array_equal(np.sort(order), np.arange(32))

  def test_permute_columns(self):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 70)).astype(np.float32)
    out = np.asarray(bitops.permute_columns(jnp.asarray(x), 3, 4))  # [2, 32, 4]
    order = bitops.kernel_order(3)
    padded = np.zeros((2, 128), np.float32)
    padded[:, :70] = x
    for q in range(32):
      for w in range(4):
        self.assertEqual(out[0, q, w], padded[0, 32 * w + order[q]])
        self.assertEqual(out[1, q, w], padded[1, 32 * w + order[q]])


if __name__ == "__main__":
  absltest.main()
