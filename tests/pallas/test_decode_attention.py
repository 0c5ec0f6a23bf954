"""Decode attention (`pallas/mosaic/decode_attention.py`) against its jnp twin.

On CPU: the kernel lowers for CUDA, a numpy replay of the per-warp algorithm
(slot ranges, groups of U slots, online softmax, masks, the partials' layout) merged by
`combine_partials` equals the reference, and the in-kernel merge's split of the head
dims over CTAs and threads covers every output once. Natively (Hopper): the kernel.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import ops
from anyprec_jax.pallas import backend
from anyprec_jax.pallas.mosaic import decode_attention as da
from models import decoder

# (B, S, KVH, G, Dh): 7B MHA, GQA with ragged S, SmolLM2-like Dh = 64.
SHAPES = ((1, 384, 32, 1, 128), (2, 100, 8, 4, 128), (3, 37, 3, 3, 64))

# (C, T, D, merge, out dtype): the default launch; 12 CTAs per head with the XLA merge
# (warps with no slot); 3 CTAs (not a power of two: the XLA merge by default); a
# 2-CTA cluster merge; one CTA of 2 warpgroups (CTA merge); 8 CTAs of 4 warpgroups
# with 6 groups in flight and bf16 output.
NATIVE_LAUNCHES = ((None, None, None, None, "float32"), (12, 1, 1, "xla", "float32"),
                   (3, None, None, None, "float32"), (2, 1, 1, "kernel", "float32"),
                   (1, 2, 2, "kernel", "float32"), (8, 4, 6, "kernel", "bfloat16"))


def _inputs(seed, b, s, kvh, g, d):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, kvh * g, d)) * d ** -0.5, jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.bfloat16)
  valid = rng.random((b, s)) < 0.8
  valid[:, -1] = True  # the query's own slot
  valid[0, : s // 3] = False  # left padding
  return q, k, v, jnp.asarray(valid)


def _replay(q, k, v, valid, lay):
  """numpy twin of the kernel's partials [B, H, W, Dh + 2] (float64)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  valid = np.asarray(valid, bool)
  b_n, h_n, d = q.shape
  s_n, w_n, g_n, u_n = lay.slots, lay.warps, lay.g, lay.group
  out = np.zeros((b_n, h_n, w_n, d + 2))
  for b in range(b_n):
    for h in range(h_n):
      kvh = h // g_n
      for w in range(w_n):
        start, end = w * s_n // w_n, (w + 1) * s_n // w_n
        m, l, acc = da.INIT_MAX, 0.0, np.zeros(d)
        for g0 in range(start, end, u_n):
          idx = [s for s in range(g0, g0 + u_n) if s < end and valid[b, s]]
          sc = {s: float(q[b, h] @ k[b, s, kvh]) for s in idx}
          top = max([m, da.NEG] + list(sc.values()))
          corr = np.exp(m - top) if m > -1e38 else 0.0
          ps = {s: np.exp(sc[s] - top) for s in idx}
          l = l * corr + sum(ps.values())
          acc = acc * corr + sum((ps[s] * v[b, s, kvh] for s in idx), np.zeros(d))
          m = top
        out[b, h, w, :d], out[b, h, w, d], out[b, h, w, d + 1] = acc, m, l
  return out


