"""`ops.linear` with an AnyPrecWeight: the Pallas path (interpreted) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import ops
from anyprec_jax import weight as wt


def _weight(rng, n, k):
  codes = rng.integers(0, 256, size=(n, k))
  luts = {b: rng.uniform(-1, 1, size=(n, 1 << b)).astype(np.float16) for b in (3, 4, 8)}
  return wt.from_codes(codes, luts, 8)


class RmsNormedTest(absltest.TestCase):
  """The unformed RMSNorm (`ops.RmsNormed`) off the tensor-core GEMV: formed as before."""

  def test_value_is_the_norm_and_linear_forms_it(self):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
    h = x.astype(jnp.float32)
    want = g.astype(jnp.bfloat16) * (h * jax.lax.rsqrt(
        jnp.mean(h * h, axis=-1, keepdims=True) + 1e-5)).astype(jnp.bfloat16)
    normed = ops.RmsNormed(x, g, 1e-5)
    self.assertEqual((normed.shape, normed.dtype), (x.shape, x.dtype))
    np.testing.assert_array_equal(np.asarray(normed.value(), np.float32),
                                  np.asarray(want, np.float32))
    w = _weight(rng, 24, 64).with_bits(3)
    dense = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
    for backend in (ops.Backend.REFERENCE, ops.Backend.INTERPRET):
      with ops.use_backend(backend):
        self.assertFalse(ops.folds_norms())
        for weight in (w, dense):
          np.testing.assert_array_equal(
              np.asarray(ops.linear(normed, weight), np.float32),
              np.asarray(ops.linear(normed.value(), weight), np.float32))


class LinearResidualTest(absltest.TestCase):
  """`ops.linear_residual` off the tensor-core GEMV: the decoder's `x + a`, then the norm."""

  def test_formed_as_the_decoder_forms_it(self):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    res = jnp.asarray(rng.standard_normal((2, 1, 24)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 24), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(24), jnp.float32)
    w = _weight(rng, 24, 64).with_bits(3)
    for backend in (ops.Backend.REFERENCE, ops.Backend.INTERPRET):
      with ops.use_backend(backend):
        self.assertFalse(ops.fuses_residual())
        for b in (None, bias):
          want = res + ops.linear(x, w, b)
          h, normed = ops.linear_residual(x, w, res, None, b)
          self.assertIsNone(normed)
          np.testing.assert_array_equal(np.asarray(h, np.float32),
                                        np.asarray(want, np.float32))
          h, normed = ops.linear_residual(x, w, res, (g, 1e-5), b)
          self.assertIs(normed.x, h)
          self.assertIsNone(normed.xw)
          self.assertEqual((normed.eps, normed.weight.shape), (1e-5, (24,)))


class LinearGluTest(absltest.TestCase):
  """`ops.linear_glu` off the tensor-core GEMV: act(gate) * up of the fused linear."""

  def test_formed_as_the_decoder_forms_it(self):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    w = _weight(rng, 48, 64).with_bits(3)
    for backend in (ops.Backend.REFERENCE, ops.Backend.INTERPRET):
      with ops.use_backend(backend):
        self.assertFalse(ops.fuses_glu())
        for act in (jax.nn.silu, jax.nn.relu):
          y = ops.linear(x, w)
          np.testing.assert_array_equal(
              np.asarray(ops.linear_glu(x, w, act), np.float32),
              np.asarray(act(y[..., :24]) * y[..., 24:], np.float32))


class SwitchTest(parameterized.TestCase):
  """The on/off switches of the fused decoder kernels: their default, 1/0/on/off, a
  bad value names its variable."""

  @parameterized.parameters(("FOLD_NORM_ENV", "fold_norm", True),
                            ("FUSE_RESIDUAL_ENV", "fuse_residual", True),
                            ("FUSE_GLU_ENV", "fuse_glu", True),
                            ("PDL_ENV", "pdl", True))
  def test_switch_is_checked(self, env_attr, fn_name, default):
    from unittest import mock
    from anyprec_jax.pallas import backend
    name, switch = getattr(backend, env_attr), getattr(backend, fn_name)
    with mock.patch.dict("os.environ", {}) as env:
      env.pop(name, None)
      self.assertEqual(switch(), default)
    for value, want in (("0", False), ("1", True), ("off", False), ("on", True)):
      with mock.patch.dict("os.environ", {name: value}):
        self.assertEqual(switch(), want)
    with mock.patch.dict("os.environ", {name: "yes"}):
      with self.assertRaisesRegex(ValueError, name):
        switch()


