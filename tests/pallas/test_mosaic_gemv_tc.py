"""Tensor-core GEMV (b <= 4, M <= 8): bit order, lane-level decode, lowering, GPU runs.

`TcLayoutTest` checks the plane re-ordering round trip. `TcDecodeEmulationTest` replays
the kernel's per-lane decode (field words, `prmt` byte tables, A-register interleave) in
numpy and checks every A-fragment element against the dense weight: the bit order, the
selectors and the register order are verified on CPU. `TcLoweringTest` builds the
kernel for CUDA on any machine; `TcGemvTest` runs it natively on Hopper.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax import format as fmt
from anyprec_jax import ops
from anyprec_jax import weight as wt
from anyprec_jax.pallas import backend, bitops
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax.pallas.mosaic import gemv_tc as gt
from anyprec_jax import plane_layout as tc_layout
from tests import slow


def _prmt(a, b, sel):
  """prmt.b32 as the hardware does it (`bitops` emulation), as numpy uint32."""
  return np.asarray(bitops.prmt(np.asarray(a, np.uint32), np.asarray(b, np.uint32),
                                np.asarray(sel, np.uint32)), np.uint32)


def _field_words(words, bits):
  """The kernel's C_0..C_3 through the shared `bitops.field_words`."""
  places = [bits - 1 - i for i in range(bits)]  # plane 0 is the code's MSB
  return [np.asarray(bitops.field_words(list(words), places, s), np.uint32)
          for s in range(4)]


def _select_words(w0):
  """split4's half-select selectors: plane 0 at nibble bit 2 over 0x3210 (both halves)."""
  return [np.asarray(bitops.field_words([w0], [2], s), np.uint32) | np.uint32(gt.SELECT_BASE)
          for s in range(4)]


def _lookup(lo, hi, sel, bits, s2=None):
  if bits == 3:
    l, h = _prmt(lo[0], lo[1], sel), _prmt(hi[0], hi[1], sel)
  else:
    sel = np.asarray(sel, np.uint32)
    sl = sel & np.uint32(0x7777) if s2 is None else sel
    if s2 is None:
      s2 = ((sel >> np.uint32(1)) & np.uint32(0x4444)) | np.uint32(0x3210)
    l = _prmt(_prmt(lo[0], lo[1], sl), _prmt(lo[2], lo[3], sl), s2)
    h = _prmt(_prmt(hi[0], hi[1], sl), _prmt(hi[2], hi[3], sl), s2)
  return _prmt(l, h, 0x5140), _prmt(l, h, 0x7362)


def _halves(reg):
  reg = np.asarray(reg, np.uint32)
  lo = (reg & np.uint32(0xFFFF)).astype(np.uint16).view(np.float16)
  hi = (reg >> np.uint32(16)).astype(np.uint16).view(np.float16)
  return lo, hi


class TcLayoutTest(parameterized.TestCase):

  @parameterized.parameters(64, 128, 1000, 4096)
  def test_round_trip(self, k):
    rng = np.random.default_rng(k)
    codes = rng.integers(0, 256, size=(5, k))
    planes = jnp.asarray(fmt.pack_bitplanes(codes, 8))
    tc = tc_layout.to_tc(planes, k)
    self.assertEqual(tc.shape, (8, 5, tc_layout.num_words(k)))
    np.testing.assert_array_equal(np.asarray(tc_layout.from_tc(tc, k)), np.asarray(planes))

  def test_tile_puts_a_lanes_two_words_side_by_side(self):
    p, n, k = 2, 48, 384  # 3 tiles, 3 blocks
    tc = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, (p, n, 12), np.uint32))
    tiled = tc_layout.tile(tc)
    np.testing.assert_array_equal(np.asarray(tc_layout.untile(tiled)), np.asarray(tc))
    flat = np.asarray(tiled).reshape(p, -1)
    kb = k // 128
    for t, blk, lane, h in ((0, 0, 0, 0), (2, 1, 13, 1), (1, 2, 31, 0), (2, 2, 7, 1)):
      g, q = divmod(lane, 4)
      self.assertEqual(flat[1, ((t * kb + blk) * 32 + lane) * 2 + h],
                       np.asarray(tc)[1, 16 * t + 8 * h + g, 4 * blk + q])
    with self.assertRaisesRegex(ValueError, "N % 16"):
      tc_layout.tile(tc[:, :40])

  def test_weight_layouts_round_trip(self):
    rng = np.random.default_rng(3)
    for n in (48, 40):  # 40 rows cannot be tiled: TC instead
      w = _tc_weight(rng, n, 200, 5)
      tiled = w.with_layout(PlaneLayout.TC_TILED)
      self.assertIs(tiled.layout, PlaneLayout.TC_TILED if n == 48 else PlaneLayout.TC)
      np.testing.assert_array_equal(np.asarray(wt.dequantize(tiled)),
                                    np.asarray(wt.dequantize(w)))
      back = tiled.with_layout(PlaneLayout.FORMAT)
      np.testing.assert_array_equal(np.asarray(back.planes), np.asarray(w.planes))

  def test_block_columns_is_a_permutation(self):
    cols = tc_layout.block_columns()
    self.assertEqual(sorted(cols.ravel().tolist()), list(range(128)))


class TcDecodeEmulationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "gpu":  # native time (issue 15 item 7): 5-9 s a case there
      self.skipTest("CPU emulation of the decode; on a GPU the native tests run the kernel")

  @parameterized.parameters((3, False), (4, False), (4, True))
  def test_a_fragments_equal_dense_weights(self, bits, split4):
    rng = np.random.default_rng(bits)
    n, k = 16, 256
    codes = rng.integers(0, 1 << bits, size=(n, k))
    lut = rng.normal(size=(n, 1 << bits)).astype(np.float16)
    dense = np.take_along_axis(lut, codes, 1)  # [N, K]
    planes = fmt.pack_bitplanes(codes << (8 - bits), 8)  # parent 8, top b bits = code
    tc = np.asarray(tc_layout.to_tc(jnp.asarray(planes), k))
    lane = np.arange(32)
    g, q = lane // 4, lane % 4
    lut_bits = lut.view(np.uint16).astype(np.uint32)  # [N, 2^b]

    def tables(row):
      h = lut_bits[row]  # [32 lanes, 2^b]
      pairs = [h[:, i] | (h[:, i + 1] << np.uint32(16)) for i in range(0, h.shape[1], 2)]
      lo = [_prmt(pairs[i], pairs[i + 1], 0x6420) for i in range(0, len(pairs), 2)]
      hi = [_prmt(pairs[i], pairs[i + 1], 0x7531) for i in range(0, len(pairs), 2)]
      return lo, hi

    tab = [tables(g), tables(g + 8)]
    for blk in range(k // 128):
      words = [[tc[p, r, 4 * blk + q] for p in range(bits)] for r in (g, g + 8)]
      if split4:  # planes 1..3 as a 3-bit code, plane 0 as the half select
        cw = [_field_words(w[1:], 3) for w in words]
        sw = [_select_words(w[0]) for w in words]
      else:
        cw = [_field_words(w, bits) for w in words]
      for st in range(8):
        s, h = st // 2, st % 2
        regs = []
        for half in range(2):
          sel = cw[half][s] if h == 0 else cw[half][s] >> np.uint32(16)
          s2 = None
          if split4:
            s2 = (sw[half][s] if h == 0 else sw[half][s] >> np.uint32(16)) & np.uint32(0xFFFF)
          regs.append(_lookup(*tab[half], sel & np.uint32(0xFFFF), bits, s2))
        # A registers: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
        a = [regs[0][0], regs[1][0], regs[0][1], regs[1][1]]
        base = 128 * blk + 16 * st + 2 * q
        for reg, rows, cols in ((a[0], g, base), (a[1], g + 8, base),
                                (a[2], g, base + 8), (a[3], g + 8, base + 8)):
          lo, hi = _halves(reg)
          np.testing.assert_array_equal(lo, dense[rows, cols])
          np.testing.assert_array_equal(hi, dense[rows, cols + 1])


class SharedTableDecodeEmulationTest(parameterized.TestCase):
  """b >= 5 (3-4 with `smem_tables`): transpose, `prmt` addresses into the shared
  tables, slot layout, packing."""

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "gpu":  # native time (issue 15 item 7): 5-9 s a case there
      self.skipTest("CPU emulation of the decode; on a GPU the native tests run the kernel")

  @parameterized.parameters(3, 4, 5, 6, 8)
  def test_a_fragments_equal_dense_weights(self, bits):
    rng = np.random.default_rng(bits)
    rt_n, k = 2, 256
    n = 16 * rt_n
    codes = rng.integers(0, 1 << bits, size=(n, k))
    lut = rng.normal(size=(n, 1 << bits)).astype(np.float16)
    dense = np.take_along_axis(lut, codes, 1)  # [N, K]
    planes = fmt.pack_bitplanes(codes << (8 - bits), 8)
    tc = np.asarray(tc_layout.to_tc(jnp.asarray(planes), k))
    lut_bits = lut.view(np.uint16).astype(np.uint32)
    # The shared image as the fill writes it: slot (tile, e, lane) = (row g, row g + 8).
    smem = np.zeros(gt.table_bytes(bits, rt_n) // 4, np.uint32)
    for tile in range(rt_n):
      for e in range(1 << bits):
        for ln in range(32):
          r = 16 * tile + ln // 4
          smem[gt.slot_offset(bits, tile, e, ln) // 4] = (
              lut_bits[r, e] | (lut_bits[r + 8, e] << np.uint32(16)))
    lane = np.arange(32)
    g, q = lane // 4, lane % 4
    for rt in range(rt_n):
      lane_base = (4 * lane + 128 * (rt % 2)).astype(np.uint32)
      pair_base = (rt // 2) * (1 << bits) * gt.SLOT_STRIDE
      for blk in range(k // 128):
        cw = []
        for r in (16 * rt + g, 16 * rt + g + 8):
          words = [jnp.asarray(tc[p, r, 4 * blk + q]) for p in range(bits)]
          cw.append([np.asarray(w, np.uint32) for w in bitops.transpose8(words)])
        for st in range(8):
          vals = []
          for half in range(2):
            v = []
            for t in range(4):
              sw, tb = gt.code_place(st, t)
              off = _prmt(cw[half][sw], lane_base, gt.address_selector(tb))
              v.append(smem[(pair_base + off) // 4])
            vals.append(v)
          a = [_prmt(vals[0][0], vals[0][1], gt.PACK_LOW),
               _prmt(vals[1][0], vals[1][1], gt.PACK_HIGH),
               _prmt(vals[0][2], vals[0][3], gt.PACK_LOW),
               _prmt(vals[1][2], vals[1][3], gt.PACK_HIGH)]
          base = 128 * blk + 16 * st + 2 * q
          for reg, rows, cols in ((a[0], g, base), (a[1], g + 8, base),
                                  (a[2], g, base + 8), (a[3], g + 8, base + 8)):
            lo, hi = _halves(reg)
            np.testing.assert_array_equal(lo, dense[16 * rt + rows, cols])
            np.testing.assert_array_equal(hi, dense[16 * rt + rows, cols + 1])

  def test_every_lane_reads_its_own_bank(self):
    for bits in (5, 8):
      for tile in range(4):
        for e in (0, 1, (1 << bits) - 1):
          banks = [(gt.slot_offset(bits, tile, e, ln) // 4) % 32 for ln in range(32)]
          self.assertEqual(banks, list(range(32)))


class RopeKvReferenceTest(absltest.TestCase):
  """`rope_kv_reference` is the decoder's own q/k/v step: bf16 linear output, RoPE
  (`models.decoder.apply_rope`), q times the bf16 scale, per-sequence cache writes."""

  def test_equals_the_decoder_ops(self):
    import models
    from models import decoder
    cfg = models.config_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 256,
                          "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 64})
    hd, m, slots = cfg.head_dim, 3, 12
    spec = gt.RopeSpec(head_dim=hd, q_rows=4 * hd, kv_rows=2 * hd, slots=slots,
                       q_scale=float(jnp.asarray(hd ** -0.5, jnp.bfloat16)))
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(m, 8 * hd)), jnp.float32)
    pos = jnp.asarray([[5], [0], [11]], jnp.int32)
    cos, sin = decoder.rope_cos_sin(cfg, pos)  # [M, 1, Dh]
    kc = jnp.asarray(rng.normal(size=(m, slots, 2, hd)), jnp.bfloat16)
    vc = jnp.asarray(rng.normal(size=(m, slots, 2, hd)), jnp.bfloat16)
    idx = pos[:, 0]
    q, k2, v2 = gt.rope_kv_reference(y, cos[:, 0, :hd // 2], sin[:, 0, :hd // 2], idx,
                                     kc, vc, spec)
    y16 = y.astype(jnp.bfloat16)[:, None]  # [M, T=1, N]
    wq, wk, wv = jnp.split(y16, [4 * hd, 6 * hd], axis=-1)
    wq = decoder.apply_rope(wq.reshape(m, 1, 4, hd), cos, sin)
    wk = decoder.apply_rope(wk.reshape(m, 1, 2, hd), cos, sin)
    wq = wq * jnp.asarray(hd ** -0.5, wq.dtype)
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(wq.reshape(m, -1), np.float32))
    np.testing.assert_array_equal(np.asarray(k2, np.float32),
                                  np.asarray(decoder.write_cache(kc, wk, idx), np.float32))
    np.testing.assert_array_equal(
        np.asarray(v2, np.float32),
        np.asarray(decoder.write_cache(vc, wv.reshape(m, 1, 2, hd), idx), np.float32))


class TcLoweringTest(parameterized.TestCase):

  @parameterized.product(bits=(3, 4, 5, 8), m=(1, 8), dtype=("bfloat16", "float16"))
  def test_lowers_for_cuda(self, bits, m, dtype):
    n, k = 1000, 4000
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits))
    args = (jax.ShapeDtypeStruct((m, k), jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters((3, 1, 0, True, True), (5, 8, 3, True, False),
                            (8, 1, 2, False, True), (4, 3, 0, False, False))
  def test_tiled_and_shared_x_lower_for_cuda(self, bits, m, stages, x_smem, early):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, stages=stages, x_smem=x_smem, early_loads=early)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=True))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    self.assertTrue(gt.make_layout(bits, m, n, k, cfg, jnp.bfloat16, True).x_smem == x_smem)

  @parameterized.parameters((3, 1, True, False), (5, 8, False, True), (4, 2, True, True))
  def test_glu_epilogue_lowers_for_cuda(self, bits, m, tiled, rms):
    n, k = 2 * 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1)
    fn = jax.jit(lambda x, p, l, nx: gt.gemv_tc(
        x, p, l, bits=bits, tiled=tiled, cfg=cfg, glu=True, norm_x=nx,
        rms_eps=1e-5 if rms else None))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    args = (x, jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16), x if rms else None)
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    with self.assertRaisesRegex(ValueError, "N % 32"):
      gt.make_layout(3, 1, 48, 128, gt.TcGemvConfig(), jnp.bfloat16, epilogue=gt.EPI_GLU)
    with self.assertRaisesRegex(ValueError, "2 row tiles"):
      gt.make_layout(3, 1, 64, 128, gt.TcGemvConfig(row_tiles=1), jnp.bfloat16,
                     epilogue=gt.EPI_GLU)
    with self.assertRaisesRegex(ValueError, "exclude"):
      gt.gemv_tc(jnp.ones((1, 16), jnp.bfloat16), jnp.ones((3, 64, 4), jnp.uint32),
                 jnp.ones((64, 8), jnp.float16), bits=3, glu=True,
                 residual=jnp.ones((1, 64), jnp.bfloat16))

  @parameterized.parameters((3, 1, True, "float32"), (5, 8, False, None),
                            (4, 2, True, "bfloat16"))
  def test_residual_epilogue_lowers_for_cuda(self, bits, m, tiled, weight_dtype):
    n, k = 1008, 4000
    fn = jax.jit(lambda x, p, l, r, w: gt.gemv_tc(x, p, l, bits=bits, tiled=tiled,
                                                  residual=r, epi_weight=w))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16),
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((n,), jnp.dtype(weight_dtype)) if weight_dtype else None)
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    x1 = jnp.ones((1, 16), jnp.bfloat16)
    p1, l1 = jnp.ones((3, 16, 4), jnp.uint32), jnp.ones((16, 8), jnp.float16)
    with self.assertRaisesRegex(ValueError, "residual"):
      gt.gemv_tc(x1, p1, l1, bits=3, residual=jnp.ones((1, 8), jnp.bfloat16))
    with self.assertRaisesRegex(ValueError, "epi_weight"):
      gt.gemv_tc(x1, p1, l1, bits=3, epi_weight=jnp.ones((16,), jnp.float32))
    with self.assertRaisesRegex(ValueError, "ksplit 1"):
      gt.make_layout(3, 1, 16, 128, gt.TcGemvConfig(ksplit=2), jnp.bfloat16,
                     epilogue=gt.EPI_RESIDUAL)

  @parameterized.parameters(True, False)
  def test_pdl_lowers_for_cuda(self, pdl):
    # The launch trigger and the wait are emitted only with pdl (the lowered module
    # holds the inline PTX text); ksplit > 1 ignores pdl.
    n, k, m, bits = 1008, 4000, 2, 3
    cfg = gt.TcGemvConfig(warpgroups=1, pdl=pdl)
    fn = jax.jit(lambda x, p, l, nx, r, w: gt.gemv_tc(
        x, p, l, bits=bits, tiled=True, cfg=cfg, norm_x=nx, rms_eps=1e-5, residual=r,
        epi_weight=w))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    args = (x, jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16), x,
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual("griddepcontrol.launch_dependents" in text, pdl)
    self.assertEqual("griddepcontrol.wait" in text, pdl)
    self.assertTrue(gt.make_layout(bits, m, n, k, cfg, jnp.bfloat16, True).pdl == pdl)
    self.assertFalse(gt.make_layout(bits, m, n, k, dataclasses.replace(cfg, ksplit=2),
                                    jnp.bfloat16, True).pdl)

  @parameterized.parameters((3, 1, True), (5, 8, False))
  def test_folded_rms_norm_lowers_for_cuda(self, bits, m, tiled):
    n, k = 1008, 4000
    fn = jax.jit(lambda x, p, l, nx: gt.gemv_tc(x, p, l, bits=bits, tiled=tiled, norm_x=nx,
                                                rms_eps=1e-5))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    args = (x, jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16), x)
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    with self.assertRaisesRegex(ValueError, "come together"):
      gt.gemv_tc(jnp.ones((1, 16), jnp.bfloat16), jnp.ones((3, 16, 4), jnp.uint32),
                 jnp.ones((16, 8), jnp.float16), bits=3, rms_eps=1e-5)
    with self.assertRaisesRegex(ValueError, "K % 8"):
      gt.make_layout(3, 1, 16, 12, gt.TcGemvConfig(), jnp.bfloat16, rms_eps=1e-5)

  @parameterized.parameters((3, 1, 2), (4, 8, 3), (8, 1, 2))
  def test_ksplit_lowers_for_cuda(self, bits, m, ksplit):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, ksplit=ksplit)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=True))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)
    self.assertIn("output_operand_alias", text)  # the zeroed output, added into

  @parameterized.parameters((3, 1, 2, False), (5, 8, 3, True), (8, 1, 2, True))
  def test_prefetch_depth_lowers_for_cuda(self, bits, m, depth, tiled):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, depth=depth)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=tiled))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters((3, 1, 1), (4, 8, 2), (5, 1, 4), (8, 3, 2))
  def test_bulk_copies_lower_for_cuda(self, bits, m, chunks):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, bulk=chunks)
    lay = gt.make_layout(bits, m, n, k, cfg, jnp.bfloat16, tiled=True)
    self.assertEqual(lay.bulk, chunks)
    self.assertEqual(lay.bulk_blocks, 8)  # 32 blocks over 4 warps
    self.assertEqual(lay.bulk_bytes, 4 * (2 * bits * 8 * 256 + 8 * chunks))
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=True))
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  def test_bulk_copies_fall_back_or_refuse(self):
    big = gt.TcGemvConfig(row_tiles=2, warpgroups=1, bulk=2)  # 8 bits, K = 32768
    self.assertEqual(gt.make_layout(8, 1, 1024, 32768, big, jnp.bfloat16, True).bulk, 0)
    with self.assertRaisesRegex(ValueError, "TC_TILED"):
      gt.make_layout(3, 1, 1024, 4096, big, jnp.bfloat16, False)
    with self.assertRaisesRegex(ValueError, "exclude"):
      gt.make_layout(3, 1, 1024, 4096, gt.TcGemvConfig(bulk=2, stages=3), jnp.bfloat16, True)

  @parameterized.parameters(False, True)
  def test_split4_lowers_for_cuda(self, tiled):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, split4=True)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=4, cfg=cfg, tiled=tiled))
    args = (jax.ShapeDtypeStruct((8, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 16), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters((3, False), (4, True))
  def test_shared_tables_at_3_4_bits_lower_for_cuda(self, bits, tiled):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=2, smem_tables=True)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=tiled))
    args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    lay = gt.make_layout(bits, 1, n, k, cfg, jnp.bfloat16, tiled)
    self.assertTrue(lay.smem_tables)
    self.assertFalse(lay.split4)
    self.assertEqual(lay.table_bytes, gt.table_bytes(bits, 2))
    self.assertFalse(gt.make_layout(bits, 1, n, k, gt.TcGemvConfig(), jnp.bfloat16,
                                    tiled).smem_tables)

  @parameterized.parameters((3, 1, True, True), (5, 4, False, False), (8, 8, True, False))
  def test_rope_kv_epilogue_lowers_for_cuda(self, bits, m, tiled, rms):
    spec = gt.RopeSpec(head_dim=128, q_rows=512, kv_rows=256, slots=40, q_scale=0.088)
    n, k = 1024, 4096
    cfg = gt.TcGemvConfig(pdl=True)
    cache = jax.ShapeDtypeStruct((m, 40, 2, 128), jnp.bfloat16)

    def fn(x, p, l, cos, sin, slots, kc, vc):
      return gt.gemv_tc_rope_kv(x, p, l, cos, sin, slots, kc, vc, bits=bits, spec=spec,
                                cfg=cfg, tiled=tiled, norm_x=x if rms else None,
                                rms_eps=1e-5 if rms else None)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16),
            jax.ShapeDtypeStruct((m, 64), jnp.float32),
            jax.ShapeDtypeStruct((m, 64), jnp.float32),
            jax.ShapeDtypeStruct((m,), jnp.int32), cache, cache)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)
    lay = gt.make_layout(bits, m, n, k, cfg, jnp.bfloat16, tiled, epilogue=gt.EPI_ROPE,
                         rope=spec)
    self.assertEqual((lay.tile_step, lay.ctas), (4, 32))
    with self.assertRaisesRegex(ValueError, "q/k/v epilogue"):
      gt.make_layout(bits, m, n + 32, k, cfg, jnp.bfloat16, tiled, epilogue=gt.EPI_ROPE,
                     rope=spec)

  @parameterized.product(bits=(3, 8), probe=("loads", "decode"))
  def test_probes_lower_for_cuda(self, bits, probe):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, probe=probe)
    fn = jax.jit(lambda x, p, l: gt.gemv_tc(x, p, l, bits=bits, cfg=cfg, tiled=True))
    args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  @parameterized.parameters((3, False), (5, True), (8, True))
  def test_dequantize_lowers_for_cuda(self, bits, tiled):
    n, k = 1008, 4000
    fn = jax.jit(lambda p, l: gt.dequantize_tc(p, l, bits=bits, in_features=k,
                                               tiled=tiled))
    args = (jax.ShapeDtypeStruct((bits, n, tc_layout.num_words(k)), jnp.uint32),
            jax.ShapeDtypeStruct((n, 1 << bits), jnp.float16))
    self.assertIn("mosaic_gpu", fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())

  def test_rejects_bad_inputs(self):
    x = jnp.ones((1, 256), jnp.bfloat16)
    lut = jnp.ones((16, 8), jnp.float16)
    with self.assertRaisesRegex(ValueError, "tensor-core-order"):
      gt.gemv_tc(x, jnp.ones((3, 16, 4), jnp.uint32), lut, bits=3)
    with self.assertRaisesRegex(ValueError, "3..8 bits"):
      gt.gemv_tc(x, jnp.ones((2, 16, 8), jnp.uint32), jnp.ones((16, 4), jnp.float16),
                 bits=2)
    with self.assertRaisesRegex(ValueError, "depth must be >= 1"):
      gt.gemv_tc(x, jnp.ones((3, 16, 8), jnp.uint32), lut, bits=3,
                 cfg=gt.TcGemvConfig(depth=0))
    with self.assertRaisesRegex(ValueError, "ksplit must be >= 1"):
      gt.gemv_tc(x, jnp.ones((3, 16, 8), jnp.uint32), lut, bits=3,
                 cfg=gt.TcGemvConfig(ksplit=0))
    with self.assertRaisesRegex(ValueError, "row_tiles must be 1 or even"):
      gt.gemv_tc(x, jnp.ones((5, 16, 8), jnp.uint32), jnp.ones((16, 32), jnp.float16),
                 bits=5, cfg=gt.TcGemvConfig(row_tiles=3))
    with self.assertRaisesRegex(ValueError, "N % 16"):
      gt.gemv_tc(x, jnp.ones((3, 24, 8), jnp.uint32), jnp.ones((24, 8), jnp.float16),
                 bits=3, tiled=True)