class DecodeAttentionCpuTest(parameterized.TestCase):

  @parameterized.parameters(*[sh + (m,) for sh in SHAPES for m in ("kernel", "xla")])
  def test_lowers_for_cuda(self, b, s, kvh, g, d, merge):
    cfg = da.DecodeAttentionConfig(merge=merge)
    fn = jax.jit(functools.partial(da.decode_attention, cfg=cfg, out_dtype=jnp.bfloat16))
    args = (jax.ShapeDtypeStruct((b, kvh * g, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s), jnp.bool_))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters(True, False)
  def test_launch_dependents_lowers_for_cuda(self, trigger):
    cfg = da.DecodeAttentionConfig(launch_dependents=trigger)
    fn = jax.jit(functools.partial(da.decode_attention, cfg=cfg, out_dtype=jnp.bfloat16))
    args = (jax.ShapeDtypeStruct((1, 32, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 384, 32, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 384, 32, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 384), jnp.bool_))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual("griddepcontrol.launch_dependents" in text, trigger)

  @parameterized.parameters(*SHAPES)
  def test_replayed_partials_combine_to_the_reference(self, b, s, kvh, g, d):
    q, k, v, valid = _inputs(b + s, b, s, kvh, g, d)
    lay = da.make_layout(b, s, kvh, g, d, da.DecodeAttentionConfig(group=4))
    part = jnp.asarray(_replay(q, k, v, valid, lay), jnp.float32)
    got = np.asarray(da.combine_partials(part), np.float64)
    want = np.asarray(da.decode_attention_reference(q, k, v, valid), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

  def test_rejects_bad_inputs(self):
    q, k, v, valid = _inputs(0, 1, 16, 2, 2, 64)
    with self.assertRaisesRegex(ValueError, "bfloat16"):
      da.decode_attention(q.astype(jnp.float32), k, v, valid)
    with self.assertRaisesRegex(ValueError, "valid"):
      da.decode_attention(q, k, v, valid[:, :8])
    with self.assertRaisesRegex(ValueError, "head dims"):
      da.make_layout(1, 16, 2, 2, 96, da.DecodeAttentionConfig())
    lay = da.make_layout(1, 4096, 32, 1, 128, da.DecodeAttentionConfig(merge="kernel"))
    self.assertEqual((lay.ctas_per_head, lay.warpgroups, lay.cluster), (8, 1, True))
    self.assertFalse(da.make_layout(1, 384, 32, 1, 128, da.DecodeAttentionConfig(
        ctas_per_head=12)).in_kernel)  # past MAX_CLUSTER: the XLA merge
    for c in (3, 12):
      with self.assertRaisesRegex(ValueError, "in-kernel merge"):
        da.make_layout(1, 384, 32, 1, 128, da.DecodeAttentionConfig(ctas_per_head=c,
                                                                    merge="kernel"))
    with self.assertRaisesRegex(ValueError, "out_dtype"):
      da.decode_attention(q, k, v, valid, out_dtype=jnp.float16)

  def test_config_from_spec(self):
    self.assertEqual(da.config_from_spec("c4t1d6u8k"), da.DecodeAttentionConfig(
        ctas_per_head=4, warpgroups=1, depth=6, group=8, merge="kernel"))
    self.assertEqual(da.config_from_spec(""), da.DecodeAttentionConfig())
    self.assertEqual(da.config_from_spec("C12X").merge, "xla")
    for bad in ("c4z", "kx", "4c"):
      with self.assertRaisesRegex(ValueError, "spec"):
        da.config_from_spec(bad)

  @parameterized.parameters((1, 1, 1, 128), (4, 1, 1, 128), (8, 4, 8, 128), (2, 2, 3, 64),
                            (1, 4, 8, 64), (8, 1, 1, 64))
  def test_in_kernel_merge_covers_every_output_once(self, c, t, g, d):
    # The kernel's assignment. Phase 2: thread unit of each CTA -> head gi, dims
    # (dd, dd + 1) of the CTA's partial; phase 3 (C > 1): CTA r, unit -> gi, dd.
    lay = da.make_layout(1, 64, 1, g, d, da.DecodeAttentionConfig(
        ctas_per_head=c, warpgroups=t, merge="kernel"))
    cta_pairs, cta_passes, slice_pairs, slice_passes = da.merge_units(lay)
    seen = np.zeros((g, d), int)
    for unit in range(cta_passes * 128 * t):
      if unit < cta_pairs:
        gi, dd = unit // (d // 2), 2 * (unit % (d // 2))
        seen[gi, dd:dd + 2] += 1
    np.testing.assert_array_equal(seen, 1)
    if c == 1:
      return
    span = d // c
    seen[:] = 0
    for r in range(c):
      for unit in range(slice_passes * 128 * t):
        if unit < slice_pairs:
          gi, dd = unit // (span // 2), r * span + 2 * (unit % (span // 2))
          seen[gi, dd:dd + 2] += 1
    np.testing.assert_array_equal(seen, 1)

  def test_auto_launch(self):
    # (B, S, KVH) -> (C, T): C CTAs per head until every SM has one; warpgroups only
    # at C = 1 (measured: C = 8 with T = 4 is up to 1.9x slower than T = 1).
    for shape, want in (((1, 384, 32), (8, 1)), ((1, 4096, 32), (8, 1)),
                        ((8, 384, 32), (1, 4)), ((8, 96, 32), (1, 1)),
                        ((64, 384, 32), (1, 1)), ((1, 384, 24), (8, 1))):
      lay = da.make_layout(*shape, 1, 128, da.DecodeAttentionConfig())
      self.assertEqual((lay.ctas_per_head, lay.warpgroups), want, shape)
      self.assertTrue(lay.in_kernel)  # C in 1, 2, 4, 8: merged in the kernel
    self.assertFalse(da.make_layout(1, 384, 32, 1, 128, da.DecodeAttentionConfig(
        ctas_per_head=3)).in_kernel)


class DispatchTest(absltest.TestCase):

  def test_switch_is_auto_by_default_and_checked(self):
    with mock.patch.dict("os.environ", {}, clear=False) as env:
      env.pop(backend.DECODE_ATTENTION_ENV, None)
      self.assertEqual(backend.decode_attention(), "auto")
    with mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: "Mosaic"}):
      self.assertEqual(backend.decode_attention(), "mosaic")
    with mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: " XLA"}):
      self.assertEqual(backend.decode_attention(), "xla")
    with mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: "cuda"}):
      with self.assertRaisesRegex(ValueError, backend.DECODE_ATTENTION_ENV):
        backend.decode_attention()

  def test_auto_runs_the_kernel_from_the_slot_threshold(self):
    sentinel = jnp.zeros((1, 4, 64), jnp.float32)
    with mock.patch.object(backend, "is_hopper_or_newer", return_value=True), \
         mock.patch.object(da, "decode_attention", return_value=sentinel) as kernel, \
         mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: "auto"}), \
         ops.use_backend(ops.Backend.PALLAS):
      g_max, long = backend.AUTO_ATTENTION_MAX_G, backend.AUTO_ATTENTION_GQA_SLOTS
      for s, g, runs in ((backend.AUTO_ATTENTION_SLOTS - 1, 2, False),
                         (backend.AUTO_ATTENTION_SLOTS, 2, True),
                         (backend.AUTO_ATTENTION_SLOTS, g_max, True),
                         (long, g_max - 1, True), (long, g_max, False)):
        q, k, v, valid = _inputs(2, 1, s, 2, g, 64)
        self.assertEqual(ops.one_query_attention(q, k, v, valid) is sentinel, runs, (s, g))
      self.assertEqual(kernel.call_count, 3)

  def test_no_kernel_off_the_pallas_backend(self):
    q, k, v, valid = _inputs(1, 1, 16, 2, 2, 64)
    with mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: "mosaic"}):
      with ops.use_backend(ops.Backend.REFERENCE):
        self.assertIsNone(ops.one_query_attention(q, k, v, valid))


class DecodeAttentionNativeTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not backend.is_hopper_or_newer():
      self.skipTest("the Mosaic GPU decode attention needs a Hopper (sm_90+) GPU")

  @parameterized.parameters(*[sh + c for sh in SHAPES for c in NATIVE_LAUNCHES])
  def test_matches_reference(self, b, s, kvh, g, d, ctas, wgs, depth, merge, out_dtype):
    cfg = da.DecodeAttentionConfig(ctas_per_head=ctas, warpgroups=wgs, depth=depth,
                                   merge=merge)
    tol = dict(rtol=2e-2, atol=2e-2) if out_dtype == "bfloat16" else dict(rtol=2e-3,
                                                                             atol=2e-4)
    for trial in range(2):
      q, k, v, valid = _inputs(10 * trial + s, b, s, kvh, g, d)
      out = da.decode_attention(q, k, v, valid, cfg=cfg, out_dtype=out_dtype)
      self.assertEqual(out.dtype, jnp.dtype(out_dtype))
      got = np.asarray(out, np.float64)
      want = np.asarray(da.decode_attention_reference(q, k, v, valid), np.float64)
      self.assertTrue(np.isfinite(got).all())
      np.testing.assert_allclose(got, want, **tol)

  def test_decoder_attend_uses_it_when_switched_on(self):
    b, s, kvh, g, d = SHAPES[1]
    q, k, v, valid = _inputs(5, b, s, kvh, g, d)
    q4, mask = q[:, None], valid[:, None, :]  # [B, 1, H, Dh], [B, 1, S]
    want = np.asarray(decoder.attend(q4, k, v, mask), np.float32)
    with mock.patch.dict("os.environ", {backend.DECODE_ATTENTION_ENV: "mosaic"}):
      with ops.use_backend(ops.Backend.PALLAS):
        self.assertIsNotNone(ops.one_query_attention(q, k, v, valid))
        got = np.asarray(decoder.attend(q4, k, v, mask), np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)  # bf16 outputs


if __name__ == "__main__":
  absltest.main()