class DecodeGraphsTest(absltest.TestCase):
  """`backend.decode_compiler_options`: the environment's mode, the override, and what
  each mode asks of XLA per lowest precision (GPU answers patched in on the CPU)."""

  def test_modes(self):
    from unittest import mock
    from anyprec_jax.pallas import backend
    from anyprec_jax.pallas.mosaic import ptx
    name = backend.DECODE_GRAPHS_ENV
    without = {"xla_gpu_enable_command_buffer": backend.GRAPHS_WITHOUT_CUSTOM_CALLS}
    with mock.patch.dict("os.environ", {}) as env:
      env.pop(name, None)
      self.assertIs(backend.decode_graphs(), backend.DecodeGraphs.AUTO)
      self.assertEqual(backend.decode_compiler_options(8), {})  # CPU: XLA's defaults
      with mock.patch.object(backend, "on_gpu", return_value=True), \
           mock.patch.object(ptx, "pdl_launches", return_value=True):
        self.assertEqual(backend.decode_compiler_options(8), without)  # default: auto
        self.assertEqual(backend.decode_compiler_options(4), {})
        with backend.use_decode_graphs("all"):
          self.assertEqual(backend.decode_compiler_options(8), {})
        with backend.use_decode_graphs("no_custom_calls"):
          self.assertEqual(backend.decode_compiler_options(None), without)
        with backend.use_decode_graphs("auto"):
          self.assertEqual(backend.decode_compiler_options(None), {})
          self.assertEqual(backend.decode_compiler_options(4), {})
          self.assertEqual(backend.decode_compiler_options(5), without)
          with mock.patch.dict("os.environ", {backend.PDL_ENV: "0"}):
            self.assertEqual(backend.decode_compiler_options(8), {})
        self.assertIs(backend.decode_graphs(), backend.DecodeGraphs.AUTO)
    with mock.patch.dict("os.environ", {name: "all"}):
      self.assertIs(backend.decode_graphs(), backend.DecodeGraphs.ALL)
    with mock.patch.dict("os.environ", {name: "graphs"}):
      with self.assertRaisesRegex(ValueError, name):
        backend.decode_graphs()

  def test_smem_table_bits(self):
    from unittest import mock
    from anyprec_jax.pallas import backend
    from anyprec_jax.pallas.mosaic import gemv_tc
    name = backend.SMEM_TABLE_BITS_ENV
    with mock.patch.dict("os.environ", {}) as env:
      env.pop(name, None)
      self.assertEqual(backend.smem_table_bits(), gemv_tc.SMEM_TABLE_BITS)
    with mock.patch.dict("os.environ", {name: "4"}):
      self.assertEqual(backend.smem_table_bits(), 4)
    for bad in ("2", "x", "10"):
      with mock.patch.dict("os.environ", {name: bad}):
        with self.assertRaisesRegex(ValueError, name):
          backend.smem_table_bits()

  def test_min_bits(self):
    w = _weight(np.random.default_rng(0), 8, 40)
    tree = {"a": w.with_bits(4), "b": [w.with_bits(8), jnp.ones(3)]}
    self.assertEqual(wt.min_bits(tree), 4)
    self.assertIsNone(wt.min_bits({"a": jnp.ones(3)}))


