"""Mosaic GPU GEMV (M = 1) against the pure-jnp reference.

`MosaicLoweringTest` builds the kernel for the CUDA platform on any machine (the
Mosaic GPU module is constructed and verified in Python; only the PTX compile needs a
GPU), so CPU CI catches a kernel that no longer builds. `MosaicGemvTest` runs it
natively on Hopper (skipped elsewhere) with fresh random inputs, odd shapes, and a
second run on new inputs to catch stale or unwritten outputs.
"""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax.pallas import backend
from anyprec_jax.pallas.mosaic import gemv as mg

CONFIGS = {
    "default": mg.MosaicGemvConfig(),
    "r2_nopf": mg.MosaicGemvConfig(rows=2, prefetch=False),
    "r4_t2_f32": mg.MosaicGemvConfig(rows=4, warpgroups=2, lut_f32=True),
}


def _inputs(key, n, k, bits, x_dtype=jnp.bfloat16, planes=8):
  kx, kp, kl = jax.random.split(key, 3)
  x = jax.random.normal(kx, (1, k), jnp.float32).astype(x_dtype)
  pl = jax.random.bits(kp, (planes, n, -(-k // 32)), jnp.uint32)
  lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
  return x, pl, lut


class MosaicLoweringTest(parameterized.TestCase):

  @parameterized.product(bits=(3, 5, 8), config=tuple(CONFIGS),
                         shape=((176, 172), (4096, 11008)))
  def test_lowers_for_cuda(self, bits, config, shape):
    n, k = shape
    fn = jax.jit(lambda x, p, l: mg.gemv(x, p, l, bits=bits, cfg=CONFIGS[config]))
    args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, -(-k // 32)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)

  def test_layout_fits_shared_memory(self):
    lay = mg.make_layout(8, 4096, 28672, mg.MosaicGemvConfig(), sms=132)
    self.assertLessEqual(lay.smem_bytes, 227 * 1024)
    self.assertEqual(lay.passes, 7)
    self.assertEqual(lay.ctas, 132)
    small = mg.make_layout(3, 8, 64, mg.MosaicGemvConfig(), sms=132)
    self.assertEqual(small.ctas, 1)

  def test_rejects_bad_shapes(self):
    x, pl, lut = _inputs(jax.random.PRNGKey(0), 16, 64, 3)
    with self.assertRaisesRegex(ValueError, "one activation row"):
      mg.gemv(jnp.concatenate([x, x]), pl, lut, bits=3)
    with self.assertRaisesRegex(ValueError, "LUT shape"):
      mg.gemv(x, pl, lut[:, :4], bits=3)

  def test_backend_choice_and_override(self):
    with mock.patch.dict(os.environ, {backend.BACKEND_ENV: "mosaic"}):
      self.assertIs(backend.gemv_backend(), backend.GpuBackend.MOSAIC)
    with mock.patch.dict(os.environ, {backend.BACKEND_ENV: "triton"}):
      self.assertIs(backend.gemv_backend(), backend.GpuBackend.TRITON)
    with mock.patch.dict(os.environ, {backend.BACKEND_ENV: "cuda"}):
      with self.assertRaisesRegex(ValueError, "ANYPREC_GPU_BACKEND"):
        backend.gemv_backend()
    with mock.patch.dict(os.environ, {backend.BACKEND_ENV: ""}):
      want = (backend.GpuBackend.MOSAIC if backend.is_hopper_or_newer()
              else backend.GpuBackend.TRITON)
      self.assertIs(backend.gemv_backend(), want)


class MosaicGemvTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not backend.is_hopper_or_newer():
      self.skipTest("the Mosaic GPU GEMV needs a Hopper (sm_90+) GPU")

  def _check(self, n, k, bits, cfg, x_dtype=jnp.bfloat16, seed=0):
    for trial in range(2):  # a second draw catches stale / unwritten outputs
      x, pl, lut = _inputs(jax.random.PRNGKey(1000 * seed + trial), n, k, bits, x_dtype)
      got = np.asarray(mg.gemv(x, pl, lut, bits=bits, cfg=cfg), np.float64)
      want = np.asarray(mg.gemv_reference(x, pl, lut, bits=bits, in_features=k),
                        np.float64)
      self.assertTrue(np.isfinite(got).all())
      err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
      self.assertLess(err, 1e-5, f"b{bits} {n}x{k} {cfg}: max rel err {err:.3g}")

  # Every width with the default launch, each other launch shape at two widths (the
  # LUT GEMV is the Hopper fallback for format-order planes at M = 1; the native suite
  # must stay under 5 minutes).
  @parameterized.parameters(
      [(b, "default") for b in range(3, 9)]
      + [(b, c) for b in (3, 8) for c in CONFIGS if c != "default"])
  def test_odd_shape(self, bits, config):
    self._check(1001, 4000, bits, CONFIGS[config], seed=bits)

  @parameterized.parameters((3, (4096, 11008)), (8, (11008, 4096)))
  def test_model_shapes(self, bits, shape):
    self._check(*shape, bits, mg.config_for(bits, *shape), seed=bits + 10)

  @parameterized.parameters(5, 8)
  def test_tc_order_planes(self, bits):
    from anyprec_jax import plane_layout
    n, k = 1001, 4000
    x, pl, lut = _inputs(jax.random.PRNGKey(bits), n, k, bits)
    tc = plane_layout.to_tc(pl, k)
    got = np.asarray(mg.gemv(x, tc, lut, bits=bits, tc_order=True), np.float64)
    want = np.asarray(mg.gemv_reference(x, pl, lut, bits=bits, in_features=k), np.float64)
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-5)

  @parameterized.parameters(jnp.float32, jnp.float16)
  def test_activation_dtypes(self, x_dtype):
    self._check(257, 1000, 5, mg.MosaicGemvConfig(), x_dtype=x_dtype, seed=3)


if __name__ == "__main__":
  absltest.main()
