"""Decode attention on Pallas Mosaic GPU: one query per sequence against its KV cache.

    o[b, h] = softmax_s(q[b, h] . K[b, s, h // G], masked by valid[b, s]) . V[b, s, h // G]

XLA runs this step (one query row) as multiply + reduce fusions: its dot strength
reduction turns the one-query products into reductions, which read the K and V caches
at ~0.5 TB/s on the H200, ~13 us per 7B layer at 384 slots (notes_kernels.md T28).

Here a warp owns a contiguous range of slots of one (sequence, KV head). Lane L holds
dims [E L, E L + E) (E = Dh / 32) of the G query heads of that KV head in f32, reads
its E values of each slot's key and value (one 4- or 8-byte load each; the warp reads a
slot's whole 2 Dh-byte row), forms each score with a warp all-reduce (5 shuffles) and
keeps an online softmax per head (running max, sum and weighted values, f32), a group
of U slots at a time with the next D groups' loads in flight. C CTAs of T warpgroups
share a head. By default the kernel merges the 4 T C partials of a head itself (one
launch; C > 1: a thread-block cluster, each CTA merging a slice of the head dims);
otherwise each warp writes its partial (values, max, sum) and `combine_partials`
merges them in XLA (for C other than 1, 2, 4, 8 CTAs per head).

Everything a thread does is inside one `plgpu.inline_mgpu` (see `ptx.py`), as in
`gemv_tc.py`. Twin: `decode_attention_reference` (the decoder's `attend` for T = 1).

Status (kernels_tc.md step 14, H100, GPU time, default launch with the in-kernel
merge): 7B batch 1, 384 slots 5.9 us against XLA's 13.1; 4096 slots 29.9 against 61.9;
batch 8, 384 slots ~22 against 29.3. With G = 4 query heads per KV head (8B GQA) XLA's
attention was as fast or faster on the H200 (step 13), so the decoder keeps XLA's there
(`ops.one_query_attention`, `ANYPREC_DECODE_ATTENTION`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # score of a masked slot (the decoder's value)
INIT_MAX = -3e38  # running max before any slot: exp(INIT_MAX - m) = 0 for any real m
LOG2E = 1.4426950408889634


SLOTS_PER_WARP = 24  # the default launch's aim at C = 1 (H100, kernels_tc.md step 14)
MAX_WARPS = 4096  # the default launch's cap on warps in all
MAX_CLUSTER = 8  # portable thread-block cluster size
SMS = 132  # streaming multiprocessors of the H200 (and H100 SXM)


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
  """Static launch shape.

  ctas_per_head: C, CTAs per (sequence, KV head); their 4 T C warps split the slots.
    None: from the shape (`make_layout`).
  warpgroups: T, warpgroups (4 warps each) per CTA.
  group: U, slots per step of a warp; 4 was faster than 8 in 3 of 4 shapes on the H200
    and equal in the fourth (kernels_tc.md step 9).
  depth: D >= 1, steps of U slots whose loads are in flight ahead of the one being
    computed (carried in registers). D = 1 was the step-8 kernel; with few slots per
    warp a larger D puts a warp's whole range in flight at once.
  merge: "kernel": the partials of a head are merged inside the kernel (C = 1: through
    the CTA's shared memory; C = 2, 4, 8: the C CTAs form a thread-block cluster and
    each merges a 1/C slice of the head dims, reading the other CTAs' partials with
    `ld.shared::cluster`): one launch, output in `out_dtype`. "xla": the kernel writes
    per-warp partials and `combine_partials` merges them in XLA (any C). None:
    "kernel" where C is 1, 2, 4 or 8, else "xla" (step 14, H100: native tests pass;
    7B batch 1, 384 slots 5.9 us in-kernel against 9.0 with the XLA merge).
  launch_dependents: every CTA starts with `griddepcontrol.launch_dependents`, so a
    kernel after this one that is launched as a programmatic dependent (the o_proj
    GEMV with `TcGemvConfig.pdl`) starts while this one runs and loads its weights.
  """
  ctas_per_head: int | None = None
  warpgroups: int | None = None
  group: int = 4
  depth: int | None = None
  merge: str | None = None
  launch_dependents: bool = False


def config_from_spec(spec: str) -> DecodeAttentionConfig:
  """A config from a short spec, for benchmarks: letters with values, in any order,
  c<C> t<T> d<D> u<U> and k (merge in the kernel) or x (in XLA); "" = the default.
  E.g. "c4t1d6k"."""
  import re
  fields = dict(re.findall(r"([ctdukx])(\d*)", spec.lower()))
  if "".join(k + v for k, v in re.findall(r"([ctdukx])(\d*)", spec.lower())) != \
      spec.lower() or ("k" in fields and "x" in fields):
    raise ValueError(f"bad decode-attention spec {spec!r}: want e.g. 'c4t1d6u4k'")
  num = lambda key: int(fields[key]) if fields.get(key) else None
  return DecodeAttentionConfig(
      ctas_per_head=num("c"), warpgroups=num("t"), depth=num("d"), group=num("u") or 4,
      merge="kernel" if "k" in fields else "xla" if "x" in fields else None)


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  slots: int  # S
  kv_heads: int
  g: int  # query heads per KV head
  dh: int
  ctas_per_head: int  # C
  warpgroups: int  # T
  group: int  # U
  depth: int  # D
  in_kernel: bool  # merge inside the kernel (a cluster of the head's C CTAs if C > 1)
  launch_dependents: bool = False  # DecodeAttentionConfig.launch_dependents

  @property
  def e(self) -> int:  # dims per lane
    return self.dh // 32

  @property
  def cta_warps(self) -> int:
    return 4 * self.warpgroups

  @property
  def warps(self) -> int:  # warps per (sequence, KV head)
    return self.cta_warps * self.ctas_per_head

  @property
  def ctas(self) -> int:
    return self.batch * self.kv_heads * self.ctas_per_head

  @property
  def cluster(self) -> bool:  # a cluster launch (in-kernel merge across CTAs)
    return self.in_kernel and self.ctas_per_head > 1

  @property
  def partial_floats(self) -> int:  # shared f32 of the in-kernel merge: P, then Q
    return (self.cta_warps + 1) * self.g * (self.dh + 2)


def _auto_shape(batch: int, slots: int, kv_heads: int) -> tuple[int, int]:
  """(C, T) of the default launch: C (1, 2, 4, 8) the fewest CTAs per head that give
  every SM one (132 on the H100 and H200); with C = 1, T warpgroups (<= 4) for about
  SLOTS_PER_WARP slots per warp (at most MAX_WARPS warps in all), else T = 1. Measured
  (GPU time, in-kernel merge; kernels_tc.md steps 13-14): 7B batch 1 (32 heads) C = 8,
  T = 1 was best at 384 and 4096 slots and C = 8 with T = 4 up to 1.9x slower (the
  cluster merge of 4 T C partials); batch 8 (256 heads) C = 1, T = 4 was best."""
  heads = batch * kv_heads
  c = 1
  while c < MAX_CLUSTER and heads * c < SMS:
    c *= 2
  if c > 1:
    return c, 1
  want = max(1, min(-(-slots // SLOTS_PER_WARP), MAX_WARPS // heads))  # warps per head
  return c, max(1, min(4, -(-want // 4)))


def make_layout(batch: int, slots: int, kv_heads: int, g: int, dh: int,
                cfg: DecodeAttentionConfig) -> _Layout:
  if dh not in (64, 128):
    raise ValueError(f"decode attention handles head dims 64 and 128, got {dh}")
  if not 1 <= g <= 8:
    raise ValueError(f"1..8 query heads per KV head, got {g}")
  if cfg.group < 1:
    raise ValueError(f"group must be >= 1, got {cfg.group}")
  if cfg.merge not in (None, "kernel", "xla"):
    raise ValueError(f"merge must be 'kernel' or 'xla', got {cfg.merge!r}")
  auto_c, auto_t = _auto_shape(batch, slots, kv_heads)
  c = auto_c if cfg.ctas_per_head is None else cfg.ctas_per_head
  t = (auto_t if cfg.ctas_per_head is None else 1) if cfg.warpgroups is None \
      else cfg.warpgroups
  if c < 1 or not 1 <= t <= 8:
    raise ValueError(f"ctas_per_head must be >= 1 and warpgroups 1..8, got {c}, {t}")
  mergeable = c in (1, 2, 4, 8)  # a cluster slice of the head dims: even, equal parts
  merge = cfg.merge or ("kernel" if mergeable else "xla")
  if merge == "kernel" and not mergeable:
    raise ValueError(f"an in-kernel merge needs ctas_per_head in 1, 2, 4, 8, got {c}")
  steps = -(-slots // (4 * t * c * cfg.group))  # steps of the busiest warp
  d = max(1, min(steps, 2)) if cfg.depth is None else cfg.depth
  if d < 1:
    raise ValueError(f"depth must be >= 1, got {d}")
  return _Layout(batch=batch, slots=slots, kv_heads=kv_heads, g=g, dh=dh,
                 ctas_per_head=c, warpgroups=t, group=cfg.group, depth=d,
                 in_kernel=merge == "kernel", launch_dependents=cfg.launch_dependents)


def _emit(q_ref, k_ref, v_ref, valid_ref, out_ref, *scratch, lay: _Layout):
  """The kernel body (per thread). Refs: q [B, H, Dh] bf16, k/v [B, S, KVH, Dh] bf16,
  valid [B, S] i32; with `lay.in_kernel` out [B, H, Dh] f32 or bf16 and scratch the
  CTA's partials in shared memory ([4T warps, G, Dh + 2] f32), else out
  [B, H, W, Dh + 2] f32 (values, max, sum per warp)."""
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, scf
  from anyprec_jax.pallas.mosaic import ptx

  s_n, kvh_n, g_n, dh, e, u_n = lay.slots, lay.kv_heads, lay.g, lay.dh, lay.e, lay.group
  h_n = kvh_n * g_n
  w_n = lay.warps
  words = e // 2  # 32-bit words per lane and row (bf16 pairs)
  if lay.launch_dependents:
    ptx.griddep_launch_dependents()
  tid = ptx.thread_id()
  lane = ptx.band(tid, 31)
  warp = ptx.shr(tid, 5)  # warp of the CTA, 0..4T-1
  cta = ptx.block_id()
  bh = ptx.udiv(cta, lay.ctas_per_head)  # b * KVH + kvh
  widx = ptx.add(ptx.mul(ptx.urem(cta, lay.ctas_per_head), ptx.const(lay.cta_warps)), warp)
  b = ptx.udiv(bh, kvh_n)
  kvh = ptx.urem(bh, kvh_n)
  qg, kg, vg, mg, og = (ptx.gmem_address(r) for r in (q_ref, k_ref, v_ref, valid_ref,
                                                       out_ref))
  start = ptx.udiv(ptx.mul(widx, ptx.const(s_n)), w_n)
  end = ptx.udiv(ptx.mul(ptx.add(widx, ptx.const(1)), ptx.const(s_n)), w_n)
  last = ptx.select(ptx.lt(start, end), ptx.add(end, ptx.const(-1)), start)
  lane_e = ptx.mul(lane, ptx.const(e))  # first dim of this lane

  def load_words(base64, elem):  # `words` 32-bit words at bf16 element `elem`
    addr = ptx.gaddr(base64, elem, 2)
    if words == 2:
      return list(ptx.ld_global_v2_u32(addr))
    return [ptx.ld_global_u32(addr)]

  def unpack(ws):  # bf16 pairs -> e f32 values (low half first)
    out = []
    for w in ws:
      out.append(ptx.bf16_bits_to_f32(w))
      out.append(ptx.bits_f32(ptx.band(w, ptx.const(0xFFFF0000))))
    return out

  # The lane's dims of the G query heads, f32.
  q_vals = []
  for gi in range(g_n):
    head = ptx.add(ptx.mul(kvh, ptx.const(g_n)), ptx.const(gi))
    elem = ptx.add(ptx.mul(ptx.add(ptx.mul(b, ptx.const(h_n)), head), ptx.const(dh)), lane_e)
    q_vals.append(unpack(load_words(qg, elem)))

  row_stride = kvh_n * dh  # elements between slots s and s + 1

  def group_loads(g0):
    """K words, V words and validity of slots g0 .. g0 + U - 1 (past the range: the last
    slot again, marked invalid)."""
    ks, vs, oks = [], [], []
    for u in range(u_n):
      s = ptx.add(g0, ptx.const(u))
      inside = ptx.lt(s, end)
      sc = ptx.umin(s, last)
      row = ptx.add(ptx.mul(b, ptx.const(s_n)), sc)  # b * S + s
      elem = ptx.add(ptx.add(ptx.mul(row, ptx.const(row_stride)),
                             ptx.mul(kvh, ptx.const(dh))), lane_e)
      ks.append(load_words(kg, elem))
      vs.append(load_words(vg, elem))
      ok = ptx.ld_global_u32(ptx.gaddr(mg, row, 4))
      oks.append(ptx.select(inside, ok, ptx.const(0)))
    return ks, vs, oks

  flat = lambda ks, vs, oks: [w for r in ks for w in r] + [w for r in vs for w in r] + oks
  per_group = u_n * (2 * words + 1)

  def unflat(vals):
    it = iter(vals)
    ks = [[next(it) for _ in range(words)] for _ in range(u_n)]
    vs = [[next(it) for _ in range(words)] for _ in range(u_n)]
    return ks, vs, [next(it) for _ in range(u_n)]

  m0 = [ptx.fconst(INIT_MAX)] * g_n
  l0 = [ptx.fconst(0.0)] * g_n
  a0 = [ptx.fconst(0.0)] * (g_n * e)
  state0 = m0 + l0 + a0
  n_groups = ptx.udiv(ptx.add(ptx.add(end, ptx.mul(start, ptx.const(-1))),
                              ptx.const(u_n - 1)), u_n)
  pre0 = []  # the first D groups' loads; the loop issues group i + D while computing i
  for j in range(lay.depth):
    pre0 += flat(*group_loads(ptx.add(start, ptx.const(j * u_n))))
  loop = scf.ForOp(ptx.to_index(ptx.const(0)), ptx.to_index(n_groups),
                   ptx.to_index(ptx.const(1)), state0 + pre0)
  with ir.InsertionPoint(loop.body):
    gi_ = ptx.from_index(loop.induction_variable)
    carried = list(loop.inner_iter_args)
    ns = len(state0)
    m, l, acc = carried[:g_n], carried[g_n:2 * g_n], carried[2 * g_n:ns]
    ks, vs, oks = unflat(carried[ns:ns + per_group])
    ahead = carried[ns + per_group:]
    nxt = flat(*group_loads(ptx.add(start, ptx.mul(ptx.add(gi_, ptx.const(lay.depth)),
                                                   ptx.const(u_n)))))
    kf = [unpack(w) for w in ks]  # [U][E]
    vf = [unpack(w) for w in vs]
    valid = [ptx.lt(ptx.const(0), ok) for ok in oks]
    m_new, l_new, acc_new = [], [], []
    for gi in range(g_n):
      scores = []
      for u in range(u_n):
        part = None
        for j in range(e):
          part = (arith.mulf(q_vals[gi][j], kf[u][j]) if part is None
                  else ptx.fma(q_vals[gi][j], kf[u][j], part))
        sc = ptx.warp_sum(part)
        scores.append(ptx.select(valid[u], sc, ptx.fconst(NEG)))
      top = m[gi]
      for sc in scores:
        top = arith.maximumf(top, sc)
      corr = ptx.exp2_approx(arith.mulf(arith.subf(m[gi], top), ptx.fconst(LOG2E)))
      ps = [ptx.select(valid[u], ptx.exp2_approx(arith.mulf(arith.subf(scores[u], top),
                                                            ptx.fconst(LOG2E))),
                       ptx.fconst(0.0)) for u in range(u_n)]
      tot = arith.mulf(l[gi], corr)
      for p in ps:
        tot = ptx.fadd(tot, p)
      m_new.append(top)
      l_new.append(tot)
      for j in range(e):
        a = arith.mulf(acc[gi * e + j], corr)
        for u in range(u_n):
          a = ptx.fma(ps[u], vf[u][j], a)
        acc_new.append(a)
    scf.YieldOp(m_new + l_new + acc_new + ahead + nxt)
  res = list(loop.results)
  m, l, acc = res[:g_n], res[g_n:2 * g_n], res[2 * g_n:2 * g_n + g_n * e]

  if lay.in_kernel:
    _merge_in_kernel(scratch[0], out_ref, m, l, acc, lay=lay, b=b, kvh=kvh, tid=tid,
                     warp=warp, lane=lane, lane_e=lane_e)
    return

  # out[b, h, w, :]: the lane's E values, then (max, sum) from lane 0.
  for gi in range(g_n):
    head = ptx.add(ptx.mul(kvh, ptx.const(g_n)), ptx.const(gi))
    row = ptx.add(ptx.mul(ptx.add(ptx.mul(b, ptx.const(h_n)), head), ptx.const(w_n)), widx)
    base = ptx.mul(row, ptx.const(dh + 2))
    for j in range(e):
      ptx.st_global_f32(ptx.gaddr(og, ptx.add(base, ptx.add(lane_e, ptx.const(j))), 4),
                        acc[gi * e + j])
    with ptx.If(ptx.eq(lane, ptx.const(0))):
      ptx.st_global_f32(ptx.gaddr(og, ptx.add(base, ptx.const(dh)), 4), m[gi])
      ptx.st_global_f32(ptx.gaddr(og, ptx.add(base, ptx.const(dh + 1)), 4), l[gi])


def merge_units(lay: _Layout) -> tuple[int, int, int, int]:
  """(pairs of head dims each CTA merges over its warps, passes of its 128 T threads
  over them; pairs each CTA merges over the cluster, passes): the two merge phases."""
  threads = 128 * lay.warpgroups
  cta_pairs = lay.g * lay.dh // 2
  slice_pairs = cta_pairs // lay.ctas_per_head
  return cta_pairs, -(-cta_pairs // threads), slice_pairs, -(-slice_pairs // threads)


def _merged(ptx, parts):
  """Merges partials [(m, l, a0, a1)] (a0, a1: two dims of the values): (m, l, a0, a1)
  with m the largest max and everything rescaled to it, as `combine_partials`."""
  from jaxlib.mlir.dialects import arith
  top = parts[0][0]
  for p in parts[1:]:
    top = arith.maximumf(top, p[0])
  l = a0 = a1 = None
  for mi, li, x0, x1 in parts:
    w = ptx.exp2_approx(arith.mulf(arith.subf(mi, top), ptx.fconst(LOG2E)))
    if l is None:
      l, a0, a1 = arith.mulf(w, li), arith.mulf(w, x0), arith.mulf(w, x1)
    else:
      l, a0, a1 = ptx.fma(w, li, l), ptx.fma(w, x0, a0), ptx.fma(w, x1, a1)
  return top, l, a0, a1


def _merge_in_kernel(part_ref, out_ref, m, l, acc, *, lay: _Layout, b, kvh, tid, warp,
                     lane, lane_e):
  """Merges the head's 4 T C warp partials and writes out[b, heads of kvh, :].

  Shared memory: the warps' partials P[4T][G][Dh + 2], then the CTA's Q[G][Dh + 2].
  1. Each warp writes its (values, max, sum) per head into P; CTA barrier.
  2. The CTA's threads merge the 4T partials, a pair of dims per thread; with C = 1
     that is the output; else into Q, then a cluster barrier.
  3. (C > 1) CTA r of the cluster merges dims [r Dh / C, (r + 1) Dh / C) of every head
     from the C CTAs' Q (`ld.shared::cluster`) and writes them; a second cluster
     barrier keeps every CTA's shared memory alive until all have read it.
  Two short merges keep each thread's loads at 4T + C partials (one merge of all 4T C
  partials held ~4T C * 4 values live per thread: T37 and step 13's C = 8, T = 4).
  """
  from jaxlib.mlir.dialects import arith
  from anyprec_jax.pallas.mosaic import ptx

  g_n, dh, e, c_n = lay.g, lay.dh, lay.e, lay.ctas_per_head
  rec = dh + 2  # f32 slots of one partial
  h_n = lay.kv_heads * g_n
  cw = lay.cta_warps
  threads = 128 * lay.warpgroups
  smem = ptx.smem_address(part_ref)
  q_area = ptx.add(smem, ptx.const(4 * cw * g_n * rec))

  def slot(w, gi):  # byte offset of warp w's partial of head gi (w, gi: i32 values)
    return ptx.mul(ptx.add(ptx.mul(w, ptx.const(g_n)), gi), ptx.const(4 * rec))

  for gi in range(g_n):
    base = ptx.add(smem, slot(warp, ptx.const(gi)))
    for j in range(e):
      ptx.st_shared_f32(ptx.add(base, ptx.mul(ptx.add(lane_e, ptx.const(j)), ptx.const(4))),
                        acc[gi * e + j])
    with ptx.If(ptx.eq(lane, ptx.const(0))):
      ptx.st_shared_f32(base, m[gi], 4 * dh)
      ptx.st_shared_f32(base, l[gi], 4 * dh + 4)
  ptx.cta_sync()

  og = ptx.gmem_address(out_ref)
  bf16 = ir_is_bf16(out_ref)

  def write(gi, d, top_l_a):  # out[b, kvh G + gi, d:d + 2] = a / l (0 where l = 0)
    _, den, num0, num1 = top_l_a
    # A query with no valid slot gets 0 (the reference averages V over the masked slots).
    inv = arith.divf(ptx.fconst(1.0), ptx.select(
        arith.cmpf(arith.CmpFPredicate.OGT, den, ptx.fconst(0.0)), den, ptx.fconst(1.0)))
    head = ptx.add(ptx.mul(kvh, ptx.const(g_n)), gi)
    elem = ptx.add(ptx.mul(ptx.add(ptx.mul(b, ptx.const(h_n)), head), ptx.const(dh)), d)
    o0, o1 = arith.mulf(num0, inv), arith.mulf(num1, inv)
    if bf16:
      ptx.st_global_b32(ptx.gaddr(og, elem, 2), ptx.pack_bf16x2(o0, o1))
    else:
      ptx.st_global_v2_f32(ptx.gaddr(og, elem, 4), o0, o1)

  cta_pairs, cta_passes, slice_pairs, slice_passes = merge_units(lay)
  for rep in range(cta_passes):  # phase 2: the CTA's warps
    unit = ptx.add(tid, ptx.const(rep * threads))
    with ptx.If(ptx.lt(unit, ptx.const(cta_pairs))):
      gi = ptx.udiv(unit, dh // 2)
      d = ptx.mul(ptx.urem(unit, dh // 2), ptx.const(2))
      parts = []
      for w in range(cw):
        at = ptx.add(smem, slot(ptx.const(w), gi))
        v0, v1 = ptx.ld_shared_v2_f32(ptx.add(at, ptx.mul(d, ptx.const(4))))
        parts.append((ptx.ld_shared_f32(at, 4 * dh), ptx.ld_shared_f32(at, 4 * dh + 4),
                      v0, v1))
      merged = _merged(ptx, parts)
      if not lay.cluster:
        write(gi, d, merged)
      else:
        at = ptx.add(q_area, ptx.mul(gi, ptx.const(4 * rec)))
        ptx.st_shared_v2_f32(ptx.add(at, ptx.mul(d, ptx.const(4))), merged[2], merged[3])
        with ptx.If(ptx.eq(d, ptx.const(0))):
          ptx.st_shared_v2_f32(at, merged[0], merged[1], 4 * dh)
  if not lay.cluster:
    return

  ptx.cluster_sync()  # every CTA's Q written (release / acquire)
  rank = ptx.cluster_rank()
  span = dh // c_n  # dims this CTA merges per head
  for rep in range(slice_passes):  # phase 3: the cluster's CTAs
    unit = ptx.add(tid, ptx.const(rep * threads))
    with ptx.If(ptx.lt(unit, ptx.const(slice_pairs))):
      gi = ptx.udiv(unit, span // 2)
      d = ptx.add(ptx.mul(rank, ptx.const(span)),
                  ptx.mul(ptx.urem(unit, span // 2), ptx.const(2)))
      local = ptx.add(q_area, ptx.mul(gi, ptx.const(4 * rec)))
      parts = []
      for r in range(c_n):
        at = ptx.mapa_shared_cluster(local, ptx.const(r))
        v0, v1 = ptx.ld_shared_v2_f32(ptx.add(at, ptx.mul(d, ptx.const(4))), cluster=True)
        mm, ll = ptx.ld_shared_v2_f32(at, 4 * dh, cluster=True)
        parts.append((mm, ll, v0, v1))
      write(gi, d, _merged(ptx, parts))
  ptx.cluster_sync()  # every CTA has read the partials it needs: shared memory may go


def ir_is_bf16(ref) -> bool:
  """Whether a raw memref holds bf16 (else f32)."""
  from jaxlib.mlir import ir
  return str(ir.MemRefType(ref.type).element_type) == "bf16"


def combine_partials(part: jax.Array) -> jax.Array:
  """[B, H, W, Dh + 2] per-warp (values, max, sum) -> o [B, H, Dh] f32."""
  acc, m, l = part[..., :-2], part[..., -2], part[..., -1]  # [B,H,W,Dh], [B,H,W] x2
  top = jnp.max(m, axis=-1, keepdims=True)  # [B, H, 1]
  w = jnp.exp(m - top)  # [B, H, W]; 0 for warps that saw no slot
  den = jnp.sum(w * l, axis=-1)[..., None]  # [B, H, 1]
  # A query with no valid slot gets 0 (the reference averages V over the masked slots).
  num = jnp.einsum("bhw,bhwd->bhd", w, acc, precision=jax.lax.Precision.HIGHEST)
  return num / jnp.where(den > 0, den, 1.0)


def decode_attention_reference(q, k_cache, v_cache, valid) -> jax.Array:
  """Pure-jnp twin (the decoder's `attend` for one query): [B, H, Dh] f32.

  Args:
    q: [B, H, Dh] (already scaled); k_cache, v_cache: [B, S, KVH, Dh]; valid: [B, S].
  """
  b, h, d = q.shape
  kvh = k_cache.shape[2]
  qf = q.astype(jnp.float32).reshape(b, kvh, h // kvh, d)  # [B, KVH, G, Dh]
  hi = jax.lax.Precision.HIGHEST  # f32 products (TF32 on GPU otherwise)
  s = jnp.einsum("bkgd,bskd->bkgs", qf, k_cache.astype(jnp.float32), precision=hi)
  s = jnp.where(valid.astype(bool)[:, None, None, :], s, NEG)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgs,bskd->bkgd", p, v_cache.astype(jnp.float32), precision=hi)
  return o.reshape(b, h, d)


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype"))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     valid: jax.Array,
                     cfg: DecodeAttentionConfig = DecodeAttentionConfig(),
                     out_dtype=jnp.float32) -> jax.Array:
  """Attention of one query per sequence over its cache (Hopper, Mosaic GPU).

  Args:
    q: [B, H, Dh] bf16, already scaled (and rotated).
    k_cache, v_cache: [B, S, KVH, Dh] bf16, the new slot already written.
    valid: [B, S] bool or int: slots the query may attend to.
    cfg: launch shape (static).
    out_dtype: float32 or bfloat16 (static).

  Returns:
    [B, H, Dh] in `out_dtype`.
  """
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
  if _checked_layout(q, k_cache, v_cache, valid, cfg).in_kernel:
    return _launch(q, k_cache, v_cache, valid, cfg, out_dtype)
  part = _launch(q, k_cache, v_cache, valid, cfg, jnp.float32)
  return combine_partials(part).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_attention_partials(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                              valid: jax.Array,
                              cfg: DecodeAttentionConfig = DecodeAttentionConfig()
                              ) -> jax.Array:
  """The kernel alone, writing per-warp partials [B, H, W, Dh + 2] (`combine_partials`
  merges them; no in-kernel merge). Arguments as `decode_attention`."""
  return _launch(q, k_cache, v_cache, valid, dataclasses.replace(cfg, merge="xla"),
                 jnp.float32)


def _checked_layout(q, k_cache, v_cache, valid, cfg: DecodeAttentionConfig) -> _Layout:
  b, h, d = q.shape
  if k_cache.shape != v_cache.shape or k_cache.ndim != 4:
    raise ValueError(f"k/v caches {k_cache.shape} / {v_cache.shape}: want equal "
                     "[B, S, KVH, Dh]")
  _, s, kvh, dk = k_cache.shape
  if k_cache.shape[0] != b or dk != d or h % kvh:
    raise ValueError(f"q {q.shape} does not fit the caches {k_cache.shape}")
  if valid.shape != (b, s):
    raise ValueError(f"valid {valid.shape}, expected {(b, s)}")
  for name, arr in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
    if arr.dtype != jnp.bfloat16:
      raise ValueError(f"{name} must be bfloat16, got {arr.dtype}")
  return make_layout(b, s, kvh, h // kvh, d, cfg)


def _launch(q, k_cache, v_cache, valid, cfg: DecodeAttentionConfig, out_dtype) -> jax.Array:
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  lay = _checked_layout(q, k_cache, v_cache, valid, cfg)
  b, h, d = q.shape
  body = ptx.thread_body(functools.partial(_emit, lay=lay))
  common = dict(num_threads=lay.warpgroups, thread_name="wg")
  if lay.in_kernel:
    out_type = jax.ShapeDtypeStruct((b, h, d), out_dtype)
    scratch = [plgpu.SMEM((lay.partial_floats,), jnp.float32)]
    if lay.cluster:  # grid = clusters; CUDA's grid is C times that, a cluster per head
      kernel = plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                            grid=(lay.ctas // lay.ctas_per_head,), grid_names=("head",),
                            cluster=(lay.ctas_per_head,), cluster_names=("c",), **common)
    else:
      kernel = plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                            grid=(lay.ctas,), grid_names=("cta",), **common)
  else:
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((b, h, lay.warps, d + 2), jnp.float32),
        grid=(lay.ctas,), grid_names=("cta",), **common)
  return kernel(q, k_cache, v_cache, valid.astype(jnp.int32))


def bytes_moved(b: int, s: int, kvh: int, h: int, d: int) -> int:
  """Fewest bytes of one call: the K and V caches once, q, the mask, the output."""
  return 2 * b * s * kvh * d * 2 + b * h * d * 2 + b * s * 4 + b * h * d * 4