def _tc_weight(rng, n, k, bits):
  codes = rng.integers(0, 256, size=(n, k))
  luts = {b: rng.uniform(-2, 2, size=(n, 1 << b)).astype(np.float16) for b in range(3, 9)}
  return wt.from_codes(codes, luts, 8, bits)


class TcDispatchTest(parameterized.TestCase):
  """`ops.linear` on TC-order planes equals the format-order reference."""
  BACKEND = ops.Backend.INTERPRET
  CASES = ((3, 1), (6, 3), (4, 12))

  def setUp(self):
    super().setUp()
    if self.BACKEND is ops.Backend.PALLAS:
      if not backend.is_hopper_or_newer():
        self.skipTest("native TC dispatch is checked on Hopper")
    elif jax.default_backend() == "gpu":  # the interpreter took 25-31 s on the H100
      self.skipTest("on a GPU TcDispatchNativeTest runs these cases")

  @parameterized.parameters((PlaneLayout.TC, 40), (PlaneLayout.TC_TILED, 48))
  def test_matches_format_reference(self, layout, n):
    rng = np.random.default_rng(7)
    k = 200
    cases = self.CASES
    if layout is PlaneLayout.TC_TILED and self.BACKEND is ops.Backend.INTERPRET:
      cases = cases[:1]  # the interpreter untiles and runs the TC path: one case shows it
    for bits, m in cases:
      w = _tc_weight(rng, n, k, bits)
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
      with ops.use_backend(ops.Backend.REFERENCE):
        want = np.asarray(ops.linear(x, w), np.float64)
      w2 = w.with_layout(layout)
      self.assertIs(w2.layout, layout)
      with ops.use_backend(self.BACKEND):
        got = np.asarray(ops.linear(x, w2), np.float64)
      err = np.abs(got - want).max() / np.abs(want).max()
      self.assertLess(err, 5e-3 if self.BACKEND is ops.Backend.PALLAS else 1e-5,
                      f"{layout.value} b{bits} M={m}: {err:.3g}")


