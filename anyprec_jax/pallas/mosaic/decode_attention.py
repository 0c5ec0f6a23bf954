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
of U slots at a time with the next group's loads in flight. Each warp writes its
partial (values, max, sum); `combine_partials` merges the partials of a head in XLA.

Everything a thread does is inside one `plgpu.inline_mgpu` (see `ptx.py`), as in
`gemv_tc.py`. Twin: `decode_attention_reference` (the decoder's `attend` for T = 1).

Status: on the H200 (kernels_tc.md steps 8-10) 1.7x XLA's attention at 384 slots,
2.9x at 4096 (7B, batch 1; kernel + merge); the decoder calls it for one-query steps
on Hopper unless `ANYPREC_DECODE_ATTENTION=xla` (`ops.one_query_attention`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # score of a masked slot (the decoder's value)
INIT_MAX = -3e38  # running max before any slot: exp(INIT_MAX - m) = 0 for any real m
LOG2E = 1.4426950408889634


SLOTS_PER_WARP = 32  # the default launch's aim (H200, kernels_tc.md step 10)
MAX_WARPS = 4096  # the default launch's cap on warps in all
MAX_CLUSTER = 8  # portable thread-block cluster size


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
  """Static launch shape.

  ctas_per_head: C, CTAs (one warpgroup of 4 warps each) per (sequence, KV head); the
    4 C warps split the slots. None: about SLOTS_PER_WARP slots per warp, C <= 32,
    at most MAX_WARPS warps in all (on the H200 at 384 slots C = 3-4 beat 8-32,
    at 4096 slots 16-32 beat 4; kernels_tc.md steps 9-10).
  group: U, slots per step of a warp (their loads are issued one step ahead); 4 was
    faster than 8 in 3 of 4 shapes on the H200 and equal in the fourth.
  cluster_merge: with C <= MAX_CLUSTER, the C CTAs of a head form a thread-block
    cluster and merge their warps' partials in the kernel (shared memory, read across
    the cluster): one launch, no XLA merge. Off by default: on the H200 it was no
    faster than the XLA merge, and slower at C = 8 (11.4 against 9.6 us, 7B, batch 1,
    384 slots; the cluster's CTAs wait for each other twice). Otherwise the kernel
    writes per-warp partials and `combine_partials` merges them in XLA.
  """
  ctas_per_head: int | None = None
  group: int = 4
  cluster_merge: bool = False


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  slots: int  # S
  kv_heads: int
  g: int  # query heads per KV head
  dh: int
  ctas_per_head: int
  group: int
  cluster: bool  # merge in the kernel across a cluster of the head's C CTAs

  @property
  def e(self) -> int:  # dims per lane
    return self.dh // 32

  @property
  def warps(self) -> int:  # warps per (sequence, KV head)
    return 4 * self.ctas_per_head

  @property
  def ctas(self) -> int:
    return self.batch * self.kv_heads * self.ctas_per_head


def make_layout(batch: int, slots: int, kv_heads: int, g: int, dh: int,
                cfg: DecodeAttentionConfig) -> _Layout:
  if dh not in (64, 128):
    raise ValueError(f"decode attention handles head dims 64 and 128, got {dh}")
  if not 1 <= g <= 8:
    raise ValueError(f"1..8 query heads per KV head, got {g}")
  if cfg.group < 1:
    raise ValueError(f"group must be >= 1, got {cfg.group}")
  c = cfg.ctas_per_head
  if c is None:  # ~SLOTS_PER_WARP slots per warp, <= MAX_WARPS warps in all
    c = -(-slots // (4 * SLOTS_PER_WARP))
    c = max(1, min(c, MAX_CLUSTER if cfg.cluster_merge else 32,
                   MAX_WARPS // (4 * batch * kv_heads)))
  if c < 1:
    raise ValueError(f"ctas_per_head must be >= 1, got {c}")
  return _Layout(batch=batch, slots=slots, kv_heads=kv_heads, g=g, dh=dh,
                 ctas_per_head=c, group=cfg.group,
                 cluster=cfg.cluster_merge and c <= MAX_CLUSTER)


def _emit(q_ref, k_ref, v_ref, valid_ref, out_ref, *scratch, lay: _Layout):
  """The kernel body (per thread). Refs: q [B, H, Dh] bf16, k/v [B, S, KVH, Dh] bf16,
  valid [B, S] i32; out [B, H, Dh] f32 with `lay.cluster` (scratch: the CTA's
  partials in shared memory, [4 warps, G, Dh + 2] f32), else out [B, H, W, Dh + 2] f32
  (values, max, sum per warp)."""
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, scf
  from anyprec_jax.pallas.mosaic import ptx

  s_n, kvh_n, g_n, dh, e, u_n = lay.slots, lay.kv_heads, lay.g, lay.dh, lay.e, lay.group
  h_n = kvh_n * g_n
  w_n = lay.warps
  words = e // 2  # 32-bit words per lane and row (bf16 pairs)
  tid = ptx.thread_id()
  lane = ptx.band(tid, 31)
  warp = ptx.shr(tid, 5)
  cta = ptx.block_id()
  bh = ptx.udiv(cta, lay.ctas_per_head)  # b * KVH + kvh
  widx = ptx.add(ptx.mul(ptx.urem(cta, lay.ctas_per_head), ptx.const(4)), warp)
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
  pre0 = flat(*group_loads(start))
  loop = scf.ForOp(ptx.to_index(ptx.const(0)), ptx.to_index(n_groups),
                   ptx.to_index(ptx.const(1)), state0 + pre0)
  with ir.InsertionPoint(loop.body):
    gi_ = ptx.from_index(loop.induction_variable)
    carried = list(loop.inner_iter_args)
    ns = len(state0)
    m, l, acc = carried[:g_n], carried[g_n:2 * g_n], carried[2 * g_n:ns]
    ks, vs, oks = unflat(carried[ns:])
    nxt = flat(*group_loads(ptx.add(start, ptx.mul(ptx.add(gi_, ptx.const(1)),
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
    scf.YieldOp(m_new + l_new + acc_new + nxt)
  res = list(loop.results)
  m, l, acc = res[:g_n], res[g_n:2 * g_n], res[2 * g_n:2 * g_n + g_n * e]

  if lay.cluster:
    _cluster_merge(scratch[0], out_ref, m, l, acc, lay=lay, b=b, kvh=kvh, warp=warp,
                   lane=lane, lane_e=lane_e)
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


def _cluster_merge(part_ref, out_ref, m, l, acc, *, lay: _Layout, b, kvh, warp, lane,
                   lane_e):
  """Each warp's (values, max, sum) per head into its CTA's shared memory; after a
  cluster barrier, the cluster's first CTA merges the 4 C partials of each head (warp
  w takes heads w, w + 4; remote partials read with `ld.shared::cluster`) and writes
  out[b, h, :]; a second cluster barrier keeps the other CTAs' shared memory alive
  until then. The same arithmetic as `combine_partials`."""
  from jaxlib.mlir.dialects import arith
  from anyprec_jax.pallas.mosaic import ptx

  g_n, dh, e, c_n = lay.g, lay.dh, lay.e, lay.ctas_per_head
  rec = dh + 2  # f32 slots of one partial
  h_n = lay.kv_heads * g_n
  smem = ptx.smem_address(part_ref)

  def slot(w, gi):  # byte offset of warp w's partial of head gi
    return ptx.mul(ptx.add(ptx.mul(w, ptx.const(g_n)), ptx.const(gi)), ptx.const(4 * rec))

  for gi in range(g_n):
    base = ptx.add(smem, slot(warp, gi))
    for j in range(e):
      ptx.st_shared_f32(ptx.add(base, ptx.mul(ptx.add(lane_e, ptx.const(j)), ptx.const(4))),
                        acc[gi * e + j])
    with ptx.If(ptx.eq(lane, ptx.const(0))):
      ptx.st_shared_f32(base, m[gi], 4 * dh)
      ptx.st_shared_f32(base, l[gi], 4 * dh + 4)
  ptx.cluster_sync()  # every partial of the cluster written (release / acquire)

  with ptx.If(ptx.eq(ptx.cluster_rank(), ptx.const(0))):
    for gi in range(g_n):
      with ptx.If(ptx.eq(warp, ptx.const(gi % 4))):
        ms, ls, accs = [], [], []
        for i in range(4 * c_n):  # partial i: CTA i // 4 of the cluster, warp i % 4
          local = ptx.add(smem, slot(ptx.const(i % 4), gi))
          remote = ptx.mapa_shared_cluster(local, ptx.const(i // 4))
          ms.append(ptx.ld_shared_cluster_f32(remote, 4 * dh))
          ls.append(ptx.ld_shared_cluster_f32(remote, 4 * dh + 4))
          lane_off = ptx.add(remote, ptx.mul(lane_e, ptx.const(4)))
          accs.append([ptx.ld_shared_cluster_f32(lane_off, 4 * j) for j in range(e)])
        top = ms[0]
        for mi in ms[1:]:
          top = arith.maximumf(top, mi)
        ws = [ptx.exp2_approx(arith.mulf(arith.subf(mi, top), ptx.fconst(LOG2E)))
              for mi in ms]
        den = arith.mulf(ws[0], ls[0])
        for wi, li in zip(ws[1:], ls[1:]):
          den = ptx.fma(wi, li, den)
        inv = arith.divf(ptx.fconst(1.0), ptx.select(
            arith.cmpf(arith.CmpFPredicate.OGT, den, ptx.fconst(0.0)), den,
            ptx.fconst(1.0)))
        head = ptx.add(ptx.mul(kvh, ptx.const(g_n)), ptx.const(gi))
        row = ptx.mul(ptx.add(ptx.mul(b, ptx.const(h_n)), head), ptx.const(dh))
        og = ptx.gmem_address(out_ref)
        for j in range(e):
          num = arith.mulf(ws[0], accs[0][j])
          for wi, ai in zip(ws[1:], accs[1:]):
            num = ptx.fma(wi, ai[j], num)
          ptx.st_global_f32(ptx.gaddr(og, ptx.add(row, ptx.add(lane_e, ptx.const(j))), 4),
                            arith.mulf(num, inv))
  ptx.cluster_sync()  # the first CTA has read every partial: shared memory may go


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


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     valid: jax.Array,
                     cfg: DecodeAttentionConfig = DecodeAttentionConfig()) -> jax.Array:
  """Attention of one query per sequence over its cache (Hopper, Mosaic GPU).

  Args:
    q: [B, H, Dh] bf16, already scaled (and rotated).
    k_cache, v_cache: [B, S, KVH, Dh] bf16, the new slot already written.
    valid: [B, S] bool or int: slots the query may attend to.
    cfg: launch shape (static).

  Returns:
    [B, H, Dh] float32.
  """
  if _checked_layout(q, k_cache, v_cache, valid, cfg).cluster:
    return _launch(q, k_cache, v_cache, valid, cfg)
  return combine_partials(decode_attention_partials(q, k_cache, v_cache, valid, cfg=cfg))


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_attention_partials(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                              valid: jax.Array,
                              cfg: DecodeAttentionConfig = DecodeAttentionConfig()
                              ) -> jax.Array:
  """The kernel alone, writing per-warp partials [B, H, W, Dh + 2] (`combine_partials`
  merges them; no cluster merge). Arguments as `decode_attention`."""
  return _launch(q, k_cache, v_cache, valid,
                 dataclasses.replace(cfg, cluster_merge=False))


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


def _launch(q, k_cache, v_cache, valid, cfg: DecodeAttentionConfig) -> jax.Array:
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  lay = _checked_layout(q, k_cache, v_cache, valid, cfg)
  b, h, d = q.shape
  body = ptx.thread_body(functools.partial(_emit, lay=lay))
  if lay.cluster:  # grid = clusters; CUDA's grid is C times that, a cluster per head
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((b, h, d), jnp.float32),
        scratch_types=[plgpu.SMEM((4 * lay.g * (d + 2),), jnp.float32)],
        grid=(lay.ctas // lay.ctas_per_head,), grid_names=("head",),
        cluster=(lay.ctas_per_head,), cluster_names=("c",),
        num_threads=1, thread_name="wg")
  else:
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((b, h, lay.warps, d + 2), jnp.float32),
        grid=(lay.ctas,), grid_names=("cta",), num_threads=1, thread_name="wg")
  return kernel(q, k_cache, v_cache, valid.astype(jnp.int32))


def bytes_moved(b: int, s: int, kvh: int, h: int, d: int) -> int:
  """Fewest bytes of one call: the K and V caches once, q, the mask, the output."""
  return 2 * b * s * kvh * d * 2 + b * h * d * 2 + b * s * 4 + b * h * d * 4

