"""Tensor-core bitplane GEMV for b <= 4 and M = 1..8 on Pallas Mosaic GPU (issue 15).

y[m, n] = sum_k x[m, k] * LUT_b[n, code_b(n, k)], planes in the tensor-core bit order
of `tc_layout.py`.

* A CTA owns RT tiles of 16 rows; its 4T warps split the K blocks (128 columns each).
* Lane (g, q) keeps the LUTs of its rows g and g + 8 of every tile in registers as byte
  tables (low bytes and high bytes of the 2^b 16-bit values), so a look-up of four codes
  is one `prmt` per byte table (b = 3; b = 4 adds one `prmt` to pick between the two
  halves of 8 entries) and two `prmt` interleave the bytes into the two A registers of
  a k16 step (`tc_layout` puts the codes there in register order).
* Per block a lane loads one word per plane and row and its B fragments (activations;
  rows g >= M are zero) straight from global memory, both one block ahead.
* The products run on `mma.sync.m16n8k16` with f32 accumulators: the activations are
  the N = 8 side, so M = 1..8 cost the same. With bf16 activations the LUT values are
  rounded to bf16 once per tile (the model's own precision); with f16, f16 exactly.
* Partial sums of the 4T warps are added through shared memory; y is stored in f32.

Everything a thread does is inside one `plgpu.inline_mgpu` (see `ptx.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from anyprec_jax import plane_layout as tc_layout

WARPGROUP = 128
MAX_M = 8
TARGET_WARPS = 132 * 32


@dataclasses.dataclass(frozen=True)
class TcGemvConfig:
  """Static launch shape.

  row_tiles: RT, 16-row tiles per CTA (B fragments are shared by the RT tiles).
  warpgroups: T, warpgroups per CTA (4T warps split K); None = from the shape.
  prefetch: load the next block's plane words and activations before decoding the
    current one (software pipelining through registers).
  """
  row_tiles: int = 2
  warpgroups: int | None = None
  prefetch: bool = True


@dataclasses.dataclass(frozen=True)
class _Layout:
  bits: int
  m: int
  n: int
  k: int
  blocks: int  # KB
  row_tiles: int
  warpgroups: int
  ctas: int
  prefetch: bool
  mma_dtype: str

  @property
  def warps(self) -> int:
    return 4 * self.warpgroups

  @property
  def smem_bytes(self) -> int:
    return self.warps * self.row_tiles * 32 * 16 + 16


def config_for(bits: int, m: int, n: int, k: int) -> TcGemvConfig:
  """Launch shape of the model path (H200 run 5, benchmarks/results/kernels_mosaic.md):
  one warpgroup per CTA for N > 8192 (many CTAs), else the shape's default."""
  del bits, m, k
  return TcGemvConfig(warpgroups=1) if n > 8192 else TcGemvConfig()


