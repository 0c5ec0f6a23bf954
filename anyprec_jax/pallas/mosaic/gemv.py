"""Bitplane LUT GEMV on Pallas Mosaic GPU, M = 1 (issue 15; Park et al., 2024, §4).

y[n] = sum_k x[k] * LUT_b[n, code_b(n, k)], with code_b the top b bits of the parent
code read from planes 0..b-1 ([P, N, W] uint32, bit j of word w = column 32w + j).

Work split (DESIGN.md §3, "the design that reaches the floor"):
* A CTA of T warpgroups is persistent: it copies x once into shared memory as f32 and
  its warpgroups walk groups of R consecutive rows (group g, g + T*CTAs, ...).
* Inside a warpgroup the four warps split K: in pass p lane l of warp v owns word
  w = 128p + 32v + l, i.e. 32 columns; it loads those 32 activations from shared
  memory (8 x 16-byte loads, reused for the R rows) and the b plane words of each row
  straight from global memory (a warp reads 128 contiguous bytes per plane and row).
* Codes come out of the three-round 8x8 bit transpose (`bitops.transpose8`): byte t
  of word s is the code of column 8t + s. The row's LUT sits in shared memory, so a
  weight costs a shift, an and-or (the code lands on the table's aligned base), one
  shared load (+ an f16->f32 convert) and one FMA. All lanes of a warp read the same
  row's table: conflict-free for tables of <= 32 words (b <= 6 in f16, b <= 5 in f32).
* The R LUTs of the next group are fetched into registers while the current group
  is computed and stored into the other of two shared buffers, so one named barrier
  per group orders LUT reuse and the cross-warp partial sums. Warp sums are
  butterflies; warp 0 adds the four warps' partials and stores y in f32.
* Optionally (`prefetch`) the plane words of the next pass / next group are loaded
  before the current pass is computed (software pipelining through registers).

Everything a thread does runs inside one `plgpu.inline_mgpu` (see `ptx.py`): Pallas
Mosaic GPU supplies the launch, the refs and the shared-memory allocation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

WARPGROUP = 128
WORDS_PER_PASS = 128  # 4 warps x 32 lanes, one word each
DEFAULT_SMS = 132


@dataclasses.dataclass(frozen=True)
class MosaicGemvConfig:
  """Static launch shape of the Mosaic GPU GEMV.

  rows: R, rows per group (a warpgroup owns one group at a time).
  warpgroups: T, warpgroups per CTA (128 threads each).
  ctas: grid size; None = enough CTAs for one group per warpgroup, at most one CTA
    per SM times `ctas_per_sm`.
  ctas_per_sm: CTAs resident per SM that the default grid assumes.
  lut_f32: keep the LUT as f32 in shared memory (no convert per weight; tables twice
    as wide, so bank conflicts from b = 6 on) instead of f16.
  prefetch: load the next pass's plane words before computing the current pass.
  chains: independent FMA accumulators per row (1 = one 32-long chain per pass).
  """
  rows: int = 4
  warpgroups: int = 4
  ctas: int | None = None
  ctas_per_sm: int = 1
  lut_f32: bool = False
  prefetch: bool = True
  chains: int = 4


@dataclasses.dataclass(frozen=True)
class _Layout:
  bits: int
  n: int
  k: int
  words: int  # W = ceil(K / 32)
  passes: int
  groups: int
  ctas: int
  rows: int
  warpgroups: int
  lut_f32: bool
  prefetch: bool
  chains: int
  tc_order: bool  # planes in the tensor-core bit order (plane_layout.PlaneLayout.TC)

  @property
  def esize(self) -> int:
    return 4 if self.lut_f32 else 2

  @property
  def slot(self) -> int:  # bytes of one row's table
    return (1 << self.bits) * self.esize

  @property
  def lut_buf(self) -> int:  # bytes of one buffer (R tables)
    return self.rows * self.slot

  @property
  def x_bytes(self) -> int:
    return self.passes * WORDS_PER_PASS * 32 * 4

  @property
  def red_bytes(self) -> int:  # per warpgroup: 2 buffers x 4 warps x R floats
    return 2 * 4 * self.rows * 4

  @property
  def smem_bytes(self) -> int:
    return (1024 + self.x_bytes + self.warpgroups * (2 * self.lut_buf + self.red_bytes))


def config_for(bits: int, n: int, k: int) -> MosaicGemvConfig:
  """The launch shape used by the model path (H200 gate run, notes_kernels.md)."""
  del bits, n, k
  return MosaicGemvConfig()


def num_sms() -> int:
  try:
    return int(getattr(jax.devices()[0], "core_count", DEFAULT_SMS) or DEFAULT_SMS)
  except Exception:  # pylint: disable=broad-except
    return DEFAULT_SMS


def make_layout(bits: int, n: int, k: int, cfg: MosaicGemvConfig,
                sms: int | None = None, tc_order: bool = False) -> _Layout:
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in 1..8, got {bits}")
  words = 4 * -(-k // 128) if tc_order else -(-k // 32)
  groups = -(-n // cfg.rows)
  ctas = cfg.ctas
  if ctas is None:
    ctas = min((sms or num_sms()) * cfg.ctas_per_sm, -(-groups // cfg.warpgroups))
  return _Layout(bits=bits, n=n, k=k, words=words,
                 passes=-(-words // WORDS_PER_PASS), groups=groups, ctas=max(ctas, 1),
                 rows=cfg.rows, warpgroups=cfg.warpgroups, lut_f32=cfg.lut_f32,
                 prefetch=cfg.prefetch, chains=cfg.chains, tc_order=tc_order)


def _tc_column(ptx, e):
  """Column of bit e % 32 of word e // 32 in the TC order (`plane_layout.tc_column`)."""
  w, pi = ptx.shr(e, 5), ptx.band(e, 31)
  h, t, s = ptx.shr(pi, 4), ptx.band(ptx.shr(pi, 2), 3), ptx.band(pi, 3)
  col = ptx.add(ptx.shl(ptx.shr(w, 2), 7), ptx.shl(ptx.band(w, 3), 1))
  col = ptx.add(col, ptx.add(ptx.shl(s, 5), ptx.shl(h, 4)))
  return ptx.add(col, ptx.add(ptx.band(t, 1), ptx.shl(ptx.shr(t, 1), 3)))


