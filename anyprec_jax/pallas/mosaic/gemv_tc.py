"""Tensor-core bitplane GEMV for M = 1..8 on Pallas Mosaic GPU (issue 15), 3..8 bits.

y[m, n] = sum_k x[m, k] * LUT_b[n, code_b(n, k)], planes in the tensor-core bit order
of `plane_layout.py`.

* A CTA owns RT tiles of 16 rows; its 4T warps split the K blocks (128 columns each).
* Lane (g, q) decodes the codes of its rows g and g + 8 of every tile (one plane word
  per plane, row and block) straight into the A registers of `mma.sync.m16n8k16`:
  - b <= 4, register tables: the lane keeps its rows' LUTs as byte tables (low and
    high bytes of the 2^b 16-bit values), a look-up of four codes is one `prmt` per
    byte table (b = 4 adds one to pick between the two halves of 8 entries) and two
    `prmt` interleave the bytes into the two A registers of a k16 step.
  - b >= 5, shared-memory tables: the codes come out of the 8x8 bit transpose
    (`ptx.transpose8`, byte t' of word s' = code of word bit 8t' + s'); one `prmt`
    turns a code byte into a shared address (code in bits 8..15, the lane in bits
    2..6, the tile's parity in bit 7), one `ld.shared.b32` fetches the slot, one `prmt`
    packs two looked-up halves into an A register. Each slot holds the pair (row g,
    row g + 8) of one entry, copied for the 4 lanes q that share row g, so every lane
    reads its own bank: no bank conflicts whatever the codes. The tables of the CTA's
    tiles (2^b * 256 bytes per two tiles) are written once at the start.
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
MAX_BITS = 8
SMEM_TABLE_BITS = 5  # from this width on the LUTs live in shared memory
SLOT_STRIDE = 256  # bytes between consecutive entries of a shared table


# --- shared-memory tables (b >= 5): the index arithmetic, shared with the tests ---

def code_place(st: int, t: int) -> tuple[int, int]:
  """(word s', byte t') of `ptx.transpose8`'s output that holds the code of A element
  t (0..3: columns 2q, 2q + 1, 2q + 8, 2q + 9) of k16 step st of a lane's row.

  Word bit pi = 16h + 4t + s holds step 2s + h, element t (`plane_layout`); the
  transpose puts bit pi into word pi % 8, byte pi // 8.
  """
  s, h = st // 2, st % 2
  return s + 4 * (t & 1), 2 * h + (t >> 1)


def address_selector(tbyte: int) -> int:
  """`prmt` selector: byte 1 = code byte `tbyte` of the transposed word, bytes 0, 2, 3
  from the lane base (lane * 4 + tile parity * 128)."""
  return 0x7604 | (tbyte << 4)


def table_bytes(bits: int, row_tiles: int) -> int:
  """Shared bytes of the tables of `row_tiles` tiles (two tiles per 2^b slots; one tile
  leaves the second half of its slots unused)."""
  return -(-row_tiles // 2) * (1 << bits) * SLOT_STRIDE


def slot_offset(bits: int, tile: int, e: int, lane: int) -> int:
  """Byte offset of lane `lane`'s copy of entry e of tile `tile`'s table pair."""
  return (tile // 2) * (1 << bits) * SLOT_STRIDE + e * SLOT_STRIDE + (tile % 2) * 128 + 4 * lane


PACK_LOW = 0x5410  # low halves of two words (row g's value of a slot)
PACK_HIGH = 0x7632  # high halves (row g + 8's)


@dataclasses.dataclass(frozen=True)
class TcGemvConfig:
  """Static launch shape.

  row_tiles: RT, 16-row tiles per CTA (B fragments are shared by the RT tiles).
  warpgroups: T, warpgroups per CTA (4T warps split K); None = from the shape.
  prefetch: load the next block's plane words and activations before decoding the
    current one (software pipelining through registers).
  stages: S >= 2: each warp streams its plane words through a ring of S blocks in
    shared memory with `cp.async` (S - 1 blocks in flight, no registers held), read
    back with `ld.shared`; 0: plane words go straight to registers (`prefetch`).
  x_smem: each warp first copies its K range of the activations into shared memory in
    B-fragment order (four 16-byte loads per block instead of 16 4-byte global loads,
    no registers held across blocks); ignored where the copy does not fit
    (`SMEM_BUDGET`).
  early_loads: issue the first block's plane (and activation) loads before loading
    the LUTs, so the two memory latencies overlap. Off by default: on the H200 it
    was no faster (7B shapes, M = 1: 3-bit down 20.3 against 14.8 us tables first,
    other cases within the run's noise; kernels_tc.md step 5).
  ksplit: S >= 1 CTAs share each group of RT tiles, each taking 1/S of the K blocks
    (its 4T warps split that range); with S > 1 they add their sums into a zeroed
    output with `red.global.add.f32`. More, shorter CTAs let the hardware balance the
    SMs (N = 11008 gives 344 CTAs of 2 tiles: 2 or 3 per SM). S = 2 stays
    deterministic (0 + a + b = 0 + b + a exactly); S > 2 may round differently from
    run to run. GEMV only.
  probe: "" (the kernel), "loads" (plane and activation loads folded into one value,
    no decode or MMA) or "decode" (register-made plane words, no plane loads): roofline
    aids for the benchmarks; their output is meaningless.
  depth: D >= 1, plane words held in registers D blocks ahead. Off (D = 1): deeper
    prefetch was slower at every width on the H200 (GPU time, 7B shapes, M = 1: 3 bits
    +1-6 %, 8 bits +25-40 %: more registers, fewer resident warps; kernels_tc.md step 7).
  bulk: C >= 1 (TC_TILED planes, GEMV only): each warp copies its whole K range of
    plane words into shared memory with `cp.async.bulk` (one copy per tile, plane and
    chunk: a warp's words of one tile and plane are contiguous in TC_TILED), in C
    chunks that complete on one `mbarrier` each, all issued before the LUTs load; the
    loop then reads its words with `ld.shared.v2`. Every byte is in flight from the
    start and no register holds prefetched words (T26: register prefetch trades
    resident warps for bytes in flight). 0: off. Falls back to 0 where the copies do
    not fit in `SMEM_BUDGET`.
  split4: 4 bits only: the low three planes give the look-up selectors as at 3 bits,
    plane 0 alone the half-select selectors (fewer ALU ops per code). On: 5-7 % faster
    GPU time on the 7B shapes at M = 1 (kernels_tc.md step 7).
  pdl: programmatic dependent launch (Hopper; `ptx.thread_body`): every CTA first lets
    the next kernel in the stream start (`griddepcontrol.launch_dependents`), loads
    its LUTs and its first block of plane words, and only then waits for the kernels
    before it (`griddepcontrol.wait`) and reads the activations, the folded norm's
    input and the epilogue's residual. So a GEMV after a GEMV (o_proj -> gate/up ->
    down -> the next layer's q/k/v) starts in its predecessor's tail with its weight
    loads in flight. ksplit 1 only (ignored otherwise).
  smem_tables: the LUTs in shared memory, one `ld.shared` per code (as from
    `SMEM_TABLE_BITS`) instead of register `prmt` tables; None: from
    `SMEM_TABLE_BITS` on. True at 3-4 bits is a benchmark variant (split4 is then off).
  """
  row_tiles: int = 2
  warpgroups: int | None = None
  prefetch: bool = True
  stages: int = 0
  x_smem: bool = False
  early_loads: bool = False
  ksplit: int = 1
  probe: str = ""
  depth: int = 1
  split4: bool = True
  bulk: int = 0
  pdl: bool = False
  smem_tables: bool | None = None


# Epilogues (`gemv_tc(residual=, epi_weight=)`): y stored as f32; h = residual + y in bf16;
# h and h * weight (the next RMSNorm's x * w, for the folded norm of the GEMV after).
# EPI_GLU: W is gate rows [0, F) over up rows [F, 2F); out = bf16(silu(g) * u) [M, F].
# EPI_ROPE: W is a fused q/k/v projection; the output's q rows are rotated (RoPE) and
# scaled, its k rows rotated and written with the v rows into the KV caches
# (`gemv_tc_rope_kv`).
EPI_NONE, EPI_RESIDUAL, EPI_RESIDUAL_NORM, EPI_GLU, EPI_ROPE = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Static shape of the q/k/v epilogue (EPI_ROPE): rows [0, q_rows) are the query
  heads, then kv_rows of key heads and kv_rows of value heads, head_dim each; caches of
  `slots` slots; the rotated queries are multiplied by q_scale (a bf16 value)."""
  head_dim: int
  q_rows: int
  kv_rows: int
  slots: int
  q_scale: float

SMEM_BUDGET = 200 * 1024  # shared bytes a CTA may ask for (227 KB on Hopper)
X_BLOCK_BYTES = 256  # one block of one activation row in shared memory (64 words)


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
  stages: int
  tiled: bool  # planes in PlaneLayout.TC_TILED
  x_smem: bool
  early_loads: bool = False
  ksplit: int = 1
  probe: str = ""
  depth: int = 1
  split4: bool = False
  bulk: int = 0
  rms_eps: float | None = None  # fold an RMSNorm's 1 / rms(norm_x) into the output
  epilogue: int = 0  # EPI_*: what the output elements become (`gemv_tc`'s residual)
  epi_w_bf16: bool = False  # the epilogue's norm weight is bf16 (else f32)
  glu: bool = False  # EPI_GLU: a CTA's two tiles are gate tile c and up tile c
  pdl: bool = False  # programmatic dependent launch (TcGemvConfig.pdl)
  smem_tables: bool = False  # LUTs in shared memory (`_shared_tables`)
  rope: RopeSpec | None = None  # EPI_ROPE: a CTA's tiles are rotary partners

  @property
  def tile_step(self) -> int:  # tiles between a CTA's consecutive tiles
    if self.glu:
      return self.n // 32
    return self.rope.head_dim // 32 if self.rope is not None else 1

  @property
  def warps(self) -> int:
    return 4 * self.warpgroups

  @property
  def kparts(self) -> int:  # warps sharing one tile group's K blocks, over all CTAs
    return self.warps * self.ksplit

  @property
  def x_row_bytes(self) -> int:  # +64: rows g and g + 1 of a load phase in other banks
    return self.blocks * X_BLOCK_BYTES + 64

  @property
  def x_bytes(self) -> int:
    return self.m * self.x_row_bytes if self.x_smem else 0

  @property
  def table_bytes(self) -> int:
    return table_bytes(self.bits, self.row_tiles) if self.smem_tables else 0

  @property
  def red_bytes(self) -> int:
    return self.warps * self.row_tiles * 32 * 16

  @property
  def stage_bytes(self) -> int:  # one block of one warp's plane words: [b][16 RT][16 B]
    return self.bits * 16 * self.row_tiles * 16

  @property
  def ring_bytes(self) -> int:
    return self.warps * self.stages * self.stage_bytes

  @property
  def bulk_blocks(self) -> int:  # most K blocks a warp owns
    return -(-self.blocks // self.kparts)

  @property
  def bulk_chunk(self) -> int:  # K blocks per bulk chunk (one mbarrier each)
    return -(-self.bulk_blocks // self.bulk) if self.bulk else 0

  @property
  def bulk_warp_bytes(self) -> int:  # one warp's words: [RT][b][bulk_blocks][256 B]
    return self.row_tiles * self.bits * self.bulk_blocks * 256 if self.bulk else 0

  @property
  def bulk_bytes(self) -> int:  # the warps' words, then their mbarriers (8 B each)
    return self.warps * (self.bulk_warp_bytes + 8 * self.bulk) if self.bulk else 0

  @property
  def norm_bytes(self) -> int:  # per warp and activation row, its sum of squares
    return 4 * self.warps * self.m if self.rms_eps is not None else 0

  @property
  def smem_bytes(self) -> int:
    return (self.table_bytes + self.red_bytes + self.ring_bytes + self.x_bytes
            + self.bulk_bytes + self.norm_bytes)


def config_for(bits: int, m: int, n: int, k: int, tiled: bool = False) -> TcGemvConfig:
  """Launch shape of the model path. TC_TILED planes: kernels_tc.md step 4. TC planes
  (H200 runs: benchmarks/results/kernels_mosaic.md run
  5 for 3-4 bits, kernels_tc.md step 3 for 5-8 bits): one warpgroup per CTA for
  N > 8192 (many CTAs; from 7 bits with a 3-block cp.async plane ring, 8-14 % faster
  at 8 bits), else the shape's default at 3-4 bits and two warpgroups at 5-8."""
  if tiled:
    return _tiled_config(m, n, k)
  del k
  if n > 8192:
    return TcGemvConfig(warpgroups=1, stages=3 if bits >= 7 else 0)
  return TcGemvConfig(warpgroups=2) if bits >= SMEM_TABLE_BITS else TcGemvConfig()


def _tiled_config(m: int, n: int, k: int) -> TcGemvConfig:
  # Step 4 runs 1-2 (kernels_tc.md): N > 8192: 2 tiles x 1 warpgroup per CTA;
  # N <= 8192 at M = 1: one tile x 2 warpgroups where K > N (7B down), 2 x 4
  # otherwise (4096^2); M > 1: 2 x 2. Differences under ~10 % were within run noise.
  if n > 8192:
    return TcGemvConfig(warpgroups=1)
  if m == 1:
    return (TcGemvConfig(row_tiles=1, warpgroups=2) if k > n
            else TcGemvConfig(warpgroups=4))
  return TcGemvConfig(warpgroups=2)


def make_layout(bits: int, m: int, n: int, k: int, cfg: TcGemvConfig,
                x_dtype, tiled: bool = False, rms_eps: float | None = None,
                epilogue: int = EPI_NONE, epi_w_bf16: bool = False,
                rope: RopeSpec | None = None) -> _Layout:
  if not 3 <= bits <= MAX_BITS:
    raise ValueError(f"the tensor-core GEMV handles 3..{MAX_BITS} bits, got {bits}")
  smem_tables = (bits >= SMEM_TABLE_BITS if cfg.smem_tables is None
                 else bool(cfg.smem_tables))
  if smem_tables and cfg.row_tiles % 2 and cfg.row_tiles != 1:
    raise ValueError(f"row_tiles must be 1 or even with shared-memory tables (from "
                     f"{SMEM_TABLE_BITS} bits on; two tiles share a table), got "
                     f"{cfg.row_tiles}")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"the tensor-core GEMV takes 1..{MAX_M} activation rows, got {m}")
  blocks = -(-k // tc_layout.BLOCK)
  ctas = -(-n // (16 * cfg.row_tiles))
  t = cfg.warpgroups
  if t is None:
    t = max(1, min(4, -(-TARGET_WARPS // (4 * ctas)), max(1, blocks // 4)))
  mma = "f16" if jnp.dtype(x_dtype) == jnp.float16 else "bf16"
  if cfg.stages == 1 or cfg.stages < 0:
    raise ValueError(f"stages must be 0 (no ring) or >= 2, got {cfg.stages}")
  if cfg.probe not in ("", "loads", "decode"):
    raise ValueError(f"probe must be '', 'loads' or 'decode', got {cfg.probe!r}")
  if cfg.depth < 1:
    raise ValueError(f"depth must be >= 1, got {cfg.depth}")
  if cfg.ksplit < 1:
    raise ValueError(f"ksplit must be >= 1, got {cfg.ksplit}")
  if cfg.bulk < 0:
    raise ValueError(f"bulk must be >= 0 (chunks per warp; 0 = off), got {cfg.bulk}")
  if cfg.bulk and not tiled:
    raise ValueError("bulk copies need TC_TILED planes (tiled=True)")
  if cfg.bulk and cfg.stages:
    raise ValueError("bulk copies and the cp.async ring (stages) exclude each other")
  if tiled and n % tc_layout.TILE_ROWS:
    raise ValueError(f"tiled planes need N % {tc_layout.TILE_ROWS} == 0, got N={n}")
  if rms_eps is not None and (k % 8 or cfg.ksplit > 1):
    raise ValueError(f"a folded RMSNorm needs K % 8 == 0 and ksplit 1, got K={k}, "
                     f"ksplit={cfg.ksplit}")
  if epilogue not in (EPI_NONE, EPI_RESIDUAL, EPI_RESIDUAL_NORM, EPI_GLU, EPI_ROPE):
    raise ValueError(f"unknown epilogue {epilogue}")
  if (epilogue == EPI_ROPE) != (rope is not None):
    raise ValueError("the q/k/v epilogue (EPI_ROPE) comes with its RopeSpec")
  if rope is not None:
    hd = rope.head_dim
    if (hd % 32 or rope.q_rows % hd or rope.kv_rows % hd or not rope.kv_rows
        or not rope.q_rows
        or n != rope.q_rows + 2 * rope.kv_rows or cfg.row_tiles != 2 or cfg.stages
        or cfg.bulk or cfg.ksplit > 1 or rope.slots < 1):
      raise ValueError(f"the q/k/v epilogue needs head_dim % 32 == 0, head-aligned q "
                       f"and k/v rows with N = q_rows + 2 kv_rows, 2 row tiles and no "
                       f"plane ring, bulk copies or K split; got N={n}, {rope}, {cfg}")
  if epilogue and cfg.ksplit > 1:
    raise ValueError(f"an epilogue needs ksplit 1, got {cfg.ksplit}")
  if epilogue == EPI_GLU and (n % 32 or cfg.row_tiles != 2 or cfg.stages or cfg.bulk):
    raise ValueError(f"the gated epilogue needs N % 32 == 0 (gate over up), 2 row tiles "
                     f"and no plane ring or bulk copies, got N={n}, {cfg}")
  lay = _Layout(bits=bits, m=m, n=n, k=k, blocks=blocks, row_tiles=cfg.row_tiles,
                warpgroups=t, ctas=ctas, prefetch=cfg.prefetch, mma_dtype=mma,
                stages=cfg.stages, tiled=tiled, x_smem=cfg.x_smem,
                early_loads=cfg.early_loads, ksplit=cfg.ksplit, probe=cfg.probe,
                depth=cfg.depth, split4=cfg.split4 and bits == 4 and not smem_tables,
                bulk=cfg.bulk, smem_tables=smem_tables,
                rms_eps=None if rms_eps is None else float(rms_eps), epilogue=epilogue,
                epi_w_bf16=epi_w_bf16, glu=epilogue == EPI_GLU,
                pdl=cfg.pdl and cfg.ksplit == 1, rope=rope)
  if lay.x_smem and lay.smem_bytes > SMEM_BUDGET:
    lay = dataclasses.replace(lay, x_smem=False)
  if lay.bulk and lay.smem_bytes > SMEM_BUDGET:
    lay = dataclasses.replace(lay, bulk=0)
  return lay


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


SELECT_BASE = 0x32103210  # prmt selector "bytes 0..3 of the first source", both halves


def _select_words(ptx, w0):
  """4 bits, split4: S_s, s = 0..3: nibble t = 0x3210's nibble t + 4 * (plane-0 bit of
  word bit 4t + s), i.e. the selector that takes byte t from the high-half look-up
  where the code's top bit is set (`bitops.field_words` of plane 0 at place 2)."""
  out = []
  for s in range(4):
    amount = s - 2
    v = ptx.shr(w0, amount) if amount > 0 else ptx.shl(w0, -amount)
    out.append(ptx.bor(ptx.band(v, 0x44444444), ptx.const(SELECT_BASE)))
  return out


def _emit(x_ref, planes_ref, lut_ref, out_ref, smem_ref, *, lay: _Layout,
          dequant: bool = False, nx_ref=None, res_ref=None, ew_ref=None, out2_ref=None,
          rope_refs=None):
  """The GEMV body; with `dequant`, x_ref is unused and the decoded A fragments are
  stored to out_ref = W [N, 128 KB] (the MMA operand dtype) instead of multiplied.
  With `lay.rms_eps`, nx_ref [M, K] bf16 is the RMSNorm's input: row m of y is scaled
  by 1 / sqrt(mean(nx[m]^2) + eps) (x being nx times the norm's weight).
  Epilogues (`lay.epilogue`): out_ref [M, N] bf16 = bf16(res + bf16(y)) with res_ref
  [M, N] bf16; EPI_RESIDUAL_NORM adds out2_ref [M, N] bf16 = bf16(out * ew) with ew_ref
  [N] f32 or bf16 (each rounding as the decoder's XLA ops round). The epilogue's
  residual and weight values load at the start, so their latency hides under the loop.
  EPI_ROPE: rope_refs = (cos, sin [M, Dh / 2] f32, slots [M] i32, k and v caches
  [M, S, KVH, Dh] bf16, written in place); out_ref [M, q_rows] bf16 (`_store_rope`)."""
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, scf
  from anyprec_jax.pallas.mosaic import ptx

  b, n, k, m, rt_n = lay.bits, lay.n, lay.k, lay.m, lay.row_tiles
  w_tc = 4 * lay.blocks
  nw = lay.warps
  tid = ptx.thread_id()
  lane = ptx.band(tid, 31)
  warp = ptx.shr(tid, 5)
  g = ptx.shr(lane, 2)
  q = ptx.band(lane, 3)
  if lay.ksplit > 1:  # CTA id = tile group * S + K part
    cta_id = ptx.block_id()
    cta = ptx.udiv(cta_id, lay.ksplit)
    kpart = ptx.add(ptx.mul(ptx.urem(cta_id, lay.ksplit), ptx.const(nw)), warp)
  else:
    cta = ptx.block_id()
    kpart = warp
  xg, pg, lg, og = (ptx.gmem_address(r) for r in (x_ref, planes_ref, lut_ref, out_ref))
  smem = ptx.smem_address(smem_ref)  # 1024-aligned (Pallas scratch)
  red = ptx.add(smem, ptx.const(lay.table_bytes))
  # The CTA's tiles: cta * RT + rt, or (gated epilogue) gate tile cta and up tile cta,
  # or (q/k/v epilogue) tiles j and j + Dh / 32 of head h (rows d and d + Dh / 2).
  if lay.glu:
    tile0 = cta
  elif lay.rope is not None:
    half_t = lay.rope.head_dim // 32
    tile0 = ptx.add(ptx.mul(ptx.udiv(cta, half_t), ptx.const(2 * half_t)),
                    ptx.urem(cta, half_t))
  else:
    tile0 = ptx.mul(cta, ptx.const(rt_n))
  row0 = ptx.shl(tile0, 4)
  rows = []  # per tile: (row g, row g + 8), clamped
  for rt in range(rt_n):
    ra = ptx.add(row0, ptx.add(g, ptx.const(16 * rt * lay.tile_step)))
    rows.append((ptx.umin(ra, n - 1), ptx.umin(ptx.add(ra, ptx.const(8)), n - 1)))
  if lay.pdl:  # the next kernel may take the SM room this grid leaves
    ptx.griddep_launch_dependents()

  def epilogue_loads():
    """Residual epilogue: this thread's output elements' residual (and weight) values,
    loaded before the main loop so their latency hides under it; the q/k/v epilogue's
    cos, sin and slot of each of the thread's elements."""
    if lay.rope is not None:
      return [_rope_loads(ptx, lay, _output_element(ptx, lay, tid, row0, base), rope_refs)
              for base in range(0, 128, WARPGROUP * lay.warpgroups)]
    if lay.epilogue not in (EPI_RESIDUAL, EPI_RESIDUAL_NORM):
      return []
    return [_epilogue_loads(ptx, lay, _output_element(ptx, lay, tid, row0, base),
                            res_ref, ew_ref)
            for base in range(0, lay.row_tiles * 128, WARPGROUP * lay.warpgroups)]

  if not lay.pdl:
    epi_vals = epilogue_loads()

  def make_tables():
    if not lay.smem_tables:
      return _register_tables(ptx, lay, lg, rows)
    return _shared_tables(ptx, lay, lg, smem, row0, tid, lane)  # tiles lay.tile_step apart

  parts = lay.kparts
  start = ptx.udiv(ptx.mul(kpart, ptx.const(lay.blocks)), parts)
  end = ptx.udiv(ptx.mul(ptx.add(kpart, ptx.const(1)), ptx.const(lay.blocks)), parts)
  last = ptx.select(ptx.lt(start, end), ptx.add(end, ptx.const(-1)), start)
  if lay.bulk:  # every plane word of the warp's K range in flight before the tables load
    bulk_area = ptx.add(red, ptx.const(lay.red_bytes + lay.ring_bytes + lay.x_bytes))
    bulk_read = _bulk_planes(ptx, lay, pg, bulk_area, cta, warp, lane, start, end)

  if not lay.early_loads:
    tile_a_regs = make_tables()

  def norm_partials():  # this thread's share of sum(nx[m]^2), kept until the end
    if lay.rms_eps is None:
      return None
    return _rms_partials(ptx, lay, ptx.gmem_address(nx_ref), tid)

  if not lay.pdl:
    sumsq = norm_partials()

  tiles_n = -(-n // 16)
  # TC_TILED: word offset of this lane's pair in block 0 of each of the CTA's tiles.
  tile_base = [ptx.add(ptx.mul(ptx.umin(ptx.add(tile0, ptx.const(rt * lay.tile_step)),
                                         tiles_n - 1),
                               ptx.const(lay.blocks * 64)), ptx.shl(lane, 1))
               for rt in range(rt_n)] if lay.tiled else []

  def words_for(blk):
    """[RT][2][b] plane words of block `blk` for this lane's rows."""
    out = []
    if lay.probe == "decode":  # register-made words: no plane loads
      seed = ptx.bxor(ptx.mul(blk, ptx.const(0x9E3779B1)), tid)
      return [[[ptx.bxor(seed, ptx.const((0x85EBCA77 * (1 + pi + 8 * h + 16 * rt))
                                          & 0xFFFFFFFF))
                for pi in range(b)] for h in range(2)] for rt in range(rt_n)]
    if lay.tiled:  # one 8-byte load per plane and tile: rows g and g + 8, word q
      for rt in range(rt_n):
        addr = ptx.gaddr(pg, ptx.add(tile_base[rt], ptx.shl(blk, 6)), 4)
        vs = [ptx.ld_global_v2_u32(addr, imm=pi * n * w_tc * 4) for pi in range(b)]
        out.append([[v[0] for v in vs], [v[1] for v in vs]])
      return out
    col = ptx.add(ptx.shl(blk, 2), q)
    for ra, rb in rows:
      pair = []
      for r in (ra, rb):
        addr = ptx.gaddr(pg, ptx.add(ptx.mul(r, ptx.const(w_tc)), col), 4)
        pair.append([ptx.ld_global_u32(addr, imm=pi * n * w_tc * 4) for pi in range(b)])
      out.append(pair)
    return out

  # Lanes g >= M load row M - 1: their products land in output columns >= M, which
  # are never stored, so no zeroing is needed.
  xm = ptx.umin(g, m - 1)
  zero = ptx.const(0)
  ragged_k = k % tc_layout.BLOCK != 0

  if lay.x_smem:  # x in shared memory, after the tables, reduction slots and ring
    xs = ptx.add(red, ptx.const(lay.red_bytes + lay.ring_bytes))
    x_lane = ptx.add(xs, ptx.add(ptx.mul(xm, ptx.const(lay.x_row_bytes)), ptx.shl(q, 4)))

  def b_frags(blk):
    """[8][2] B registers (two x values each) of block `blk`; 0 for rows >= M."""
    out = []
    if lay.x_smem:  # words a = 2 st + off of lane q: four 16-byte loads
      addr = ptx.add(x_lane, ptx.shl(blk, 8))
      ws = [v for j in range(4) for v in ptx.ld_shared_v4_b32(addr, imm=64 * j)]
      return [[ws[2 * st], ws[2 * st + 1]] for st in range(8)]
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
        regs.append(v)
      out.append(regs)
    return out

  acc0 = [ptx.fconst(0.0)] * (4 * rt_n)
  flat = lambda ws: [v for tile in ws for pair in tile for v in pair]
  flat_b = lambda bf: [v for st in bf for v in st]
  first = ptx.umin(start, lay.blocks - 1)
  ring = lay.stages >= 2
  pre_words = lay.prefetch and not ring and not lay.bulk
  depth = lay.depth if pre_words else 0
  last_c = ptx.umin(last, lay.blocks - 1)  # a warp with no blocks may have last = KB

  def pre_planes():  # plane words of blocks first .. first + depth - 1, clamped
    return [v for d in range(depth)
            for v in flat(words_for(ptx.umin(ptx.add(first, ptx.const(d)), last_c)))]

  if lay.pdl:  # weights only so far: their loads overlap the kernels before this one
    pre0 = pre_planes()
    ptx.griddep_wait()  # from here on, reads of what earlier kernels wrote
    epi_vals = epilogue_loads()
    sumsq = norm_partials()
  if lay.x_smem:
    _stage_x(ptx, lay, xg, xs, lane, start, end)
    ptx.warp_sync()  # a warp reads only the blocks it staged
  if ring:
    ring_issue, ring_read = _plane_ring(ptx, lay, pg, red, row0, warp, lane, g, q,
                                        start, end, last)
    for i in range(lay.stages - 1):
      ring_issue(ptx.add(start, ptx.const(i)), i)
  if not lay.pdl:
    pre0 = pre_planes()
  pre_x = lay.prefetch and not lay.x_smem and not dequant
  kp = 128 * lay.blocks
  if dequant:  # per tile and half: row (unclamped) validity and its output row base
    store_rows = []
    for rt in range(rt_n):
      halves = []
      for half in range(2):
        r = ptx.add(row0, ptx.add(g, ptx.const(16 * rt + 8 * half)))
        halves.append((ptx.lt(r, n), ptx.add(ptx.mul(r, ptx.const(kp)), ptx.shl(q, 1))))
      store_rows.append(halves)
  pre0 += flat_b(b_frags(first)) if pre_x else []
  nwords = rt_n * 2 * b * depth
  if lay.early_loads:  # the first block's loads above are in flight while the LUT
    tile_a_regs = make_tables()  # rows load: a short K range pays one latency, not two

  loop = scf.ForOp(ptx.to_index(start), ptx.to_index(end), ptx.to_index(ptx.const(1)),
                   acc0 + pre0)
  with ir.InsertionPoint(loop.body):
    blk = ptx.from_index(loop.induction_variable)
    carried = list(loop.inner_iter_args)
    acc = carried[:4 * rt_n]
    following = ptx.umin(ptx.add(blk, ptx.const(1)), last)
    nxt = []
    if ring:
      i = ptx.add(blk, ptx.mul(start, ptx.const(-1)))
      ptx.cp_async_wait(lay.stages - 2)
      ptx.warp_sync()  # block i landed for all lanes; slot (i - 1) % S was read by all
      ring_issue(ptx.add(blk, ptx.const(lay.stages - 1)),
                 ptx.urem(ptx.add(i, ptx.const(lay.stages - 1)), lay.stages))
      cur = ring_read(ptx.urem(i, lay.stages))
    elif lay.bulk:
      cur = bulk_read(blk)
    elif pre_words:  # carried: blocks blk .. blk + depth - 1; load blk + depth
      held = carried[4 * rt_n:4 * rt_n + nwords]
      it = iter(held)
      cur = [[[next(it) for _ in range(b)] for _ in range(2)] for _ in range(rt_n)]
      ahead = ptx.umin(ptx.add(blk, ptx.const(depth)), last)
      nxt = held[rt_n * 2 * b:] + flat(words_for(ahead))
    else:
      cur = words_for(blk)
    if dequant:
      for rt in range(rt_n):
        regs = list(tile_a_regs(rt, cur[rt]))
        for half, (ok, base) in enumerate(store_rows[rt]):
          with ptx.If(ok):
            addr = ptx.gaddr(og, ptx.add(base, ptx.shl(blk, 7)), 2)
            for st, a in enumerate(regs):  # a = [g01, h01, g23, h23]
              ptx.st_global_b32(addr, a[half], imm=32 * st)
              ptx.st_global_b32(addr, a[2 + half], imm=32 * st + 16)
    else:
      if pre_x:
        itb = iter(carried[4 * rt_n + nwords:])
        bf = [[next(itb), next(itb)] for _ in range(8)]
        nxt += flat_b(b_frags(following))
      else:
        bf = b_frags(blk)
    if lay.probe == "loads":  # fold every loaded word into one float, no decode
      folded = None
      for v in flat(cur) + flat_b(bf):
        folded = v if folded is None else ptx.bxor(folded, v)
      mant = ptx.bor(ptx.band(folded, 0x007FFFFF), ptx.const(0x3F800000))
      acc[0] = ptx.fadd(acc[0], ptx.bits_f32(mant))
    elif not dequant:
      for rt in range(rt_n):
        a_acc = acc[4 * rt:4 * rt + 4]
        for st, a_regs in enumerate(tile_a_regs(rt, cur[rt])):
          a_acc = ptx.mma_m16n8k16(a_regs, bf[st], a_acc, lay.mma_dtype)
        acc[4 * rt:4 * rt + 4] = a_acc
    scf.YieldOp(acc + nxt)
  acc = list(loop.results[:4 * rt_n])
  if ring:
    ptx.cp_async_wait(0)  # the ring's last (empty) copies land before the CTA ends
  if dequant:
    return

  # Cross-warp sum through shared memory: red[warp][rt][lane][4].
  for rt in range(rt_n):
    slot = ptx.add(red, ptx.shl(ptx.add(ptx.mul(warp, ptx.const(rt_n * 32)),
                                        ptx.add(ptx.const(32 * rt), lane)), 4))
    ptx.st_shared_v4_f32(slot, acc[4 * rt:4 * rt + 4])
  if lay.rms_eps is not None:  # norm[warp][m]: the warp's sums of squares
    norm = ptx.add(smem, ptx.const(lay.smem_bytes - lay.norm_bytes))
    for mm_, v in enumerate(sumsq):
      tot_w = ptx.warp_sum(v)
      with ptx.If(ptx.eq(lane, ptx.const(0))):
        ptx.st_shared_f32(ptx.add(norm, ptx.shl(ptx.add(ptx.mul(warp, ptx.const(m)),
                                                        ptx.const(mm_)), 2)), tot_w)
  ptx.cta_sync()
  nthreads = WARPGROUP * lay.warpgroups
  elems = rt_n * 32 * 4
  if lay.glu:
    _store_glu(ptx, lay, tid, row0, red, og, nw, norm if lay.rms_eps is not None else None)
    return
  if lay.rope is not None:
    _store_rope(ptx, lay, tid, row0, red, og, nw,
                norm if lay.rms_eps is not None else None, rope_refs, epi_vals)
    return
  for i, base in enumerate(range(0, elems, nthreads)):
    e, row, mm, inside = _output_element(ptx, lay, tid, row0, base)
    with ptx.If(inside):
      tot = None
      for w in range(nw):
        v = ptx.ld_shared_f32(ptx.add(red, ptx.shl(e, 2)), imm=w * elems * 4)
        tot = v if tot is None else ptx.fadd(tot, v)
      ok = ptx.land(ptx.lt(row, n), ptx.lt(mm, m))
      if lay.rms_eps is not None:
        tot = arith.mulf(tot, _rms_scale(ptx, lay, norm, ptx.umin(mm, m - 1)))
      with ptx.If(ok):
        idx = ptx.add(ptx.mul(mm, ptx.const(n)), row)
        if lay.epilogue:  # a residual one (the gated epilogue returned above)
          _store_epilogue(ptx, lay, idx, tot, og, out2_ref, *epi_vals[i])
        elif lay.ksplit > 1:
          ptx.red_add_global_f32(ptx.gaddr(og, idx, 4), tot)
        else:
          ptx.st_global_f32(ptx.gaddr(og, idx, 4), tot)


def _partner_sums(ptx, lay: _Layout, red, e, mm, nw: int, norm):
  """The two-tile epilogues (gated, q/k/v): the cross-warp sums of element e of tile 0
  and of its partner e + 128 in tile 1, times the folded norm's 1 / rms where there is
  one, each rounded to bf16 (as the decoder's bf16 linear output), in f32."""
  from jaxlib.mlir.dialects import arith
  elems = lay.row_tiles * 32 * 4
  out = []
  for h in range(2):
    tot = None
    for w in range(nw):
      v = ptx.ld_shared_f32(ptx.add(red, ptx.shl(e, 2)), imm=(w * elems + 128 * h) * 4)
      tot = v if tot is None else ptx.fadd(tot, v)
    if norm is not None:
      tot = arith.mulf(tot, _rms_scale(ptx, lay, norm, ptx.umin(mm, lay.m - 1)))
    out.append(ptx.bf16_bits_to_f32(ptx.f32_to_bf16_bits(tot)))
  return out


def _store_glu(ptx, lay: _Layout, tid, row0, red, og, nw: int, norm):
  """The gated epilogue: element e of tile 0 (gate) and e + 128 of tile 1 (up) are the
  same output row; out[mm, row] = bf16(bf16(silu(g)) * u), g and u rounded to bf16
  first (`glu_reference`)."""
  from jaxlib.mlir.dialects import arith
  f, m = lay.n // 2, lay.m
  one = ptx.fconst(1.0)
  to16 = lambda v: ptx.bf16_bits_to_f32(ptx.f32_to_bf16_bits(v))
  for base in range(0, 128, WARPGROUP * lay.warpgroups):
    e, row, mm, _ = _output_element(ptx, lay, tid, row0, base)
    with ptx.If(ptx.lt(e, 128)):  # tile 0's elements only
      gate, up = _partner_sums(ptx, lay, red, e, mm, nw, norm)
      sig = arith.divf(one, ptx.fadd(one, ptx.exp2_approx(
          arith.mulf(gate, ptx.fconst(-1.4426950408889634)))))
      h = ptx.f32_to_bf16_bits(arith.mulf(to16(arith.mulf(gate, sig)), up))
      with ptx.If(ptx.land(ptx.lt(row, f), ptx.lt(mm, m))):
        ptx.st_global_b16(ptx.gaddr(og, ptx.add(ptx.mul(mm, ptx.const(f)), row), 2), h)


def _rope_loads(ptx, lay: _Layout, element, rope_refs):
  """(cos, sin, slot) of one tile-0 output element of the q/k/v epilogue, loaded at
  clamped (always valid) addresses: d = row % Dh < Dh / 2, activation row mm."""
  _, row, mm, _ = element
  half = lay.rope.head_dim // 2
  mc = ptx.umin(mm, lay.m - 1)
  d = ptx.urem(row, lay.rope.head_dim)
  i = ptx.add(ptx.mul(mc, ptx.const(half)), ptx.umin(d, half - 1))
  cos_ref, sin_ref, slot_ref = rope_refs[:3]
  cs = ptx.ld_global_f32(ptx.gaddr(ptx.gmem_address(cos_ref), i, 4))
  sn = ptx.ld_global_f32(ptx.gaddr(ptx.gmem_address(sin_ref), i, 4))
  slot = ptx.ld_global_u32(ptx.gaddr(ptx.gmem_address(slot_ref), mc, 4))
  return cs, sn, ptx.umin(slot, lay.rope.slots - 1)


def _store_rope(ptx, lay: _Layout, tid, row0, red, og, nw: int, norm, rope_refs, loads):
  """The q/k/v epilogue: element e of tile 0 (row r, r % Dh < Dh / 2) and e + 128 of
  tile 1 (row r + Dh / 2) are rotary partners a, b (rounded to bf16 first, as the
  decoder's bf16 linear output): a' = a cos - b sin, b' = b cos + a sin in f32.
  q rows: out[mm, r] = bf16(bf16(a') * q_scale) (and r + Dh / 2); k rows: bf16(a'),
  bf16(b') into the k cache at [mm, slot[mm], head, d]; v rows: a, b into the v cache
  (`rope_kv_reference`)."""
  from jaxlib.mlir.dialects import arith
  rs, m = lay.rope, lay.m
  hd, half = rs.head_dim, rs.head_dim // 2
  kvh = rs.kv_rows // hd
  to16 = lambda v: ptx.bf16_bits_to_f32(ptx.f32_to_bf16_bits(v))
  kcg, vcg = (ptx.gmem_address(r) for r in rope_refs[3:])
  for i, base in enumerate(range(0, 128, WARPGROUP * lay.warpgroups)):
    e, row, mm, _ = _output_element(ptx, lay, tid, row0, base)
    cs, sn, slot = loads[i]
    with ptx.If(ptx.land(ptx.lt(e, 128), ptx.lt(mm, m))):
      a, b = _partner_sums(ptx, lay, red, e, mm, nw, norm)
      ra = arith.subf(arith.mulf(a, cs), arith.mulf(b, sn))
      rb = ptx.fadd(arith.mulf(b, cs), arith.mulf(a, sn))
      d = ptx.urem(row, hd)
      with ptx.If(ptx.lt(row, rs.q_rows)):
        scale = ptx.fconst(rs.q_scale)
        idx = ptx.add(ptx.mul(mm, ptx.const(rs.q_rows)), row)
        ptx.st_global_b16(ptx.gaddr(og, idx, 2), ptx.f32_to_bf16_bits(
            arith.mulf(to16(ra), scale)))
        ptx.st_global_b16(ptx.gaddr(og, ptx.add(idx, ptx.const(half)), 2),
                          ptx.f32_to_bf16_bits(arith.mulf(to16(rb), scale)))
      for cg, lo, vals in ((kcg, rs.q_rows, (ra, rb)), (vcg, rs.q_rows + rs.kv_rows, (a, b))):
        inside = ptx.land(ptx.lt(ptx.const(lo - 1), row),
                          ptx.lt(row, lo + rs.kv_rows))
        with ptx.If(inside):
          head = ptx.udiv(ptx.add(row, ptx.const(-lo)), hd)
          cell = ptx.add(ptx.mul(mm, ptx.const(rs.slots)), slot)
          idx = ptx.add(ptx.mul(ptx.add(ptx.mul(cell, ptx.const(kvh)), head),
                                ptx.const(hd)), d)
          ptx.st_global_b16(ptx.gaddr(cg, idx, 2), ptx.f32_to_bf16_bits(vals[0]))
          ptx.st_global_b16(ptx.gaddr(cg, ptx.add(idx, ptx.const(half)), 2),
                            ptx.f32_to_bf16_bits(vals[1]))


def _output_element(ptx, lay: _Layout, tid, row0, base: int):
  """(e, row, activation row mm, e in range) of the output element e = tid + base that
  the thread finishes: e = (tile rt, lane (g, q), accumulator c) of the reduction slots."""
  e = ptx.add(tid, ptx.const(base))
  rt = ptx.shr(e, 7)
  ln = ptx.band(ptx.shr(e, 2), 31)
  c = ptx.band(e, 3)
  row = ptx.add(ptx.add(row0, ptx.shl(rt, 4)),
                ptx.add(ptx.shr(ln, 2), ptx.shl(ptx.shr(c, 1), 3)))
  mm = ptx.add(ptx.shl(ptx.band(ln, 3), 1), ptx.band(c, 1))
  return e, row, mm, ptx.lt(e, lay.row_tiles * 128)


def _epilogue_loads(ptx, lay: _Layout, element, res_ref, ew_ref):
  """(residual, weight or None) of one output element as f32, loaded at clamped
  (always valid) addresses."""
  _, row, mm, _ = element
  rc, mc = ptx.umin(row, lay.n - 1), ptx.umin(mm, lay.m - 1)
  idx = ptx.add(ptx.mul(mc, ptx.const(lay.n)), rc)
  r = ptx.bf16_bits_to_f32(ptx.ld_global_u16(ptx.gaddr(ptx.gmem_address(res_ref), idx, 2)))
  if lay.epilogue != EPI_RESIDUAL_NORM:
    return r, None
  wg = ptx.gmem_address(ew_ref)
  if lay.epi_w_bf16:
    return r, ptx.bf16_bits_to_f32(ptx.ld_global_u16(ptx.gaddr(wg, rc, 2)))
  return r, ptx.ld_global_f32(ptx.gaddr(wg, rc, 4))


def _store_epilogue(ptx, lay: _Layout, idx, tot, og, out2_ref, r, wv):
  """One output element of a residual epilogue (`_emit`): h = bf16(r + bf16(y)) at
  og[idx]; with EPI_RESIDUAL_NORM also bf16(h * wv) at out2[idx]."""
  from jaxlib.mlir.dialects import arith
  y16 = ptx.bf16_bits_to_f32(ptx.f32_to_bf16_bits(tot))
  h = ptx.f32_to_bf16_bits(ptx.fadd(r, y16))
  ptx.st_global_b16(ptx.gaddr(og, idx, 2), h)
  if lay.epilogue == EPI_RESIDUAL_NORM:
    xg = ptx.f32_to_bf16_bits(arith.mulf(ptx.bf16_bits_to_f32(h), wv))
    ptx.st_global_b16(ptx.gaddr(ptx.gmem_address(out2_ref), idx, 2), xg)



def _rms_partials(ptx, lay: _Layout, nxg, tid):
  """Per activation row m, this thread's sum of nx[m, k]^2 over its 16-byte pieces
  (piece i = tid + j * threads of the row's K / 8; K % 8 == 0), f32."""
  vecs = lay.k // 8  # 16-byte pieces per row
  threads = WARPGROUP * lay.warpgroups
  zero = ptx.const(0)
  out = []
  for mm in range(lay.m):
    acc = ptx.fconst(0.0)
    for j in range(-(-vecs // threads)):
      i = ptx.add(tid, ptx.const(j * threads))
      inside = ptx.lt(i, vecs) if (j + 1) * threads > vecs else None
      ic = ptx.umin(i, vecs - 1) if inside is not None else i
      ws = ptx.ld_global_v4_u32(ptx.gaddr(nxg, ptx.add(ptx.const(mm * vecs), ic), 16))
      for w in ws:
        if inside is not None:
          w = ptx.select(inside, w, zero)
        lo = ptx.bf16_bits_to_f32(w)
        hi = ptx.bits_f32(ptx.band(w, ptx.const(0xFFFF0000)))
        acc = ptx.fma(hi, hi, ptx.fma(lo, lo, acc))
    out.append(acc)
  return out


def _rms_scale(ptx, lay: _Layout, norm, mm):
  """1 / sqrt(sum_w norm[w][mm] / K + eps) for activation row mm (an i32 value)."""
  from jaxlib.mlir.dialects import arith
  tot = None
  for w in range(lay.warps):
    v = ptx.ld_shared_f32(ptx.add(norm, ptx.shl(mm, 2)), imm=4 * w * lay.m)
    tot = v if tot is None else ptx.fadd(tot, v)
  ms = ptx.fma(tot, ptx.fconst(1.0 / lay.k), ptx.fconst(lay.rms_eps))
  return arith.divf(ptx.fconst(1.0), ptx.sqrt_f32(ms))


def _plane_ring(ptx, lay: _Layout, pg, red, row0, warp, lane, g, q, start, end, last):
  """Per-warp ring of S blocks of plane words in shared memory, filled by `cp.async`.

  Slot layout [plane][row of the CTA (16 RT)][4 words] (16 bytes per row and plane:
  the 4 words of one block); copy c = lane + 32 j moves (plane c // R, row c % R).
  Returns issue(blk, slot) (one commit group; blocks >= end read nothing) and
  read(slot) -> [RT][2][b] words of this lane's rows (word q of rows g, g + 8).
  """
  b, n, rt_n = lay.bits, lay.n, lay.row_tiles
  rows = 16 * rt_n
  w_tc = 4 * lay.blocks
  ring = ptx.add(ptx.add(red, ptx.const(lay.red_bytes)),
                 ptx.mul(warp, ptx.const(lay.stages * lay.stage_bytes)))
  copies = []
  if lay.tiled:  # slot [plane][tile][256 B], copy c = 16 bytes c % 16 of chunk c // 16
    pieces = rt_n * b * 16
    tiles_n = n // 16
    for c0 in range(0, pieces, 32):
      c = ptx.add(lane, ptx.const(c0))
      chunk = ptx.shr(c, 4)
      p, rt = ptx.udiv(chunk, rt_n), ptx.urem(chunk, rt_n)
      tile = ptx.umin(ptx.add(ptx.udiv(row0, 16), rt), tiles_n - 1)
      word = ptx.add(ptx.mul(p, ptx.const(n * w_tc)),
                     ptx.add(ptx.mul(tile, ptx.const(lay.blocks * 64)),
                             ptx.shl(ptx.band(c, 15), 2)))
      ok = ptx.lt(c, pieces) if c0 + 32 > pieces else None
      copies.append((word, ptx.shl(c, 4), ok))
  else:  # slot [plane][row of the CTA][16 B]
    for c0 in range(0, rows * b, 32):
      c = ptx.add(lane, ptx.const(c0))
      p, r = ptx.udiv(c, rows), ptx.urem(c, rows)
      src_row = ptx.umin(ptx.add(row0, r), n - 1)
      ok = ptx.lt(c, rows * b) if c0 + 32 > rows * b else None
      word = ptx.mul(ptx.add(ptx.mul(p, ptx.const(n)), src_row), ptx.const(w_tc))
      copies.append((word, ptx.shl(c, 4), ok))
  blk_words = 6 if lay.tiled else 2  # log2 of the words per row (tile) and block

  def issue(blk, slot):
    valid = ptx.lt(blk, end)
    blk_c = ptx.umin(blk, last)
    base = ptx.add(ring, ptx.mul(slot if not isinstance(slot, int) else ptx.const(slot),
                                 ptx.const(lay.stage_bytes)))
    for word, dst, ok in copies:
      v = valid if ok is None else ptx.land(valid, ok)
      src = ptx.gaddr(pg, ptx.add(word, ptx.shl(blk_c, blk_words)), 4)
      ptx.cp_async_16(ptx.add(base, dst), src, ptx.select(v, ptx.const(16), ptx.const(0)))
    ptx.cp_async_commit()

  lane_off = ptx.add(ptx.shl(g, 4), ptx.shl(q, 2))

  def read(slot):
    out = []
    if lay.tiled:
      base = ptx.add(ptx.add(ring, ptx.mul(slot, ptx.const(lay.stage_bytes))),
                     ptx.shl(lane, 3))
      for rt in range(rt_n):
        vs = [ptx.ld_shared_v2_b32(base, imm=(pi * rt_n + rt) * 256) for pi in range(b)]
        out.append([[v[0] for v in vs], [v[1] for v in vs]])
      return out
    base = ptx.add(ptx.add(ring, ptx.mul(slot, ptx.const(lay.stage_bytes))), lane_off)
    for rt in range(rt_n):
      pair = []
      for half in range(2):
        row = 16 * rt + 8 * half
        pair.append([ptx.ld_shared_b32(base, imm=(pi * rows + row) * 16)
                     for pi in range(b)])
      out.append(pair)
    return out

  return issue, read


def _bulk_planes(ptx, lay: _Layout, pg, area, cta, warp, lane, start, end):
  """Issues the bulk copies of a warp's plane words; returns read(blk) -> [RT][2][b].

  Warp w's region (at area + w * bulk_warp_bytes) holds [tile][plane][block - start]
  [256 B], the TC_TILED bytes of its blocks (lane L's pair at 8 L); its C mbarriers sit
  after the regions of all warps. Lane 0 initialises the barriers and, per chunk c of
  `bulk_chunk` blocks, announces the chunk's bytes (`arrive.expect_tx`) and issues one
  `cp.async.bulk` per tile and plane; chunks past the warp's range copy nothing and
  complete on the arrival alone. read(blk) waits for blk's chunk (phase 0; a completed
  phase answers at once) and loads the lane's two words per tile and plane.
  """
  b, n, rt_n = lay.bits, lay.n, lay.row_tiles
  w_tc = 4 * lay.blocks
  tiles_n = n // 16
  nblk, chunk = lay.bulk_blocks, lay.bulk_chunk
  region = ptx.add(area, ptx.mul(warp, ptx.const(lay.bulk_warp_bytes)))
  bars = ptx.add(ptx.add(area, ptx.const(lay.warps * lay.bulk_warp_bytes)),
                 ptx.shl(ptx.mul(warp, ptx.const(lay.bulk)), 3))
  with ptx.If(ptx.eq(lane, ptx.const(0))):
    for c in range(lay.bulk):
      ptx.mbarrier_init(ptx.add(bars, ptx.const(8 * c)), 1)
    ptx.fence_mbarrier_init()
    for c in range(lay.bulk):
      b0 = ptx.umin(ptx.add(start, ptx.const(c * chunk)), end)
      count = ptx.umin(ptx.add(end, ptx.mul(b0, ptx.const(-1))), ptx.const(chunk))
      size = ptx.shl(count, 8)  # bytes per tile and plane
      bar = ptx.add(bars, ptx.const(8 * c))
      ptx.mbarrier_arrive_expect_tx(bar, ptx.mul(size, ptx.const(rt_n * b)))
      with ptx.If(ptx.lt(ptx.const(0), count)):
        dst0 = ptx.add(region, ptx.shl(ptx.add(b0, ptx.mul(start, ptx.const(-1))), 8))
        for rt in range(rt_n):
          tile = ptx.umin(ptx.add(ptx.mul(cta, ptx.const(rt_n)), ptx.const(rt)), tiles_n - 1)
          word0 = ptx.add(ptx.mul(tile, ptx.const(lay.blocks * 64)), ptx.shl(b0, 6))
          for pi in range(b):
            src = ptx.gaddr(pg, word0, 4, extra=pi * n * w_tc * 4)
            dst = ptx.add(dst0, ptx.const((rt * b + pi) * nblk * 256))
            ptx.cp_async_bulk_g2s(dst, src, size, bar)
  ptx.warp_sync()  # the barriers are initialised before any lane waits on them
  lane8 = ptx.shl(lane, 3)

  def read(blk):
    rel = ptx.add(blk, ptx.mul(start, ptx.const(-1)))
    ptx.mbarrier_wait_parity(ptx.add(bars, ptx.shl(ptx.udiv(rel, chunk), 3)), 0)
    base = ptx.add(region, ptx.add(ptx.shl(rel, 8), lane8))
    out = []
    for rt in range(rt_n):
      vs = [ptx.ld_shared_v2_b32(base, imm=(rt * b + pi) * nblk * 256) for pi in range(b)]
      out.append([[v[0] for v in vs], [v[1] for v in vs]])
    return out

  return read


def _stage_x(ptx, lay: _Layout, xg, xs, lane, start, end):
  """Copies x[:, blocks start..end) into shared memory in B-fragment order.

  Row m of x sits at m * x_row_bytes; block blk at blk * 256 holds, at 64 j + 16 q + 4 i,
  the word (x pair) a = 4 j + i of lane q, i.e. columns 128 blk + 8 a + 2 q + {0, 1}:
  the B fragments of steps 2 j, 2 j + 1 (`b_frags`). A unit (m, block, j) is 64
  contiguous bytes of x: four 16-byte loads whose words are re-grouped by q in
  registers (a 4x4 transpose by renaming) and stored as four 16-byte stores.
  """
  m, k, kb = lay.m, lay.k, lay.blocks
  per_warp = -(-kb // lay.kparts)  # most blocks a warp owns
  units = m * per_warp * 4
  ragged = k % tc_layout.BLOCK != 0
  group = 2  # units per lane whose loads are in flight together

  def load(i):
    u = ptx.add(lane, ptx.const(32 * i))
    mm = ptx.umin(ptx.udiv(u, per_warp * 4), m - 1)
    r = ptx.urem(u, per_warp * 4)
    blk = ptx.add(start, ptx.shr(r, 2))
    valid = ptx.lt(blk, end)
    if 32 * (i + 1) > units:
      valid = ptx.land(valid, ptx.lt(u, units))
    blk = ptx.select(valid, blk, start)
    col0 = ptx.add(ptx.shl(blk, 7), ptx.shl(ptx.band(r, 3), 5))
    row = ptx.mul(mm, ptx.const(k))
    if ragged:  # word by word, zero past K (K is even)
      regs = []
      for a in range(4):
        quad = []
        for qq in range(4):
          col = ptx.add(col0, ptx.const(8 * a + 2 * qq))
          v = ptx.ld_global_u32(ptx.gaddr(xg, ptx.add(row, ptx.umin(col, k - 2)), 2))
          quad.append(ptx.select(ptx.lt(col, k), v, ptx.const(0)))
        regs.append(quad)
    else:
      addr = ptx.gaddr(xg, ptx.add(row, col0), 2)
      regs = [ptx.ld_global_v4_u32(ptx.gaddr(addr, ptx.const(0), 1, extra=16 * a))
              for a in range(4)]
    dst = ptx.add(xs, ptx.add(ptx.mul(mm, ptx.const(lay.x_row_bytes)),
                              ptx.add(ptx.shl(blk, 8), ptx.shl(ptx.band(r, 3), 6))))
    return valid, dst, regs

  def store(valid, dst, regs):
    with ptx.If(valid):
      for qq in range(4):
        ptx.st_shared_v4_b32(dst, [regs[a][qq] for a in range(4)], imm=16 * qq)

  iters = -(-units // 32)
  for i0 in range(0, iters, group):
    loaded = [load(i) for i in range(i0, min(iters, i0 + group))]
    for args in loaded:
      store(*args)


def _register_tables(ptx, lay: _Layout, lg, rows):
  """b <= 4: byte tables of each row's LUT in registers; returns the per-tile decoder
  (tile, [2][b] plane words) -> 8 steps x 4 A registers."""
  b = lay.bits

  def tables(row):  # (lo bytes, hi bytes), 2 (b = 3) or 4 (b = 4) registers each
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

  def lookup(tab, sel, s2=None):
    lo, hi = tab
    if b == 3:
      l = ptx.prmt(lo[0], lo[1], sel)
      hh = ptx.prmt(hi[0], hi[1], sel)
    else:
      if s2 is None:  # both selectors from the 4-bit nibbles
        sl = ptx.band(sel, 0x7777)
        s2 = ptx.bor(ptx.band(ptx.shr(sel, 1), 0x4444), ptx.const(0x3210))
      else:  # split4: sel holds the low three bits already
        sl = sel
      l = ptx.prmt(ptx.prmt(lo[0], lo[1], sl), ptx.prmt(lo[2], lo[3], sl), s2)
      hh = ptx.prmt(ptx.prmt(hi[0], hi[1], sl), ptx.prmt(hi[2], hi[3], sl), s2)
    return ptx.prmt(l, hh, 0x5140), ptx.prmt(l, hh, 0x7362)

  def tile_a_regs(rt, words):
    if lay.split4:
      cw = [_field_words(ptx, words[i][1:], 3) for i in range(2)]
      sw = [_select_words(ptx, words[i][0]) for i in range(2)]
    else:
      cw = [_field_words(ptx, words[0], b), _field_words(ptx, words[1], b)]
    for st in range(8):
      s, h = st // 2, st % 2
      regs = []
      for half in range(2):  # row g, row g + 8
        sel = cw[half][s] if h == 0 else ptx.shr(cw[half][s], 16)
        s2 = None
        if lay.split4:
          s2 = sw[half][s] if h == 0 else ptx.shr(sw[half][s], 16)
        regs.append(lookup(tabs[rt][half], sel, s2))
      yield [regs[0][0], regs[1][0], regs[0][1], regs[1][1]]

  return tile_a_regs


def _shared_tables(ptx, lay: _Layout, lg, smem, row0, tid, lane):
  """b >= 5: writes the tiles' tables to shared memory (layout `slot_offset`), then
  returns the per-tile decoder (tile, [2][b] plane words) -> 8 steps x 4 A registers."""
  b, n, rt_n = lay.bits, lay.n, lay.row_tiles
  # Fill: chunk c = (tile, g, 8 entries); a thread loads 16 bytes of row g and of row
  # g + 8, pairs them per entry and stores each pair for the 4 lanes of row g.
  chunks = rt_n << b
  nthreads = WARPGROUP * lay.warpgroups
  for base in range(0, chunks, nthreads):
    c = ptx.add(tid, ptx.const(base))

    def fill(c=c):
      tile = ptx.shr(c, b)
      g = ptx.band(ptx.shr(c, b - 3), 7)
      e0 = ptx.shl(ptx.band(c, (1 << (b - 3)) - 1), 3)
      ra = ptx.add(row0, ptx.add(ptx.mul(tile, ptx.const(16 * lay.tile_step)), g))
      h = []
      for r in (ptx.umin(ra, n - 1), ptx.umin(ptx.add(ra, ptx.const(8)), n - 1)):
        v = ptx.ld_global_v4_u32(ptx.gaddr(lg, ptx.add(ptx.shl(r, b), e0), 2))
        h.append([ptx.f16x2_to_bf16x2(x) for x in v] if lay.mma_dtype == "bf16" else v)
      slot = ptx.add(ptx.mul(ptx.shr(tile, 1), ptx.const((1 << b) * SLOT_STRIDE)),
                     ptx.add(ptx.shl(e0, 8), ptx.add(ptx.shl(ptx.band(tile, 1), 7),
                                                     ptx.shl(g, 4))))
      addr = ptx.add(smem, slot)
      for i in range(4):
        for j, sel in enumerate((PACK_LOW, PACK_HIGH)):  # entry e0 + 2i + j
          w = ptx.prmt(h[0][i], h[1][i], sel)
          ptx.st_shared_v4_b32(addr, [w] * 4, imm=(2 * i + j) * SLOT_STRIDE)

    if base + nthreads <= chunks:
      fill()
    else:
      with ptx.If(ptx.lt(c, chunks)):
        fill()
  ptx.cta_sync()

  lane4 = ptx.shl(lane, 2)
  lane_base = [lane4, ptx.bor(lane4, ptx.const(128))]  # tile parity in bit 7
  pair_base = [ptx.add(smem, ptx.const(p * (1 << b) * SLOT_STRIDE))
               for p in range(-(-rt_n // 2))]

  def tile_a_regs(rt, words):
    cw = [ptx.transpose8(words[0]), ptx.transpose8(words[1])]
    for st in range(8):
      vals = []
      for half in range(2):  # row g, row g + 8
        v = []
        for t in range(4):
          sw, tb = code_place(st, t)
          off = ptx.prmt(cw[half][sw], lane_base[rt % 2], address_selector(tb))
          v.append(ptx.ld_shared_b32(ptx.add(off, pair_base[rt // 2])))
        vals.append(v)
      g01 = ptx.prmt(vals[0][0], vals[0][1], PACK_LOW)
      g23 = ptx.prmt(vals[0][2], vals[0][3], PACK_LOW)
      h01 = ptx.prmt(vals[1][0], vals[1][1], PACK_HIGH)
      h23 = ptx.prmt(vals[1][2], vals[1][3], PACK_HIGH)
      yield [g01, h01, g23, h23]

  return tile_a_regs


def gemv_tc_reference(x, planes_tc, lut, *, bits: int, in_features: int):
  """Pure-jnp twin: planes in tensor-core order -> [M, N] f32."""
  from anyprec_jax.pallas.mosaic.gemv import gemv_reference
  return gemv_reference(x, tc_layout.from_tc(planes_tc, in_features), lut, bits=bits,
                        in_features=in_features)


def gemv_tc_rms_reference(x, planes_tc, lut, norm_x, rms_eps: float, *, bits: int,
                          in_features: int):
  """Pure-jnp twin of `gemv_tc` with a folded RMSNorm -> [M, N] f32."""
  nx = norm_x.astype(jnp.float32)
  scale = jax.lax.rsqrt(jnp.mean(nx * nx, axis=-1, keepdims=True) + rms_eps)  # [M, 1]
  return gemv_tc_reference(x, planes_tc, lut, bits=bits, in_features=in_features) * scale


def residual_reference(y, residual, epi_weight=None):
  """Pure-jnp twin of the residual epilogue: y [M, N] f32 -> h = bf16(residual +
  bf16(y)), and (h, bf16(h * epi_weight)) where epi_weight [N] is given."""
  h = (residual.astype(jnp.float32)
       + y.astype(jnp.bfloat16).astype(jnp.float32)).astype(jnp.bfloat16)
  if epi_weight is None:
    return h
  return h, (h.astype(jnp.float32) * epi_weight.astype(jnp.float32)).astype(jnp.bfloat16)


def glu_reference(y):
  """Pure-jnp twin of the gated epilogue: y [M, 2F] f32 (gate over up) -> bf16(
  bf16(silu(g)) * u) [M, F], with g and u rounded to bf16 first (the decoder's
  `act(gate) * up` on the bf16 outputs of the fused gate/up linear)."""
  y16 = y.astype(jnp.bfloat16).astype(jnp.float32)
  f = y.shape[-1] // 2
  g, u = y16[..., :f], y16[..., f:]
  s = (g / (1.0 + jnp.exp(-g))).astype(jnp.bfloat16).astype(jnp.float32)
  return (s * u).astype(jnp.bfloat16)


def _check_operands(x, planes_tc, lut, bits: int) -> tuple[int, int, int]:
  """(M, K, N) of a GEMV's operands, or a ValueError naming the one that does not fit."""
  m, k = x.shape
  p, n, words = planes_tc.shape
  if p < bits or words != tc_layout.num_words(k):
    raise ValueError(f"planes {planes_tc.shape} are not {bits} tensor-core-order planes "
                     f"of K={k} (expected {tc_layout.num_words(k)} words per row)")
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape}, expected {(n, 1 << bits)}")
  return m, k, n


def rope_kv_reference(y, cos, sin, slots, k_cache, v_cache, spec: RopeSpec):
  """Pure-jnp twin of the q/k/v epilogue: y [M, N] f32 of a fused q/k/v linear ->
  (q [M, q_rows] bf16 rotated and scaled, k and v caches with slot slots[m] of
  sequence m written), rounding as the decoder does (bf16 linear output, f32 rotary,
  bf16 q times the bf16 scale).

  Args:
    y: [M, N] f32; cos, sin: [M, Dh / 2] f32; slots: [M] int; k_cache, v_cache:
      [M, S, KVH, Dh] bf16; spec: the shapes.
  """
  hd, half = spec.head_dim, spec.head_dim // 2
  m = y.shape[0]
  y16 = y.astype(jnp.bfloat16).astype(jnp.float32)
  qk = y16[:, :spec.q_rows + spec.kv_rows].reshape(m, -1, hd)  # [M, H + KVH, Dh]
  a, b = qk[..., :half], qk[..., half:]
  c, s_ = cos[:, None, :], sin[:, None, :]
  rot = jnp.concatenate([a * c - b * s_, b * c + a * s_], axis=-1)  # [M, H + KVH, Dh]
  nq = spec.q_rows // hd
  q = (rot[:, :nq].astype(jnp.bfloat16).astype(jnp.float32)
       * spec.q_scale).astype(jnp.bfloat16).reshape(m, spec.q_rows)
  k = rot[:, nq:].astype(jnp.bfloat16)  # [M, KVH, Dh]
  v = y16[:, spec.q_rows + spec.kv_rows:].reshape(m, -1, hd).astype(jnp.bfloat16)
  write = jax.vmap(lambda cache, new, i: jax.lax.dynamic_update_slice(
      cache, new[None], (i, 0, 0)))
  slots = jnp.clip(slots.astype(jnp.int32), 0, spec.slots - 1)
  return q, write(k_cache, k, slots), write(v_cache, v, slots)


def gemv_tc_rope_kv(x: jax.Array, planes_tc: jax.Array, lut: jax.Array, cos: jax.Array,
                    sin: jax.Array, slots: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, *, bits: int, spec: RopeSpec,
                    cfg: TcGemvConfig = TcGemvConfig(), tiled: bool = False,
                    norm_x: jax.Array | None = None, rms_eps: float | None = None):
  """A decode step's fused q/k/v projection with its RoPE and KV-cache write in the
  epilogue (`rope_kv_reference` of `gemv_tc`'s y): one launch instead of the GEMV,
  the q rotary and the two cache writes.

  Each CTA takes tiles j and j + Dh / 32 of one head (rows d and d + Dh / 2 are
  rotary partners), so the weight needs no re-ordering. The caches are written in
  place (mutable refs: XLA aliases them, the rest of each cache is untouched).

  Args:
    x: [M, K] activations (or the folded norm's x * w), M <= 8 sequences.
    planes_tc, lut, bits, cfg (row_tiles 2, no ring / bulk / K split), tiled, norm_x,
      rms_eps: as `gemv_tc`.
    cos, sin: [M, Dh / 2] f32 (each sequence's position); slots: [M] int32, the slot
      each sequence writes (clamped to the cache).
    k_cache, v_cache: [M, S, KVH, Dh] bf16.
    spec: the q/k/v shapes (`RopeSpec`; slots = S).

  Returns:
    (q [M, q_rows] bf16, k_cache, v_cache).
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  m, k, n = _check_operands(x, planes_tc, lut, bits)
  hd = spec.head_dim
  cache_shape = (m, spec.slots, spec.kv_rows // hd, hd)
  if (k_cache.shape != cache_shape or v_cache.shape != cache_shape
      or k_cache.dtype != jnp.bfloat16 or v_cache.dtype != jnp.bfloat16):
    raise ValueError(f"caches {k_cache.shape} {k_cache.dtype}, {v_cache.shape} "
                     f"{v_cache.dtype}: expected bf16 {cache_shape}")
  if cos.shape != (m, hd // 2) or sin.shape != (m, hd // 2) or slots.shape != (m,):
    raise ValueError(f"cos {cos.shape}, sin {sin.shape}, slots {slots.shape}: expected "
                     f"{(m, hd // 2)} twice and {(m,)}")
  if (norm_x is None) != (rms_eps is None):
    raise ValueError("norm_x and rms_eps come together")
  if lut.dtype != jnp.float16:
    lut = lut.astype(jnp.float16)
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.bfloat16)
  lay = make_layout(bits, m, n, k, cfg, x.dtype, tiled=tiled, rms_eps=rms_eps,
                    epilogue=EPI_ROPE, rope=spec)
  scratch = plgpu.SMEM((lay.smem_bytes // 4,), jnp.int32)
  extra = [] if norm_x is None else [norm_x.astype(jnp.bfloat16)]
  kc_ref, vc_ref = jax.new_ref(k_cache), jax.new_ref(v_cache)

  def emit_refs(*refs):  # x, planes, lut, [norm_x], cos, sin, slots, kc, vc, q, smem
    it = iter(refs[3:])
    nr = next(it) if norm_x is not None else None
    rope_refs = tuple(next(it) for _ in range(5))
    _emit(refs[0], refs[1], refs[2], next(it), next(it), lay=lay, nx_ref=nr,
          rope_refs=rope_refs)

  inner = ptx.thread_body(emit_refs)

  def ref_body(*refs):
    pl.run_scoped(lambda smem: inner(*refs, smem), scratch, collective_axes="wg")
    if lay.pdl and hasattr(plgpu, "griddepcontrol_wait"):
      plgpu.griddepcontrol_wait()  # binds the PDL effect (see `ptx.thread_body`)

  mesh = plgpu.Mesh(grid=(lay.ctas,), grid_names=("cta",), num_threads=lay.warpgroups,
                    thread_name="wg")
  q = pl.kernel(ref_body, out_type=jax.ShapeDtypeStruct((m, spec.q_rows), jnp.bfloat16),
                mesh=mesh, compiler_params=plgpu.CompilerParams())(
                    x, planes_tc, lut, *extra, cos.astype(jnp.float32),
                    sin.astype(jnp.float32), slots.astype(jnp.int32), kc_ref, vc_ref)
  return q, kc_ref[...], vc_ref[...]


@functools.partial(jax.jit, static_argnames=("bits", "cfg", "tiled", "rms_eps", "glu"))
def gemv_tc(x: jax.Array, planes_tc: jax.Array, lut: jax.Array, *, bits: int,
            cfg: TcGemvConfig = TcGemvConfig(), tiled: bool = False,
            norm_x: jax.Array | None = None, rms_eps: float | None = None,
            residual: jax.Array | None = None, epi_weight: jax.Array | None = None,
            glu: bool = False):
  """y = x @ W_b^T on the tensor cores, b in 3..8.

  Args:
    x: [M, K] activations, M <= 8 (bf16 or f16; others are cast to bf16).
    planes_tc: uint32 [P, N, tc_layout.num_words(K)] in tensor-core order, P >= bits;
      rows interleaved per 16-row tile (`plane_layout.tile`) if `tiled`.
    lut: [N, 2^bits] f16 (other dtypes are converted first).
    bits: 3..8 (static); from 5 on the LUTs live in shared memory.
    cfg: launch shape (static).
    tiled: the planes are in PlaneLayout.TC_TILED (static; N % 16 == 0).
    norm_x, rms_eps: an RMSNorm folded in (`gemv_tc_rms_reference`): x = norm_x * w
      (the norm's weight) and row m of y is scaled by 1 / sqrt(mean(norm_x[m]^2) +
      rms_eps), which each CTA computes from norm_x [M, K] (K % 8 == 0). rms_eps is
      static.
    residual: [M, N] (bf16): the epilogue adds it (`residual_reference`): the output
      is h = bf16(residual + bf16(y)) instead of y (ksplit 1).
    epi_weight: [N] (f32 or bf16, read as stored; with residual): also return
      bf16(h * epi_weight), the x * w of the RMSNorm of h that the next GEMV folds.

    glu: (static) W is a gated MLP's gate rows over its up rows (N = 2F, F % 16 ==
      0): return bf16(silu(gate) * up) [M, F] (`glu_reference`) instead of y; each
      CTA takes gate tile c and up tile c (2 row tiles, no ring or bulk copies).

  Returns:
    [M, N] float32; with residual, h [M, N] bf16, or (h, h * epi_weight); with glu,
    [M, N / 2] bf16.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  m, k, n = _check_operands(x, planes_tc, lut, bits)
  if k % 2:
    raise ValueError(f"K must be even for the tensor-core GEMV, got {k}")
  if (norm_x is None) != (rms_eps is None):
    raise ValueError("norm_x and rms_eps come together")
  if norm_x is not None and norm_x.shape != x.shape:
    raise ValueError(f"norm_x {norm_x.shape} must have x's shape {x.shape}")
  if residual is not None and residual.shape != (m, n):
    raise ValueError(f"residual {residual.shape} must be the output's shape {(m, n)}")
  if epi_weight is not None and (residual is None or epi_weight.shape != (n,)):
    raise ValueError(f"epi_weight {epi_weight.shape} needs a residual and shape {(n,)}")
  if lut.dtype != jnp.float16:
    lut = lut.astype(jnp.float16)
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.bfloat16)
  if glu and residual is not None:
    raise ValueError("the gated and residual epilogues exclude each other")
  epilogue = (EPI_GLU if glu else EPI_NONE if residual is None
              else EPI_RESIDUAL if epi_weight is None else EPI_RESIDUAL_NORM)
  if epi_weight is not None and epi_weight.dtype != jnp.bfloat16:
    epi_weight = epi_weight.astype(jnp.float32)  # read as stored: no convert kernel
  lay = make_layout(bits, m, n, k, cfg, x.dtype, tiled=tiled, rms_eps=rms_eps,
                    epilogue=epilogue,
                    epi_w_bf16=epi_weight is not None and epi_weight.dtype == jnp.bfloat16)

  scratch = plgpu.SMEM((lay.smem_bytes // 4,), jnp.int32)
  grid = lay.ctas * lay.ksplit
  if lay.ksplit == 1:
    extra = [a for a in (None if norm_x is None else norm_x.astype(jnp.bfloat16),
                         None if residual is None else residual.astype(jnp.bfloat16),
                         epi_weight)
             if a is not None]
    outs = 2 if epi_weight is not None else 1

    def emit_refs(*refs):  # x, planes, lut, [norm_x], [residual], [weight], outs, smem
      it = iter(refs[3:])
      nr = next(it) if norm_x is not None else None
      rr = next(it) if residual is not None else None
      wr = next(it) if epi_weight is not None else None
      orf = next(it)
      o2 = next(it) if outs == 2 else None
      _emit(refs[0], refs[1], refs[2], orf, next(it), lay=lay, nx_ref=nr, res_ref=rr,
            ew_ref=wr, out2_ref=o2)

    out_type = jax.ShapeDtypeStruct(
        (m, n // 2) if glu else (m, n),
        jnp.float32 if residual is None and not glu else jnp.bfloat16)
    kernel = plgpu.kernel(
        ptx.thread_body(emit_refs, pdl=lay.pdl), out_type=out_type if outs == 1 else (out_type,) * 2,
        scratch_types=[scratch], grid=(grid,), grid_names=("cta",),
        num_threads=lay.warpgroups, thread_name="wg")
    return kernel(x, planes_tc, lut, *extra)
  if norm_x is not None:
    raise ValueError("a folded RMSNorm needs ksplit 1")
  body = ptx.thread_body(functools.partial(_emit, lay=lay))
  # Split K over CTAs: they add into a zeroed output, passed in as a mutable ref (the
  # kernel aliases it in and out).
  from jax.experimental import pallas as pl
  y_ref = jax.new_ref(jnp.zeros((m, n), jnp.float32))

  def ref_body(x_ref, planes_ref, lut_ref, out_ref):
    pl.run_scoped(functools.partial(body, x_ref, planes_ref, lut_ref, out_ref), scratch,
                  collective_axes="wg")

  mesh = plgpu.Mesh(grid=(grid,), grid_names=("cta",), num_threads=lay.warpgroups,
                    thread_name="wg")
  pl.kernel(ref_body, out_type=(), mesh=mesh,
            compiler_params=plgpu.CompilerParams())(x, planes_tc, lut, y_ref)
  return y_ref[...]


@functools.partial(jax.jit, static_argnames=("bits", "in_features", "dtype", "cfg",
                                             "tiled"))
def dequantize_tc(planes_tc: jax.Array, lut: jax.Array, *, bits: int, in_features: int,
                  dtype=jnp.bfloat16, cfg: TcGemvConfig = TcGemvConfig(warpgroups=1),
                  tiled: bool = False) -> jax.Array:
  """W_b [N, K] in `dtype` (bf16 or f16) from tensor-core-order planes, for prefill.

  The GEMV's decode (same tables, same A fragments) with stores instead of MMAs:
  lane (g, q) writes, per k16 step, the pairs of columns 2q and 2q + 8 of rows g and
  g + 8. Twin: `weight.dequantize` (LUT values rounded to `dtype`).

  Args:
    planes_tc: uint32 [P, N, num_words(K)], P >= bits; TC_TILED order if `tiled`.
    lut: [N, 2^bits] (converted to f16 first, as in the GEMV).
    bits: 3..8; in_features: K; dtype: bf16 or f16; cfg: launch shape (x_smem and
      prefetch of activations do not apply).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from anyprec_jax.pallas.mosaic import ptx

  p, n, words = planes_tc.shape
  k = in_features
  if p < bits or words != tc_layout.num_words(k):
    raise ValueError(f"planes {planes_tc.shape} are not {bits} tensor-core-order planes "
                     f"of K={k} (expected {tc_layout.num_words(k)} words per row)")
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape}, expected {(n, 1 << bits)}")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"dequantize_tc writes bf16 or f16, got {dtype}")
  if lut.dtype != jnp.float16:
    lut = lut.astype(jnp.float16)
  cfg = dataclasses.replace(cfg, x_smem=False, ksplit=1, probe="")
  lay = make_layout(bits, 1, n, k, cfg, dtype, tiled=tiled)
  kp = 128 * lay.blocks

  body = ptx.thread_body(  # x_ref is unused when dequantising: the planes stand in
      lambda pr, lr, orf, sr: _emit(pr, pr, lr, orf, sr, lay=lay, dequant=True))
  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((n, kp), dtype),
      scratch_types=[plgpu.SMEM((lay.smem_bytes // 4,), jnp.int32)],
      grid=(lay.ctas,), grid_names=("cta",), num_threads=lay.warpgroups,
      thread_name="wg")
  w = kernel(planes_tc, lut)
  return w if kp == k else w[:, :k]