def make_layout(bits: int, m: int, n: int, k: int, cfg: TcGemvConfig,
                x_dtype) -> _Layout:
  if bits not in (3, 4):
    raise ValueError(f"the tensor-core GEMV handles 3 and 4 bits, got {bits}")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"the tensor-core GEMV takes 1..{MAX_M} activation rows, got {m}")
  blocks = -(-k // tc_layout.BLOCK)
  ctas = -(-n // (16 * cfg.row_tiles))
  t = cfg.warpgroups
  if t is None:
    t = max(1, min(4, -(-TARGET_WARPS // (4 * ctas)), max(1, blocks // 4)))
  mma = "f16" if jnp.dtype(x_dtype) == jnp.float16 else "bf16"
  return _Layout(bits=bits, m=m, n=n, k=k, blocks=blocks, row_tiles=cfg.row_tiles,
                 warpgroups=t, ctas=ctas, prefetch=cfg.prefetch, mma_dtype=mma)


def _field_words(ptx, words, bits):
  """C_s, s = 0..3: nibble t = code of word bit 4t + s (`bitops.field_words`)."""
  out = []
  for s in range(4):
    acc = None
    for i, w in enumerate(words):
      j = bits - 1 - i  # plane 0 is the code's MSB
      amount = s - j
      v = ptx.shr(w, amount) if amount > 0 else ptx.shl(w, -amount)
      term = ptx.band(v, (0x11111111 << j) & 0xFFFFFFFF)
      acc = term if acc is None else ptx.bor(acc, term)
    out.append(acc)
  return out


def _emit(x_ref, planes_ref, lut_ref, out_ref, smem_ref, *, lay: _Layout):
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import scf
  from anyprec_jax.pallas.mosaic import ptx

  b, n, k, m, rt_n = lay.bits, lay.n, lay.k, lay.m, lay.row_tiles
  w_tc = 4 * lay.blocks
  nw = lay.warps
  tid = ptx.thread_id()
  lane = ptx.band(tid, 31)
  warp = ptx.shr(tid, 5)
  g = ptx.shr(lane, 2)
  q = ptx.band(lane, 3)
  cta = ptx.block_id()
  xg, pg, lg, og = (ptx.gmem_address(r) for r in (x_ref, planes_ref, lut_ref, out_ref))
  red = ptx.band(ptx.add(ptx.smem_address(smem_ref), ptx.const(15)), ~15 & 0xFFFFFFFF)
  row0 = ptx.mul(cta, ptx.const(16 * rt_n))
  rows = []  # per tile: (row g, row g + 8), clamped
  for rt in range(rt_n):
    ra = ptx.add(row0, ptx.add(g, ptx.const(16 * rt)))
    rows.append((ptx.umin(ra, n - 1), ptx.umin(ptx.add(ra, ptx.const(8)), n - 1)))

  # Byte tables of each row's LUT (lo bytes, hi bytes), 2 (b=3) or 4 (b=4) regs each.
  def tables(row):
    addr = ptx.gaddr(lg, row, 2 << b)
    h = ptx.ld_global_v4_u32(addr)
    if b == 4:
      h += ptx.ld_global_v4_u32(ptx.gaddr(lg, row, 2 << b, extra=16))
    if lay.mma_dtype == "bf16":
      h = [ptx.f16x2_to_bf16x2(v) for v in h]
    lo = [ptx.prmt(h[i], h[i + 1], 0x6420) for i in range(0, len(h), 2)]
    hi = [ptx.prmt(h[i], h[i + 1], 0x7531) for i in range(0, len(h), 2)]
    return lo, hi

  tabs = [(tables(ra), tables(rb)) for ra, rb in rows]

  def lookup(tab, sel):
    lo, hi = tab
    if b == 3:
      l = ptx.prmt(lo[0], lo[1], sel)
      hh = ptx.prmt(hi[0], hi[1], sel)
    else:
      sl = ptx.band(sel, 0x7777)
      s2 = ptx.bor(ptx.band(ptx.shr(sel, 1), 0x4444), ptx.const(0x3210))
      l = ptx.prmt(ptx.prmt(lo[0], lo[1], sl), ptx.prmt(lo[2], lo[3], sl), s2)
      hh = ptx.prmt(ptx.prmt(hi[0], hi[1], sl), ptx.prmt(hi[2], hi[3], sl), s2)
    return ptx.prmt(l, hh, 0x5140), ptx.prmt(l, hh, 0x7362)

  def words_for(blk):
    """[RT][2][b] plane words of block `blk` for this lane's rows."""
    col = ptx.add(ptx.shl(blk, 2), q)
    out = []
    for ra, rb in rows:
      pair = []
      for r in (ra, rb):
        addr = ptx.gaddr(pg, ptx.add(ptx.mul(r, ptx.const(w_tc)), col), 4)
        pair.append([ptx.ld_global_u32(addr, imm=pi * n * w_tc * 4) for pi in range(b)])
      out.append(pair)
    return out

  xm = ptx.umin(g, m - 1)
  g_valid = ptx.lt(g, m)
  zero = ptx.const(0)
  ragged_k = k % tc_layout.BLOCK != 0

  def b_frags(blk):
    """[8][2] B registers (two x values each) of block `blk`; 0 for rows >= M."""
    out = []
    for st in range(8):
      regs = []
      for off in (0, 8):
        kk = ptx.add(ptx.add(ptx.shl(blk, 7), ptx.shl(q, 1)), ptx.const(16 * st + off))
        kc = ptx.umin(kk, k - 2) if ragged_k else kk
        addr = ptx.gaddr(xg, ptx.add(ptx.mul(xm, ptx.const(k)), kc), 2)
        v = ptx.ld_global_u32(addr)
        ok = ptx.lt(kk, k) if ragged_k else None
        if ok is not None:
          v = ptx.select(ok, v, zero)
        regs.append(ptx.select(g_valid, v, zero))
      out.append(regs)
    return out

  start = ptx.udiv(ptx.mul(warp, ptx.const(lay.blocks)), nw)
  end = ptx.udiv(ptx.mul(ptx.add(warp, ptx.const(1)), ptx.const(lay.blocks)), nw)
  last = ptx.select(ptx.lt(start, end), ptx.add(end, ptx.const(-1)), start)
  acc0 = [ptx.fconst(0.0)] * (4 * rt_n)
  flat = lambda ws: [v for tile in ws for pair in tile for v in pair]
  flat_b = lambda bf: [v for st in bf for v in st]
  first = ptx.umin(start, lay.blocks - 1)
  pre0 = (flat(words_for(first)) + flat_b(b_frags(first))) if lay.prefetch else []
  nwords = rt_n * 2 * b

  loop = scf.ForOp(ptx.to_index(start), ptx.to_index(end), ptx.to_index(ptx.const(1)),
                   acc0 + pre0)
  with ir.InsertionPoint(loop.body):
    blk = ptx.from_index(loop.induction_variable)
    carried = list(loop.inner_iter_args)
    acc = carried[:4 * rt_n]
    if lay.prefetch:
      it = iter(carried[4 * rt_n:4 * rt_n + nwords])
      cur = [[[next(it) for _ in range(b)] for _ in range(2)] for _ in range(rt_n)]
      itb = iter(carried[4 * rt_n + nwords:])
      bf = [[next(itb), next(itb)] for _ in range(8)]
      following = ptx.umin(ptx.add(blk, ptx.const(1)), last)
      nxt = words_for(following)
      nxt_b = b_frags(following)
    else:
      cur = words_for(blk)
      bf = b_frags(blk)
    for rt in range(rt_n):
      cw = [_field_words(ptx, cur[rt][0], b), _field_words(ptx, cur[rt][1], b)]
      a_acc = acc[4 * rt:4 * rt + 4]
      for st in range(8):
        s, h = st // 2, st % 2
        regs = []
        for half in range(2):  # row g, row g + 8
          sel = cw[half][s] if h == 0 else ptx.shr(cw[half][s], 16)
          regs.append(lookup(tabs[rt][half], sel))
        a_regs = [regs[0][0], regs[1][0], regs[0][1], regs[1][1]]
        a_acc = ptx.mma_m16n8k16(a_regs, bf[st], a_acc, lay.mma_dtype)
      acc[4 * rt:4 * rt + 4] = a_acc
    scf.YieldOp(acc + ((flat(nxt) + flat_b(nxt_b)) if lay.prefetch else []))
  acc = list(loop.results[:4 * rt_n])

  # Cross-warp sum through shared memory: red[warp][rt][lane][4].
  for rt in range(rt_n):
    slot = ptx.add(red, ptx.shl(ptx.add(ptx.mul(warp, ptx.const(rt_n * 32)),
                                        ptx.add(ptx.const(32 * rt), lane)), 4))
    ptx.st_shared_v4_f32(slot, acc[4 * rt:4 * rt + 4])
  ptx.cta_sync()
  nthreads = WARPGROUP * lay.warpgroups
  elems = rt_n * 32 * 4
  for base in range(0, elems, nthreads):
    e = ptx.add(tid, ptx.const(base))
    with ptx.If(ptx.lt(e, elems)):
      tot = None
      for w in range(nw):
        v = ptx.ld_shared_f32(ptx.add(red, ptx.shl(e, 2)), imm=w * elems * 4)
        tot = v if tot is None else ptx.fadd(tot, v)
      rt = ptx.shr(e, 7)
      ln = ptx.band(ptx.shr(e, 2), 31)
      c = ptx.band(e, 3)
      row = ptx.add(ptx.add(row0, ptx.shl(rt, 4)),
                    ptx.add(ptx.shr(ln, 2), ptx.shl(ptx.shr(c, 1), 3)))
      mm = ptx.add(ptx.shl(ptx.band(ln, 3), 1), ptx.band(c, 1))
      ok = ptx.land(ptx.lt(row, n), ptx.lt(mm, m))
      with ptx.If(ok):
        ptx.st_global_f32(ptx.gaddr(og, ptx.add(ptx.mul(mm, ptx.const(n)), row), 4), tot)


def gemv_tc_reference(x, planes_tc, lut, *, bits: int, in_features: int):
  """Pure-jnp twin: planes in tensor-core order -> [M, N] f32."""
  from anyprec_jax.pallas.mosaic.gemv import gemv_reference
  return gemv_reference(x, tc_layout.from_tc(planes_tc, in_features), lut, bits=bits,
                        in_features=in_features)


@functools.partial(jax.jit, static_argnames=("bits", "cfg"))
def gemv_tc(x: jax.Array, planes_tc: jax.Array, lut: jax.Array, *, bits: int,
            cfg: TcGemvConfig = TcGemvConfig()) -> jax.Array:
  """y = x @ W_b^T on the tensor cores, b in {3, 4}.

  Args:
    x: [M, K] activations, M <= 8 (bf16 or f16; others are cast to bf16).
    planes_tc: uint32 [P, N, tc_layout.num_words(K)] in tensor-core order, P >= bits.
    lut: [N, 2^bits] f16 (other dtypes are converted first).
    bits: 3 or 4 (static).
    cfg: launch shape (static).

  Returns:
    [M, N] float32.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = x.shape
  p, n, words = planes_tc.shape
  if p < bits or words != tc_layout.num_words(k):
    raise ValueError(f"planes {planes_tc.shape} are not {bits} tensor-core-order planes "
                     f"of K={k} (expected {tc_layout.num_words(k)} words per row)")
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape}, expected {(n, 1 << bits)}")
  if k % 2:
    raise ValueError(f"K must be even for the tensor-core GEMV, got {k}")
  if lut.dtype != jnp.float16:
    lut = lut.astype(jnp.float16)
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.bfloat16)
  lay = make_layout(bits, m, n, k, cfg, x.dtype)

  def body(x_ref, planes_ref, lut_ref, out_ref, smem_ref):
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 5)
    def emit(ctx, xr, pr, lr, orf, sr):
      del ctx
      _emit(xr, pr, lr, orf, sr, lay=lay)
    emit(x_ref, planes_ref, lut_ref, out_ref, smem_ref)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      scratch_types=[plgpu.SMEM((lay.smem_bytes // 4,), jnp.int32)],
      grid=(lay.ctas,), grid_names=("cta",), num_threads=lay.warpgroups,
      thread_name="wg")
  return kernel(x, planes_tc, lut)
