"""Pallas GEMV / dequantisation kernels against the pure-jnp references.

`KernelTest` runs natively on a GPU (skipped elsewhere); `KernelInterpretTest` runs the
same cases through the Pallas interpreter on CPU. Every run draws fresh random codes,
LUTs and activations (never zeros), starts the kernel's output buffer as NaN and checks
that every element was written.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import format as fmt
from anyprec_jax import weight as wt
from anyprec_jax.pallas import backend, kernels
from anyprec_jax.pallas.triton import dequant, gemv
from tests import slow

ALL_BITS = range(3, 9)
SMALL = (176, 172)  # N, K: K is not a multiple of 32
LARGE = (4096, 11008)  # Llama-2-7B down_proj


def _random_weight(rng, n, k, *, parent=8, lut_dtype=np.float16, zero_code_value=None):
  """Random parent codes and per-precision LUTs (fresh draws, no zeros)."""
  codes = rng.integers(0, 1 << parent, size=(n, k))
  luts = {}
  for b in range(3, parent + 1):
    lut = rng.uniform(0.5, 2.0, size=(n, 1 << b)) * rng.choice([-1, 1], size=(n, 1 << b))
    if zero_code_value is not None:
      lut[:, 0] = zero_code_value
    luts[b] = lut.astype(lut_dtype)
  return wt.from_codes(codes, luts, parent)


def _reference(x, w):
  return np.asarray(gemv.gemv_reference(x, w), np.float64)


def _assert_close(testcase, got, want, rtol=2e-5):
  got = np.asarray(got, np.float64)
  testcase.assertTrue(np.isfinite(got).all(), "unwritten (NaN) or non-finite outputs")
  scale = np.abs(want).max() + 1e-30
  err = np.abs(got - want).max() / scale
  testcase.assertLess(err, rtol, f"max error {err:.3g} of max |ref| {scale:.3g}")


class KernelTest(parameterized.TestCase):
  INTERPRET = False
  # Both look-up paths and field widths, M = 1 and 8 at the 7B shape (the odd shape
  # covers every width and M = 1, 2, 3, 8).
  LARGE = LARGE
  # Natively (GPU, Triton: older GPUs' path) every width once at M = 1 and once at M = 8
  # or an odd M, and both look-up paths and field widths at the 7B shape: the native
  # pallas suite must run in under 5 minutes on the H200 (issue 15).
  LARGE_CASES = ((3, 1), (4, 8), (5, 1), (8, 8))
  PADDING_BITS = (3, 4, 8)
  DEQUANT_BITS = tuple(ALL_BITS)
  ODD_CASES = (frozenset(itertools.product(ALL_BITS, (1,)))
               | {(3, 8), (4, 2), (5, 3), (6, 8), (7, 2), (8, 3)})

  # On Hopper the model runs the Mosaic GPU kernels; the Triton kernels are the path of
  # older GPUs, and each native case compiles for ~7 s. There the default run checks
  # both look-up paths natively (the interpreter covers the rest on CPU) and
  # ANYPREC_ALL_TESTS=1 runs every native case (H200, 2026-12-04: the whole native
  # pallas suite took over 6 minutes with all of them).
  # Session 8 (H100): test_gemv_large 28 s, odd b5 M = 8 18 s: one large case now.
  HOPPER_CASES = {"test_gemv_odd_shape": {(3, 1), (5, 8)},
                  "test_gemv_large": {(8, 8)},
                  "test_padding_never_contributes": {3, 8},
                  "test_dequantize_exact": {3, 8}}
  HOPPER_SKIPPED = ("test_bf16_lut", "test_prefill_matmul",
                    "test_fp32_prefill_is_exact_precision")

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("native Pallas kernels need a GPU")
    if self.INTERPRET and jax.default_backend() == "gpu":
      self.skipTest("on a GPU the native KernelTest runs these cases")
    if not self.INTERPRET and backend.is_hopper_or_newer() and not slow.enabled():
      if any(self._testMethodName.startswith(n) for n in self.HOPPER_SKIPPED):
        self.skipTest(f"Triton path of older GPUs on Hopper; {slow.ENV}=1 runs it")
      self.ODD_CASES = frozenset(self.HOPPER_CASES["test_gemv_odd_shape"])
      self.LARGE_CASES = tuple(sorted(self.HOPPER_CASES["test_gemv_large"]))
      self.PADDING_BITS = tuple(sorted(self.HOPPER_CASES["test_padding_never_contributes"]))
      self.DEQUANT_BITS = tuple(sorted(self.HOPPER_CASES["test_dequantize_exact"]))

  def _gemv(self, x, w):
    n, k = w.shape
    cfg = kernels.gemv_config(w.bits, n, k, x.shape[0])
    return gemv.gemv(x, w.planes, w.luts[w.bits], bits=w.bits, cfg=cfg,
                     interpret=self.INTERPRET, poison=True)

  @parameterized.named_parameters(
      (f"b{b}_m{m}", b, m) for b, m in itertools.product(ALL_BITS, (1, 2, 3, 8)))
  def test_gemv_odd_shape(self, bits, m):
    if (bits, m) not in self.ODD_CASES:
      self.skipTest("not in this run's cases (ODD_CASES: the interpreter and Hopper run subsets)")
    rng = np.random.default_rng(100 * bits + m)
    w = _random_weight(rng, *SMALL).with_bits(bits)
    x = jnp.asarray(rng.standard_normal((m, SMALL[1])), jnp.bfloat16)
    _assert_close(self, self._gemv(x, w), _reference(x, w))

  def test_gemv_large(self):
    rng = np.random.default_rng(7)
    w = _random_weight(rng, *self.LARGE)
    for bits, m in self.LARGE_CASES:
      with self.subTest(bits=bits, m=m):
        x = jnp.asarray(rng.standard_normal((m, self.LARGE[1])), jnp.bfloat16)
        wb = w.with_bits(bits)
        _assert_close(self, self._gemv(x, wb), _reference(x, wb))

  @parameterized.named_parameters(("b3", 3), ("b4", 4), ("b8", 8))
  def test_padding_never_contributes(self, bits):
    if bits not in self.PADDING_BITS:
      self.skipTest("not in this run's widths (PADDING_BITS)")
    # Code 0 (the padding code) maps to a huge value; padding columns must add 0.
    rng = np.random.default_rng(bits)
    w = _random_weight(rng, 24, 40, zero_code_value=3e4).with_bits(bits)
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    _assert_close(self, self._gemv(x, w), _reference(x, w))
    prefetch = dataclasses.replace(  # the non-default pipelined variant
        kernels.gemv_config(bits, 24, 40, 2), prefetch=True)
    _assert_close(self, gemv.gemv(x, w.planes, w.luts[bits], bits=bits, cfg=prefetch,
                                  interpret=self.INTERPRET, poison=True), _reference(x, w))
    d = dequant.dequantize(w.planes, w.luts[bits], bits=bits, in_features=40,
                           interpret=self.INTERPRET, poison=True)
    self.assertEqual(d.shape, (24, 40))

  @parameterized.named_parameters(("b3", 3), ("b4", 4), ("b8", 8))
  def test_bf16_lut(self, bits):
    rng = np.random.default_rng(30 + bits)
    w = _random_weight(rng, 64, 96, lut_dtype=jnp.bfloat16).with_bits(bits)
    x = jnp.asarray(rng.standard_normal((1, 96)), jnp.bfloat16)
    _assert_close(self, self._gemv(x, w), _reference(x, w))

  def test_dequantize_exact(self):
    rng = np.random.default_rng(50)
    w = _random_weight(rng, *SMALL)
    for bits in self.DEQUANT_BITS:
      with self.subTest(bits=bits):
        cfg = kernels.dequant_config(bits, *SMALL)
        got = dequant.dequantize(w.planes, w.luts[bits], bits=bits, in_features=SMALL[1],
                                 cfg=cfg, interpret=self.INTERPRET, poison=True)
        want = dequant.dequantize_reference(w, bits)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  @parameterized.named_parameters(("m9_b3", 9, 3), ("m17_b5", 17, 5), ("m33_b8", 33, 8))
  def test_prefill_matmul(self, m, bits):
    rng = np.random.default_rng(m + bits)
    w = _random_weight(rng, *SMALL).with_bits(bits)
    x = jnp.asarray(rng.standard_normal((m, SMALL[1])), jnp.bfloat16)
    got = kernels.anyprec_matmul(x, w, interpret=self.INTERPRET)
    # bf16 weights in the dense product: bf16-operand accuracy.
    _assert_close(self, got, _reference(x, w), rtol=1e-2)

  def test_fp32_prefill_is_exact_precision(self):
    rng = np.random.default_rng(3)
    w = _random_weight(rng, *SMALL).with_bits(4)
    x = jnp.asarray(rng.standard_normal((12, SMALL[1])), jnp.float32)
    _assert_close(self, kernels.anyprec_matmul(x, w, interpret=self.INTERPRET),
                  _reference(x, w))

  def test_gemv_inside_while_loop(self):
    # The decode loop of the serving engine: the kernel inside a jitted while_loop.
    rng = np.random.default_rng(11)
    w = _random_weight(rng, 96, 96).with_bits(3)
    x0 = jnp.asarray(rng.standard_normal((1, 96)) * 0.1, jnp.bfloat16)
    interpret = self.INTERPRET

    @jax.jit
    def loop(x, w):
      def body(carry):
        i, h = carry
        y = kernels.anyprec_matmul(h, w, interpret=interpret)
        return i + 1, jnp.tanh(y).astype(h.dtype)
      return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    h = x0
    for _ in range(3):
      h = jnp.tanh(jnp.asarray(_reference(h, w), jnp.float32)).astype(jnp.bfloat16)
    got = np.asarray(loop(x0, w), np.float32)
    np.testing.assert_allclose(got, np.asarray(h, np.float32), atol=2e-2)

  def test_rejects_bad_shapes(self):
    rng = np.random.default_rng(0)
    w = _random_weight(rng, 8, 64).with_bits(3)
    with self.assertRaisesRegex(ValueError, "features"):
      kernels.anyprec_matmul(jnp.zeros((1, 65)), w, interpret=True)
    with self.assertRaisesRegex(ValueError, "at most"):
      gemv.gemv(jnp.ones((9, 64)), w.planes, w.luts[3], bits=3, interpret=True)
    self.assertEqual(fmt.num_words(64), w.planes.shape[2])


class KernelInterpretTest(KernelTest):
  INTERPRET = True
  # Fewer widths at the largest shape on CPU (both look-up paths, both field widths).
  LARGE = (512, LARGE[1])  # the 7B down K (split K); fewer rows for the interpreter
  LARGE_CASES = ((3, 1), (5, 8))
  PADDING_BITS = (3, 8)  # the two look-up paths
  DEQUANT_BITS = (4, 8)  # 3 and 5 also run through the prefill tests
  # Every width at M = 1; M = 8 at both look-up paths (3: <= 4 bits, 5: >= 5; 8 bits at
  # M = 8 runs in test_gemv_large); one odd M (M = 2, 3 walk the same row loop as 8).
  # Trimmed for the CPU suite's time (session 13); the native GPU run keeps its own set.
  ODD_CASES = (frozenset(itertools.product(ALL_BITS, (1,)))
               | frozenset(itertools.product((3, 5), (8,))) | {(4, 3)})


if __name__ == "__main__":
  absltest.main()