class TcDispatchNativeTest(TcDispatchTest):
  BACKEND = ops.Backend.PALLAS
  CASES = ((3, 1), (4, 5), (5, 3), (6, 1), (7, 8), (8, 6), (4, 12))  # M = 12: prefill

  def test_mosaic_prefill_matches_format_reference(self):
    rng = np.random.default_rng(9)
    n, k = 48, 200
    for bits, m in ((3, 12), (6, 20)):
      w = _tc_weight(rng, n, k, bits)
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
      with ops.use_backend(ops.Backend.REFERENCE):
        want = np.asarray(ops.linear(x, w), np.float64)
      with absltest.mock.patch.dict("os.environ", {backend.PREFILL_ENV: "mosaic"}):
        with ops.use_backend(ops.Backend.PALLAS):
          got = np.asarray(ops.linear(x, w.with_layout(PlaneLayout.TC_TILED)), np.float64)
      err = np.abs(got - want).max() / np.abs(want).max()
      self.assertLess(err, 5e-3, f"b{bits} M={m}: {err:.3g}")


class TcGemvTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not backend.is_hopper_or_newer():
      self.skipTest("the tensor-core GEMV needs a Hopper (sm_90+) GPU")

  # Every width at M = 1 and 8 on a ragged shape, the 7B down shape at both table kinds,
  # f16 activations at both (the native pallas suite must run in under 5 minutes).
  @parameterized.parameters(
      [(b, m, "bfloat16", (1000, 4000)) for b in range(3, 9) for m in (1, 8)]
      + [(b, 1, "bfloat16", (4096, 11008)) for b in (3, 8)]
      + [(b, 3, "float16", (1000, 4000)) for b in (4, 5)])
  def test_matches_reference(self, bits, m, dtype, shape):
    n, k = shape
    for trial in range(2):
      kx, kp, kl = jax.random.split(jax.random.PRNGKey(100 * bits + 10 * m + trial), 3)
      x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.dtype(dtype))
      planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
      lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
      got = np.asarray(gt.gemv_tc(x, planes, lut, bits=bits), np.float64)
      lut_ref = lut.astype(jnp.bfloat16) if dtype == "bfloat16" else lut
      want = np.asarray(gt.gemv_tc_reference(x, planes, lut_ref, bits=bits,
                                             in_features=k), np.float64)
      self.assertTrue(np.isfinite(got).all())
      err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
      self.assertLess(err, 1e-4, f"b{bits} M={m} {dtype} {shape}: {err:.3g}")

  @parameterized.parameters((4, 1, True), (3, 8, False))
  def test_shared_tables_at_3_4_bits_match_reference(self, bits, m, tiled):
    n, k = 1008, 4000
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(7 * bits + m), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    planes = tc_layout.tile(planes) if tiled else planes
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    cfg = gt.TcGemvConfig(warpgroups=2, smem_tables=True)
    got = np.asarray(gt.gemv_tc(x, planes, lut, bits=bits, cfg=cfg, tiled=tiled),
                     np.float64)
    want = np.asarray(gt.gemv_tc(x, planes, lut, bits=bits, tiled=tiled), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())

  @parameterized.parameters((3, 1, True, (4096, 4096)), (4, 8, True, (1008, 4000)),
                            (8, 3, False, (1000, 4000)))
  def test_folded_rms_norm_matches_reference(self, bits, m, tiled, shape):
    n, k = shape
    kx, kp, kl, kg = jax.random.split(jax.random.PRNGKey(bits + m), 4)
    nx = (3 * jax.random.normal(kx, (m, k), jnp.float32)).astype(jnp.bfloat16)
    x = (nx.astype(jnp.float32) * jax.random.uniform(kg, (k,), minval=0.5, maxval=1.5)
         ).astype(jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    got = np.asarray(gt.gemv_tc(x, tc_layout.tile(planes) if tiled else planes, lut,
                                bits=bits, tiled=tiled,
                                cfg=gt.config_for(bits, m, n, k, tiled=tiled),
                                norm_x=nx, rms_eps=1e-5), np.float64)
    want = np.asarray(gt.gemv_tc_rms_reference(x, planes, lut.astype(jnp.bfloat16), nx,
                                               1e-5, bits=bits, in_features=k), np.float64)
    self.assertTrue(np.isfinite(got).all())
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-4, f"b{bits} M={m}: {err:.3g}")

  @parameterized.parameters((3, 1, True, (4096, 4096), "float32"),
                            (8, 8, True, (1008, 4000), "bfloat16"),
                            (5, 3, False, (1000, 4000), None))
  def test_residual_epilogue_matches_reference(self, bits, m, tiled, shape, weight_dtype):
    with_weight = weight_dtype is not None
    n, k = shape
    kx, kp, kl, kr, kw = jax.random.split(jax.random.PRNGKey(7 * bits + m), 5)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    res = (30 * jax.random.normal(kr, (m, n), jnp.float32)).astype(jnp.bfloat16)
    ew = (jax.random.uniform(kw, (n,), minval=0.5, maxval=1.5).astype(jnp.dtype(weight_dtype))
          if with_weight else None)
    got = gt.gemv_tc(x, tc_layout.tile(planes) if tiled else planes, lut, bits=bits,
                     tiled=tiled, cfg=gt.config_for(bits, m, n, k, tiled=tiled),
                     residual=res, epi_weight=ew)
    y = gt.gemv_tc(x, tc_layout.tile(planes) if tiled else planes, lut, bits=bits,
                   tiled=tiled, cfg=gt.config_for(bits, m, n, k, tiled=tiled))
    want = gt.residual_reference(y, res, ew)  # the same sums: the epilogue's roundings
    got, want = (got, want) if with_weight else ((got,), (want,))
    for g, w_ in zip(got, want):
      self.assertEqual(g.dtype, jnp.bfloat16)
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w_, np.float32))
    ref = gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16), bits=bits, in_features=k)
    h_ref = np.asarray(gt.residual_reference(ref, res), np.float64)
    err = np.abs(np.asarray(got[0], np.float64) - h_ref).max() / np.abs(h_ref).max()
    self.assertLess(err, 1e-2, f"b{bits} M={m}: {err:.3g}")  # a bf16 ulp of h at most

  @parameterized.parameters((3, 1, True, 22016, False), (8, 8, True, 2 * 1008, True),
                            (5, 3, False, 2 * 1008, False), (4, 1, True, 2 * 4096, True))
  def test_glu_epilogue_matches_reference(self, bits, m, tiled, n, rms):
    k = 4096 if n > 4096 else 4000
    kx, kp, kl, kg = jax.random.split(jax.random.PRNGKey(3 * bits + m), 4)
    nx = (3 * jax.random.normal(kx, (m, k), jnp.float32)).astype(jnp.bfloat16)
    x = (nx.astype(jnp.float32) * jax.random.uniform(kg, (k,), minval=0.5, maxval=1.5)
         ).astype(jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    planes = tc_layout.tile(planes) if tiled else planes
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    cfg = gt.config_for(bits, m, n, k, tiled=tiled)
    extra = dict(norm_x=nx, rms_eps=1e-5) if rms else {}
    got = gt.gemv_tc(x, planes, lut, bits=bits, tiled=tiled, glu=True,
                     cfg=gt.TcGemvConfig(row_tiles=2, warpgroups=cfg.warpgroups), **extra)
    y = gt.gemv_tc(x, planes, lut, bits=bits, tiled=tiled, cfg=cfg, **extra)
    want = np.asarray(gt.glu_reference(y), np.float64)  # the same sums
    self.assertEqual((got.shape, got.dtype), ((m, n // 2), jnp.bfloat16))
    got = np.asarray(got, np.float64)
    self.assertTrue(np.isfinite(got).all())
    # ex2.approx and a bf16 rounding of silu(g): within 2 bf16 ulps of each value
    np.testing.assert_array_less(np.abs(got - want), 2.0 ** -6 * np.abs(want) + 1e-30)

  @parameterized.parameters((3, 1, True, False), (5, 8, True, True), (4, 3, False, True))
  def test_rope_kv_epilogue_matches_reference(self, bits, m, tiled, rms):
    """The fused q/k/v epilogue against `rope_kv_reference` of the plain GEMV's y:
    q and the written slots within one bf16 rounding (FMA contraction may differ),
    every other cache slot untouched (poisoned with a marker)."""
    hd, slots = 128, 24
    spec = gt.RopeSpec(head_dim=hd, q_rows=4 * hd, kv_rows=2 * hd, slots=slots,
                       q_scale=float(jnp.asarray(hd ** -0.5, jnp.bfloat16)))
    n, k = 8 * hd, 1000
    ks = jax.random.split(jax.random.PRNGKey(31 * bits + m), 6)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(ks[1], (bits, n, -(-k // 32)), jnp.uint32), k)
    planes = tc_layout.tile(planes) if tiled else planes
    lut = jax.random.normal(ks[2], (n, 1 << bits), jnp.float16)
    ang = jax.random.uniform(ks[3], (m, hd // 2), jnp.float32, 0, 6.3)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    idx = jax.random.randint(ks[4], (m,), 0, slots)
    marker = jnp.asarray(-7.5, jnp.bfloat16)
    kc = jnp.full((m, slots, 2, hd), marker)
    vc = jnp.full((m, slots, 2, hd), marker)
    norm = dict(norm_x=x, rms_eps=1e-5) if rms else {}
    cfg = gt.TcGemvConfig(pdl=True, row_tiles=2)
    q, k2, v2 = gt.gemv_tc_rope_kv(x, planes, lut, cos, sin, idx, kc, vc, bits=bits,
                                   spec=spec, cfg=cfg, tiled=tiled, **norm)
    y = gt.gemv_tc(x, planes, lut, bits=bits, tiled=tiled,
                   cfg=gt.TcGemvConfig(row_tiles=2), **norm)
    wq, wk, wv = gt.rope_kv_reference(y, cos, sin, idx, kc, vc, spec)
    f = lambda a: np.asarray(a, np.float32)
    tol = 2 ** -7 * np.abs(f(wq)).max()
    np.testing.assert_allclose(f(q), f(wq), rtol=2 ** -7, atol=tol)
    for got, want in ((k2, wk), (v2, wv)):
      got, want = f(got), f(want)
      written = np.zeros(got.shape, bool)
      written[np.arange(m), np.asarray(idx)] = True
      np.testing.assert_array_equal(got[~written], -7.5)
      np.testing.assert_allclose(got[written], want[written], rtol=2 ** -7,
                                 atol=2 ** -7 * np.abs(want[written]).max())

  def test_pdl_chain_equals_serial_chain(self):
    # The decoder's pattern, GEMV after GEMV with nothing between: each GEMV's
    # epilogue writes h and h * w, the next one reads them as its activations, folded
    # norm input and residual. Launched as programmatic dependents (each waits before
    # reading what the one before wrote), the chain must give the bits of the serial
    # chain, repeated so a missed wait would show.
    n = k = 4096
    bits, m, links = 3, 1, 6
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    planes = tc_layout.tile(tc_layout.to_tc(
        jax.random.bits(keys[0], (bits, n, k // 32), jnp.uint32), k))
    lut = (0.05 * jax.random.normal(keys[1], (n, 1 << bits))).astype(jnp.float16)
    w = jax.random.uniform(keys[2], (n,), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
    h0 = jax.random.normal(keys[3], (m, k), jnp.float32).astype(jnp.bfloat16)

    def chain(pdl):
      cfg = dataclasses.replace(gt.config_for(bits, m, n, k, tiled=True), pdl=pdl)

      @jax.jit
      def run(h):
        hw = h * w
        outs = []
        for _ in range(links):
          h, hw = gt.gemv_tc(hw, planes, lut, bits=bits, tiled=True, cfg=cfg, norm_x=h,
                             rms_eps=1e-5, residual=h, epi_weight=w)
          outs.append(h)
        return jnp.stack(outs)
      return run

    want = np.asarray(chain(False)(h0), np.float32)
    self.assertTrue(np.isfinite(want).all())
    run = chain(True)
    for _ in range(3):
      np.testing.assert_array_equal(np.asarray(run(h0), np.float32), want)

  def test_linear_glu_through_the_epilogue(self):
    rng = np.random.default_rng(11)
    w = _tc_weight(rng, 2048, 512, 3).with_layout(PlaneLayout.TC_TILED)
    x = jnp.asarray(rng.standard_normal((1, 1, 512)), jnp.bfloat16)
    normed = ops.RmsNormed(x, jnp.asarray(rng.uniform(0.5, 1.5, 512), jnp.float32), 1e-6)
    with ops.use_backend(ops.Backend.PALLAS):
      for inp in (x, normed):
        got = np.asarray(ops.linear_glu(inp, w, jax.nn.silu), np.float64)
        y = ops.linear(inp, w)
        want = np.asarray(jax.nn.silu(y[..., :1024]) * y[..., 1024:], np.float64)
        self.assertEqual(got.shape, (1, 1, 1024))
        err = np.abs(got - want).max() / np.abs(want).max()
        self.assertLess(err, 2e-2)  # bf16 roundings in a different order

  @parameterized.parameters(3, 6)
  def test_decode_step_with_the_rope_kv_epilogue(self, bits):
    """A cached decode step of a random tiny model (head_dim 32, GQA 4/4, folded norms)
    with ANYPREC_FUSE_ROPE_KV on equals it off: logits and both caches."""
    from unittest import mock
    import importlib
    gen = importlib.import_module("models.generate")  # (`models.generate`: a function)
    from anyprec_jax import latency
    cfg = latency.shape_config(latency.Shape.TINY, layers=2)
    dense = latency.random_dense_params(cfg, jnp.bfloat16)
    params = wt.set_precision(latency.random_anyprec_params(
        cfg, dense, [bits], layout=PlaneLayout.TC_TILED), bits)
    ids = jnp.asarray(np.random.default_rng(bits).integers(3, 500, (2, 7)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :2].set(0)
    with ops.use_backend(ops.Backend.PALLAS):
      state, cache = gen.prefill(cfg, params, ids, mask, cache_len=16)
      outs = []
      for on in ("0", "1"):
        with mock.patch.dict("os.environ", {backend.FUSE_ROPE_KV_ENV: on}):
          step = jax.jit(functools.partial(gen.decode_step, cfg))
          outs.append(step(params, jnp.asarray([5, 9], jnp.int32), state, cache))
    (s0, c0), (s1, c1) = outs
    f = lambda a: np.asarray(a, np.float32)
    scale = np.abs(f(s0.logits)).max()
    np.testing.assert_allclose(f(s1.logits), f(s0.logits), atol=3e-2 * scale)
    for a, b in zip(c0.k + c0.v, c1.k + c1.v, strict=True):
      np.testing.assert_allclose(f(b), f(a), atol=2e-2 * np.abs(f(a)).max())

  def test_linear_residual_through_the_epilogue(self):
    # ops.linear_residual on TC_TILED planes against x + linear, then x * w (bf16).
    rng = np.random.default_rng(9)
    w = _tc_weight(rng, 1024, 512, 3).with_layout(PlaneLayout.TC_TILED)
    x = jnp.asarray(rng.standard_normal((1, 1, 512)), jnp.bfloat16)
    res = jnp.asarray(30 * rng.standard_normal((1, 1, 1024)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 1024), jnp.float32)
    with ops.use_backend(ops.Backend.PALLAS):
      h, normed = ops.linear_residual(x, w, res, (g, 1e-6))
      want = np.asarray(res + ops.linear(x, w), np.float64)
    self.assertEqual((h.shape, h.dtype, normed.xw.dtype), (res.shape, jnp.bfloat16, jnp.bfloat16))
    ulp = 2.0 ** -7 * np.abs(want).max()  # one bf16 rounding of the sum, at most
    self.assertLess(np.abs(np.asarray(h, np.float64) - want).max(), ulp)
    xw = np.asarray(h, np.float64) * np.asarray(g, np.float64)
    self.assertLess(np.abs(np.asarray(normed.xw, np.float64) - xw).max(),
                    2.0 ** -7 * np.abs(xw).max())

  def test_folded_rms_norm_through_linear(self):
    # ops.linear(RmsNormed) on TC_TILED planes against the norm formed first (bf16).
    from unittest import mock
    rng = np.random.default_rng(7)
    w = _tc_weight(rng, 1024, 512, 3).with_layout(PlaneLayout.TC_TILED)
    x = jnp.asarray(rng.standard_normal((1, 1, 512)), jnp.bfloat16)
    normed = ops.RmsNormed(x, jnp.asarray(rng.uniform(0.5, 1.5, 512), jnp.float32), 1e-6)
    with mock.patch.dict("os.environ", {backend.FOLD_NORM_ENV: "1"}), \
        ops.use_backend(ops.Backend.PALLAS):
      self.assertTrue(ops.folds_norms())
      got = np.asarray(ops.linear(normed, w), np.float64)
      want = np.asarray(ops.linear(normed.value(), w), np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    self.assertLess(err, 2e-2)  # bf16 roundings of x * w vs x / rms * w

  @parameterized.parameters((3, 8, 2), (8, 8, 4))
  def test_plane_ring_matches_reference(self, bits, m, stages):
    n, k = 1000, 4000  # ragged N and K; warps of 1 or 2 blocks and idle ones
    cfg = gt.TcGemvConfig(warpgroups=1 if stages == 4 else None, stages=stages)
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits + 10 * m + stages), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    got = np.asarray(gt.gemv_tc(x, planes, lut, bits=bits, cfg=cfg), np.float64)
    want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16), bits=bits,
                                           in_features=k), np.float64)
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-4, f"b{bits} M={m} S={stages}: {err:.3g}")

  @parameterized.parameters(
      [(b, True, "bfloat16", (1008, 4000)) for b in (3, 4, 5, 8)]
      + [(5, False, "bfloat16", (1008, 4000))])
  def test_dequantize_matches_reference(self, bits, tiled, dtype, shape):
    n, k = shape
    rng = np.random.default_rng(bits)
    w = _tc_weight(rng, n, k, bits)
    wt_ = w.with_layout(PlaneLayout.TC_TILED if tiled else PlaneLayout.TC)
    got = np.asarray(gt.dequantize_tc(wt_.planes, wt_.luts[bits], bits=bits,
                                      in_features=k, dtype=jnp.dtype(dtype), tiled=tiled),
                     np.float32)
    want = np.asarray(wt.dequantize(w, bits, dtype=jnp.float16).astype(jnp.dtype(dtype)),
                      np.float32)
    np.testing.assert_array_equal(got, want)

  @parameterized.parameters(
      # Each mode (shared x, ring depth, M) at two widths of the two table kinds.
      [(b, m, s, xs, (1008, 4000)) for (m, s, xs), bs in (
          ((1, 0, True), (3, 8)), ((8, 0, False), (4, 5)), ((3, 3, True), (5, 3)),
          ((8, 2, True), (8, 4))) for b in bs]
      + [(3, 1, 0, False, (4096, 4096)), (8, 8, 0, False, (4096, 4096))]
      + [(5, 1, 0, False, (1008, 4000), 1), (8, 8, 0, False, (1008, 4000), 1)])
  def test_tiled_planes_match_reference(self, bits, m, stages, x_smem, shape,
                                        row_tiles=2):
    n, k = shape  # (1008, 4000): ragged K, a partial last CTA of tiles
    cfg = gt.TcGemvConfig(warpgroups=1, stages=stages, x_smem=x_smem, row_tiles=row_tiles)
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits + 10 * m + stages), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    got = np.asarray(gt.gemv_tc(x, tc_layout.tile(planes), lut, bits=bits, cfg=cfg,
                                tiled=True), np.float64)
    want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16), bits=bits,
                                           in_features=k), np.float64)
    self.assertTrue(np.isfinite(got).all())
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-4, f"b{bits} M={m} S={stages} x_smem={x_smem}: {err:.3g}")

  @slow.slow("K split over CTAs, off in the model path; native time, issue 15 item 7")
  @parameterized.parameters(
      [(3, 1, 2, 2, False), (5, 5, 3, 1, False), (8, 1, 3, 2, True),
       (4, 1, 2, 2, False)])
  def test_ksplit_matches_reference(self, bits, m, ksplit, row_tiles, x_smem):
    n, k = 1008, 4000  # ragged K: CTAs of 0..2 blocks per warp, a partial last group
    cfg = gt.TcGemvConfig(warpgroups=1, ksplit=ksplit, row_tiles=row_tiles,
                          x_smem=x_smem)
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits + 10 * m + ksplit), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    run = lambda: np.asarray(gt.gemv_tc(x, tc_layout.tile(planes), lut, bits=bits,
                                        cfg=cfg, tiled=True), np.float64)
    got = run()
    want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16), bits=bits,
                                           in_features=k), np.float64)
    self.assertTrue(np.isfinite(got).all())
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-4, f"b{bits} M={m} ksplit={ksplit}: {err:.3g}")
    if ksplit == 2:  # two partials per output: the sum does not depend on their order
      np.testing.assert_array_equal(run(), got)

  @parameterized.parameters((1, True), (8, False))
  def test_split4_matches_reference(self, m, tiled):
    n, k = 1008, 4000
    cfg = gt.TcGemvConfig(warpgroups=1, split4=True)
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(40 + m), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    planes = tc_layout.to_tc(jax.random.bits(kp, (4, n, -(-k // 32)), jnp.uint32), k)
    lut = jax.random.normal(kl, (n, 16), jnp.float16)
    arg = tc_layout.tile(planes) if tiled else planes
    got = np.asarray(gt.gemv_tc(x, arg, lut, bits=4, cfg=cfg, tiled=tiled), np.float64)
    want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16), bits=4,
                                           in_features=k), np.float64)
    err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
    self.assertLess(err, 1e-4, f"split4 M={m} tiled={tiled}: {err:.3g}")

  @slow.slow("bulk plane copies, off: slower (T27); native time, issue 15 item 7")
  @parameterized.parameters((3, 1, 2), (4, 8, 1), (5, 3, 4), (8, 1, 2))
  def test_bulk_copies_match_reference(self, bits, m, chunks):
    n = 1008  # ragged K; K = 1000 at T = 2: warps of 0 or 1 block, chunks past the range
    for k, t in ((4000, 1), (1000, 2)):
      cfg = gt.TcGemvConfig(warpgroups=t, bulk=chunks)
      self.assertEqual(gt.make_layout(bits, m, n, k, cfg, jnp.bfloat16, True).bulk, chunks)
      kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits + 10 * m + chunks + k), 3)
      x = jax.random.normal(kx, (m, k), jnp.bfloat16)
      planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
      lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
      got = np.asarray(gt.gemv_tc(x, tc_layout.tile(planes), lut, bits=bits, cfg=cfg,
                                  tiled=True), np.float64)
      want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16),
                                             bits=bits, in_features=k), np.float64)
      self.assertTrue(np.isfinite(got).all())
      err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
      self.assertLess(err, 1e-4, f"b{bits} M={m} bulk={chunks} K={k}: {err:.3g}")

  @slow.slow("deeper plane prefetch, off: slower (step 7); native time, issue 15 item 7")
  @parameterized.parameters((3, 1, 2), (8, 8, 3))
  def test_prefetch_depth_matches_reference(self, bits, m, depth):
    n = 1008  # ragged K; K = 1000 at T = 2: one block per warp, fewer than depth
    for k, tiled, t in ((4000, True, 1), (1000, True, 2), (4000, False, 2)):
      cfg = gt.TcGemvConfig(warpgroups=t, depth=depth)
      kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits + 10 * m + depth), 3)
      x = jax.random.normal(kx, (m, k), jnp.bfloat16)
      planes = tc_layout.to_tc(jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32), k)
      lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
      arg = tc_layout.tile(planes) if tiled else planes
      got = np.asarray(gt.gemv_tc(x, arg, lut, bits=bits, cfg=cfg, tiled=tiled), np.float64)
      want = np.asarray(gt.gemv_tc_reference(x, planes, lut.astype(jnp.bfloat16),
                                             bits=bits, in_features=k), np.float64)
      err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
      self.assertLess(err, 1e-4, f"b{bits} M={m} depth={depth} tiled={tiled}: {err:.3g}")


if __name__ == "__main__":
  absltest.main()