def _emit(x_ref, planes_ref, lut_ref, out_ref, smem_ref, *, lay: _Layout, x_dtype):
  """Per-thread body (inside `inline_mgpu`)."""
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import scf
  from anyprec_jax.pallas.mosaic import ptx

  b, n, w_total, r_rows, t_wg = lay.bits, lay.n, lay.words, lay.rows, lay.warpgroups
  nthreads = WARPGROUP * t_wg
  tid = ptx.thread_id()
  lane = ptx.band(tid, 31)
  warp = ptx.band(ptx.shr(tid, 5), 3)
  wg_lane = ptx.band(tid, 127)
  wg = ptx.shr(tid, 7)
  cta = ptx.block_id()

  xg = ptx.gmem_address(x_ref)
  pg = ptx.gmem_address(planes_ref)
  lg = ptx.gmem_address(lut_ref)
  og = ptx.gmem_address(out_ref)
  raw = ptx.smem_address(smem_ref)
  base = ptx.band(ptx.add(raw, ptx.const(1023)), ~1023 & 0xFFFFFFFF)
  xbase = base
  lut_region = ptx.add(base, ptx.const(lay.x_bytes))
  red_region = ptx.add(lut_region, ptx.const(t_wg * 2 * lay.lut_buf))

  def stage_x():
    """x -> shared memory as f32, zero past K (all loads issued before the stores)."""
    x_elems = lay.x_bytes // 4
    xsize = jnp.dtype(x_dtype).itemsize
    vals = []
    for i in range(-(-x_elems // nthreads)):
      e = ptx.add(tid, ptx.const(i * nthreads))
      col = _tc_column(ptx, e) if lay.tc_order else e  # activation meeting bit e
      addr = ptx.gaddr(xg, ptx.umin(col, lay.k - 1), xsize)
      if x_dtype == jnp.float32:
        v = ptx.ld_global_f32(addr)
      elif x_dtype == jnp.bfloat16:
        v = ptx.bf16_bits_to_f32(ptx.ld_global_u16(addr))
      else:
        v = ptx.f16_bits_to_f32(ptx.ld_global_u16(addr))
      vals.append((e, ptx.select(ptx.lt(col, lay.k), v, ptx.fconst(0.0)),
                   (i + 1) * nthreads > x_elems))
    for e, v, ragged in vals:
      if ragged:
        with ptx.If(ptx.lt(e, x_elems)):
          ptx.st_shared_f32(ptx.add(xbase, ptx.shl(e, 2)), v)
      else:
        ptx.st_shared_f32(ptx.add(xbase, ptx.shl(e, 2)), v)
    ptx.cta_sync()

  # 2. LUT staging helpers: R rows x 2^b f16 = `nwords` 32-bit words per group.
  nwords = r_rows * (1 << b) // 2
  total_words = n * (1 << b) // 2
  per_thread = -(-nwords // WARPGROUP)

  def lut_fetch(g):
    regs = []
    for j in range(per_thread):
      word = ptx.add(ptx.mul(g, ptx.const(nwords)), ptx.add(wg_lane, ptx.const(128 * j)))
      word = ptx.umin(word, total_words - 1)
      regs.append(ptx.ld_global_u32(ptx.gaddr(lg, word, 4)))
    return regs

  def lut_store(regs, buf):
    for j, v in enumerate(regs):
      idx = ptx.add(wg_lane, ptx.const(128 * j))

      def store():
        if lay.lut_f32:
          ptx.st_shared_v2_f32(ptx.add(buf, ptx.shl(idx, 3)), ptx.f16_bits_to_f32(v),
                               ptx.f16_high_to_f32(v))
        else:
          ptx.st_shared_b32(ptx.add(buf, ptx.shl(idx, 2)), v)
      if 128 * (j + 1) > nwords:
        with ptx.If(ptx.lt(idx, nwords)):
          store()
      else:
        store()

  gw = ptx.add(ptx.mul(cta, ptx.const(t_wg)), wg)
  total_wgs = lay.ctas * t_wg
  lut_wg = ptx.add(lut_region, ptx.mul(wg, ptx.const(2 * lay.lut_buf)))
  red_wg = ptx.add(red_region, ptx.mul(wg, ptx.const(lay.red_bytes)))
  bar_id = ptx.add(wg, ptx.const(1))
  wl = ptx.add(ptx.shl(warp, 5), lane)  # word of this lane within a pass

  def words_for(g, p):
    """Plane words [R][b] of group g, pass p (rows and words clamped in bounds)."""
    wc = ptx.umin(ptx.add(wl, ptx.const(WORDS_PER_PASS * p)), w_total - 1)
    out = []
    for r in range(r_rows):
      row = ptx.umin(ptx.add(ptx.mul(g, ptx.const(r_rows)), ptx.const(r)), n - 1)
      addr = ptx.gaddr(pg, ptx.add(ptx.mul(row, ptx.const(w_total)), wc), 4)
      out.append([ptx.ld_global_u32(addr, imm=pi * n * w_total * 4) for pi in range(b)])
    return out

  def x_for(p):
    xa = ptx.add(xbase, ptx.shl(ptx.add(wl, ptx.const(WORDS_PER_PASS * p)), 7))
    vals = []
    for i in range(8):
      vals += ptx.ld_shared_v4_f32(xa, imm=16 * i)
    return vals  # vals[j] = x[32 w + j]

  sh = 2 if lay.lut_f32 else 1
  code_mask = ((1 << b) - 1) << sh

  def accumulate(acc, words, xs, buf):
    """acc[r][c] += LUT values * x over this lane's 32 columns of each row.

    Per row, all 32 addresses and shared loads are emitted before the FMAs, which go
    to `chains` independent accumulators, so LDS latency overlaps and no FMA waits on
    a 32-long dependency chain.
    """
    for r in range(r_rows):
      slot = ptx.add(buf, ptx.const(r * lay.slot))
      rows8 = ptx.transpose8(words[r])
      vals = []
      for s in range(8):
        for t in range(4):
          amount = 8 * t - sh
          v = ptx.shr(rows8[s], amount) if amount > 0 else ptx.shl(rows8[s], -amount)
          off = ptx.bor(ptx.band(v, code_mask), slot)
          val = ptx.ld_shared_f32(off) if lay.lut_f32 else ptx.ld_shared_f16_as_f32(off)
          vals.append((val, xs[8 * t + s]))
      for i, (val, xv) in enumerate(vals):
        c = i % lay.chains
        acc[r][c] = ptx.fma(val, xv, acc[r][c])
    return acc

  # Prologue: the first group's plane words and LUT are in flight while x is staged.
  first = ptx.umin(gw, lay.groups - 1)
  flat0 = []
  if lay.prefetch:
    flat0 = [v for row in words_for(first, 0) for v in row]
  first_lut = lut_fetch(first)
  stage_x()
  lut_store(first_lut, lut_wg)
  ptx.bar_sync(bar_id, WARPGROUP)
  x_resident = x_for(0) if lay.passes == 1 else None

  loop = scf.ForOp(ptx.to_index(gw), ptx.to_index(ptx.const(lay.groups)),
                   ptx.to_index(ptx.const(total_wgs)), [ptx.const(0)] + flat0)
  with ir.InsertionPoint(loop.body):
    g = ptx.from_index(loop.induction_variable)
    par = loop.inner_iter_args[0]
    carried = list(loop.inner_iter_args[1:])
    buf = ptx.add(lut_wg, ptx.mul(par, ptx.const(lay.lut_buf)))
    nxt = ptx.umin(ptx.add(g, ptx.const(total_wgs)), lay.groups - 1)
    pre = lut_fetch(nxt)
    acc = [[ptx.fconst(0.0)] * lay.chains for _ in range(r_rows)]
    if lay.prefetch:
      cur = [carried[r * b:(r + 1) * b] for r in range(r_rows)]
    for p in range(lay.passes):
      if lay.prefetch:
        if p + 1 < lay.passes:
          following = words_for(g, p + 1)
        else:
          following = words_for(nxt, 0)
      else:
        cur = words_for(g, p)
      xs = x_resident if x_resident is not None else x_for(p)
      acc = accumulate(acc, cur, xs, buf)
      if lay.prefetch:
        cur = following
    other = ptx.add(lut_wg, ptx.mul(ptx.bxor(par, ptx.const(1)), ptx.const(lay.lut_buf)))
    lut_store(pre, other)
    acc = [ptx.warp_sum(_tree_sum(a)) for a in acc]
    redp = ptx.add(red_wg, ptx.mul(par, ptx.const(4 * r_rows * 4)))
    with ptx.If(ptx.eq(lane, 0)):
      wslot = ptx.add(redp, ptx.mul(warp, ptx.const(r_rows * 4)))
      for r in range(r_rows):
        ptx.st_shared_f32(wslot, acc[r], imm=4 * r)
    ptx.bar_sync(bar_id, WARPGROUP)
    with ptx.If(ptx.land(ptx.eq(warp, 0), ptx.lt(lane, r_rows))):
      tot = None
      for v in range(4):
        part = ptx.ld_shared_f32(ptx.add(redp, ptx.shl(lane, 2)), imm=v * r_rows * 4)
        tot = part if tot is None else ptx.fadd(tot, part)
      row = ptx.add(ptx.mul(g, ptx.const(r_rows)), lane)
      with ptx.If(ptx.lt(row, n)):
        ptx.st_global_f32(ptx.gaddr(og, row, 4), tot)
    nxt_flat = [v for row in cur for v in row] if lay.prefetch else []
    scf.YieldOp([ptx.bxor(par, ptx.const(1))] + nxt_flat)


def _tree_sum(vals):
  from anyprec_jax.pallas.mosaic import ptx
  while len(vals) > 1:
    vals = [ptx.fadd(vals[i], vals[i + 1]) if i + 1 < len(vals) else vals[i]
            for i in range(0, len(vals), 2)]
  return vals[0]


def gemv_reference(x: jax.Array, planes: jax.Array, lut: jax.Array, *, bits: int,
                   in_features: int, tc_order: bool = False) -> jax.Array:
  """Pure-jnp twin: [M, K] x W_b^T -> [M, N] f32."""
  from anyprec_jax.weight import AnyPrecWeight, PlaneLayout, dequantize
  w = AnyPrecWeight(planes, {bits: lut}, in_features, bits,
                    PlaneLayout.TC if tc_order else PlaneLayout.FORMAT)
  wd = dequantize(w, bits, jnp.float32)
  return jnp.dot(x.astype(jnp.float32), wd.T, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("bits", "cfg", "tc_order"))
def gemv(x: jax.Array, planes: jax.Array, lut: jax.Array, *, bits: int,
         cfg: MosaicGemvConfig = MosaicGemvConfig(), tc_order: bool = False) -> jax.Array:
  """y = x @ W_b^T for one activation row on Mosaic GPU.

  Args:
    x: [1, K] activations (bf16, f16 or f32).
    planes: uint32 [P, N, ceil(K/32)], P >= bits; only planes 0..bits-1 are read.
    lut: [N, 2^bits] (f16; other float dtypes are converted first).
    bits: precision b (static).
    cfg: launch shape (static).
    tc_order: the planes are in the tensor-core bit order (`plane_layout`), with
      4 ceil(K/128) words per row.

  Returns:
    [1, N] float32.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  m, k = x.shape
  if m != 1:
    raise ValueError(f"the Mosaic GPU GEMV takes one activation row, got M={m}")
  p, n, words = planes.shape
  want = 4 * -(-k // 128) if tc_order else -(-k // 32)
  if p < bits or words != want:
    raise ValueError(f"planes {planes.shape} do not hold {bits} planes of K={k}")
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape}, expected {(n, 1 << bits)}")
  if lut.dtype != jnp.float16:
    lut = lut.astype(jnp.float16)
  if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    x = x.astype(jnp.float32)
  lay = make_layout(bits, n, k, cfg, tc_order=tc_order)

  body = ptx.thread_body(functools.partial(_emit, lay=lay, x_dtype=x.dtype))
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((n,), jnp.float32),
      scratch_types=[plgpu.SMEM((lay.smem_bytes // 4,), jnp.int32)],
      grid=(lay.ctas,), grid_names=("cta",), num_threads=lay.warpgroups,
      thread_name="wg")
  return kernel(x.reshape(k), planes, lut)[None, :]