class LinearRopeKvTest(absltest.TestCase):
  """`ops.linear_rope_kv`'s glue on the CPU: the kernel call replaced by its pure-jnp
  twin (`gemv_tc.rope_kv_reference` of the reference product), against the decoder's
  plain path (linear, apply_rope, q's scale, write_cache)."""

  def test_glue_matches_the_plain_path(self):
    from unittest import mock
    import models
    from models import decoder
    from anyprec_jax.pallas import backend, kernels
    from anyprec_jax.pallas.mosaic import gemv_tc
    cfg = models.config_from_hf({"model_type": "llama", "vocab_size": 10,
                                 "hidden_size": 64, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "num_key_value_heads": 1,
                                 "max_position_embeddings": 64})
    hd, b, slots = cfg.head_dim, 2, 10
    rng = np.random.default_rng(4)
    w = _weight(rng, 4 * hd, 64).with_bits(4)
    x = jnp.asarray(rng.normal(size=(b, 1, 64)), jnp.bfloat16)
    pos = jnp.asarray([[3], [7]], jnp.int32)
    cos, sin = decoder.rope_cos_sin(cfg, pos)
    kc = jnp.asarray(rng.normal(size=(b, slots, 1, hd)), jnp.bfloat16)
    vc = jnp.asarray(rng.normal(size=(b, slots, 1, hd)), jnp.bfloat16)

    def fake(x2, w_, rms, cos_, sin_, slots_, kc_, vc_, spec):
      self.assertIsNone(rms)
      y = ops.anyprec_matmul_reference(x2, w_).astype(jnp.float32)
      return gemv_tc.rope_kv_reference(y, cos_, sin_, slots_, kc_, vc_, spec)

    with ops.use_backend(ops.Backend.PALLAS), \
         mock.patch.dict("os.environ", {backend.FUSE_ROPE_KV_ENV: "1"}), \
         mock.patch.object(backend, "mosaic_available", return_value=True), \
         mock.patch.object(kernels, "runs_rope_kv", return_value=True), \
         mock.patch.object(kernels, "rope_kv", side_effect=fake):
      # Jitted as in a decode step (everything traced; jax 0.11 failed here once).
      q, k2, v2 = jax.jit(lambda *a: ops.linear_rope_kv(
          a[0], w, None, *a[1:], num_heads=2, num_kv_heads=1, head_dim=hd))(
              x, cos, sin, kc, vc, jnp.int32(5))
    y = ops.linear(x, w)  # [B, 1, 4 Dh] bf16 (reference backend)
    wq, wk, wv = jnp.split(y, [2 * hd, 3 * hd], axis=-1)
    wq = decoder.apply_rope(wq.reshape(b, 1, 2, hd), cos, sin)
    wq = wq * jnp.asarray(hd ** -0.5, wq.dtype)
    wk = decoder.apply_rope(wk.reshape(b, 1, 1, hd), cos, sin)
    f = lambda a: np.asarray(a, np.float32)
    np.testing.assert_array_equal(f(q), f(wq))
    np.testing.assert_array_equal(f(k2), f(decoder.write_cache(kc, wk, 5)))
    np.testing.assert_array_equal(f(v2), f(decoder.write_cache(vc, wv.reshape(b, 1, 1, hd),
                                                               5)))
    # Not the Pallas backend (or anything the kernel does not take): None, the caller's path.
    self.assertIsNone(ops.linear_rope_kv(x, w, None, cos, sin, kc, vc, 5, num_heads=2,
                                         num_kv_heads=1, head_dim=hd))


class OpsDispatchTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("decode_b3", (1, 1), 3, jnp.bfloat16, 2e-2),
      ("batch_b4", (2, 3), 4, jnp.float32, 1e-5),
      ("prefill_b8", (2, 7), 8, jnp.bfloat16, 2e-2),
      ("prefill_fp32_b3", (1, 12), 3, jnp.float32, 1e-5))
  def test_interpret_matches_reference(self, lead, bits, dtype, rtol):
    rng = np.random.default_rng(bits)
    w = _weight(rng, 72, 100).with_bits(bits)
    x = jnp.asarray(rng.standard_normal((*lead, 100)), dtype)
    bias = jnp.asarray(rng.standard_normal(72), dtype)
    with ops.use_backend(ops.Backend.INTERPRET):
      got = ops.linear(x, w, bias)
    with ops.use_backend(ops.Backend.REFERENCE):
      want = ops.linear(x, w, bias)
    self.assertEqual(got.shape, (*lead, 72))
    self.assertEqual(got.dtype, dtype)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())

  def test_precision_switch_changes_kernel(self):
    rng = np.random.default_rng(0)
    w = _weight(rng, 40, 64)
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
    with ops.use_backend(ops.Backend.INTERPRET):
      y3 = ops.linear(x, w.with_bits(3))
      y8 = ops.linear(x, w.with_bits(8))
    with ops.use_backend(ops.Backend.REFERENCE):
      np.testing.assert_allclose(y3, ops.linear(x, w.with_bits(3)), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(y8, ops.linear(x, w.with_bits(8)), rtol=1e-5, atol=1e-5)
    self.assertFalse(np.allclose(y3, y8))

  def test_jit_with_backend_at_trace_time(self):
    rng = np.random.default_rng(1)
    w = _weight(rng, 16, 40).with_bits(4)
    x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    with ops.use_backend(ops.Backend.INTERPRET):
      got = jax.jit(ops.linear)(x, w)
    want = ops.anyprec_matmul_reference(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
