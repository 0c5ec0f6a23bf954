"""Thread-level building blocks for Mosaic GPU kernels: MLIR arith plus inline PTX.

The any-precision GEMV needs per-lane control (a LUT gather from shared memory at a
computed address, byte permutes, warp shuffles) that Pallas Mosaic GPU's warpgroup
arrays do not express. Kernels therefore run their inner loops inside
`plgpu.inline_mgpu`, where code is emitted per thread; this module is the small
vocabulary they use. Memory accesses are inline PTX with side effects, so LLVM keeps
them in program order around barriers; ptxas still schedules them.

All integers are signless i32 unless named otherwise; addresses into shared memory
are 32-bit byte offsets, global addresses 64-bit.
"""

from __future__ import annotations

from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, scf


def i32():
  return ir.IntegerType.get_signless(32)


def i64():
  return ir.IntegerType.get_signless(64)


def f32():
  return ir.F32Type.get()


def const(v: int, ty=None):
  """An integer constant (i32 unless `ty`); values >= 2**31 wrap to signed."""
  ty = ty or i32()
  width = ir.IntegerType(ty).width
  v &= (1 << width) - 1
  if v >= 1 << (width - 1):
    v -= 1 << width
  return arith.constant(ty, v)


def fconst(v: float):
  return arith.constant(f32(), v)


def _void():
  return ir.Type.parse("!llvm.void")


def asm(ret, args, text: str, constraints: str, side_effects: bool = False):
  """One inline-PTX statement; `ret` None for no result."""
  return llvm.inline_asm(ret if ret is not None else _void(), list(args), text,
                         constraints, has_side_effects=side_effects)


def thread_body(emit, pdl: bool = False):
  """A Pallas Mosaic GPU kernel body that runs `emit(*refs)` per thread: the refs
  (inputs, outputs, scratch, in the kernel's order) enter one `plgpu.inline_mgpu`
  as raw memrefs, and `emit` writes the thread's code with this module.

  pdl: the kernel is launched as a programmatic dependent of the kernel before it in
  the stream (Hopper's PDL: it may start while that kernel's CTAs still run). `emit`
  must then call `griddep_wait()` in every thread before its first read of anything
  an earlier kernel writes and before its first global store. Pallas launches with
  the attribute when the kernel's jaxpr carries its PDL effect, which only
  `plgpu.griddepcontrol_wait` binds: it is bound once more after the body (a no-op
  there: the wait inside has returned). `pdl_launches()` says whether this jax does."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(*refs):
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))
    def run(ctx, *raw):
      del ctx
      emit(*raw)
    run(*refs)
    if pdl and hasattr(plgpu, "griddepcontrol_wait"):
      plgpu.griddepcontrol_wait()
  return body


def pdl_launches() -> bool:
  """Whether this jax's Pallas Mosaic GPU launches a kernel that waits on its grid
  dependencies with programmatic stream serialization (jax >= 0.11; 0.10 has the
  wait instruction but launches normally, so `pdl` kernels are then ordinary ones)."""
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  return hasattr(gpu_core, "_pdl_effect")


def griddep_wait():
  """PDL: wait until the grids this one depends on have completed and their writes
  are visible (returns at once in a kernel not launched as a dependent)."""
  asm(None, [], "griddepcontrol.wait;", "", True)


def griddep_launch_dependents():
  """PDL: the kernel after this one in the stream may start once every CTA of this
  grid has run this (or exited); its CTAs take the SM room this grid leaves."""
  asm(None, [], "griddepcontrol.launch_dependents;", "", True)


# --- integer helpers (i32) -------------------------------------------------------

def add(a, b):
  return arith.addi(a, b)


def mul(a, b):
  return arith.muli(a, b)


def shr(a, n: int):
  return arith.shrui(a, const(n)) if n else a


def shl(a, n: int):
  return arith.shli(a, const(n)) if n else a


def band(a, m):
  return arith.andi(a, m if isinstance(m, ir.Value) else const(m))


def bor(a, b):
  return arith.ori(a, b)


def bxor(a, b):
  return arith.xori(a, b)


def umin(a, b):
  return arith.minui(a, b if isinstance(b, ir.Value) else const(b))


def lt(a, b):
  return arith.cmpi(arith.CmpIPredicate.ult, a, b if isinstance(b, ir.Value) else const(b))


def eq(a, b):
  return arith.cmpi(arith.CmpIPredicate.eq, a, b if isinstance(b, ir.Value) else const(b))


def select(c, a, b):
  return arith.select(c, a, b)


def to_i64(a):
  return arith.extui(i64(), a)


def to_index(a):
  return arith.index_cast(ir.IndexType.get(), a)


def from_index(a):
  return arith.index_cast(i32(), a)


def fma(a, b, c):
  """a * b + c in one fp32 FMA."""
  return asm(f32(), [a, b, c], "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f")


def fadd(a, b):
  return arith.addf(a, b)


def exp2_approx(v):
  """2^v (f32, `ex2.approx.ftz`: ~2 ulp, subnormals flushed; 2^-inf = 0)."""
  return asm(f32(), [v], "ex2.approx.ftz.f32 $0, $1;", "=f,f")


def f32_bits(v):
  return arith.bitcast(i32(), v)


def bits_f32(v):
  return arith.bitcast(f32(), v)


# --- thread geometry --------------------------------------------------------------

def thread_id():
  return asm(i32(), [], "mov.u32 $0, %tid.x;", "=r")


def block_id():
  return asm(i32(), [], "mov.u32 $0, %ctaid.x;", "=r")


# --- addresses ----------------------------------------------------------------------

def gmem_address(ref):
  """64-bit generic address of a global memref's first element."""
  return llvm.ptrtoint(i64(), mgpu_utils.memref_ptr(ref))


def smem_address(ref):
  """32-bit shared-window address of a shared memref's first element."""
  return llvm.ptrtoint(i32(), mgpu_utils.memref_ptr(ref))


def gaddr(base64, offset32, scale: int = 1, extra: int = 0):
  """base64 + offset32 * scale + extra (64-bit)."""
  off = to_i64(offset32)
  if scale != 1:
    off = arith.muli(off, const(scale, i64()))
  if extra:
    off = arith.addi(off, const(extra, i64()))
  return arith.addi(base64, off)


# --- memory ---------------------------------------------------------------------------

def ld_global_u32(addr64, imm: int = 0):
  return asm(i32(), [addr64], f"ld.global.nc.b32 $0, [$1+{imm}];", "=r,l", True)


def ld_global_u16(addr64):
  """Zero-extended 16-bit load."""
  return asm(i32(), [addr64],
             "{ .reg .b16 h; ld.global.nc.b16 h, [$1]; cvt.u32.u16 $0, h; }",
             "=r,l", True)


def ld_global_f32(addr64):
  return asm(f32(), [addr64], "ld.global.nc.f32 $0, [$1];", "=f,l", True)


def st_global_f32(addr64, v):
  asm(None, [addr64, v], "st.global.f32 [$0], $1;", "l,f", True)


def red_add_global_f32(addr64, v):
  """Atomic (relaxed, GPU scope) global += v, no result."""
  asm(None, [addr64, v], "red.relaxed.gpu.global.add.f32 [$0], $1;", "l,f", True)


def st_global_b32(addr64, v, imm: int = 0):
  asm(None, [addr64, v], f"st.global.b32 [$0+{imm}], $1;", "l,r", True)


def st_global_b16(addr64, v32):
  """Stores the low 16 bits of an i32."""
  asm(None, [addr64, v32], "{ .reg .b16 l, h; mov.b32 {l, h}, $1; st.global.b16 [$0], l; }",
      "l,r", True)


def ld_shared_f16_as_f32(addr32, imm: int = 0):
  return asm(f32(), [addr32],
             f"{{ .reg .b16 h; ld.shared.b16 h, [$1+{imm}]; cvt.f32.f16 $0, h; }}",
             "=f,r", True)


def ld_shared_f32(addr32, imm: int = 0):
  return asm(f32(), [addr32], f"ld.shared.f32 $0, [$1+{imm}];", "=f,r", True)


def ld_shared_v4_f32(addr32, imm: int = 0):
  st = llvm.StructType.get_literal([f32()] * 4)
  r = asm(st, [addr32], f"ld.shared.v4.f32 {{$0, $1, $2, $3}}, [$4+{imm}];",
          "=f,=f,=f,=f,r", True)
  return [llvm.extractvalue(f32(), r, [i]) for i in range(4)]


def st_shared_b32(addr32, v, imm: int = 0):
  asm(None, [addr32, v], f"st.shared.b32 [$0+{imm}], $1;", "r,r", True)


def st_shared_f32(addr32, v, imm: int = 0):
  asm(None, [addr32, v], f"st.shared.f32 [$0+{imm}], $1;", "r,f", True)


def st_shared_v2_f32(addr32, a, b, imm: int = 0):
  asm(None, [addr32, a, b], f"st.shared.v2.f32 [$0+{imm}], {{$1, $2}};", "r,f,f", True)


# --- conversions ------------------------------------------------------------------------

def f16_bits_to_f32(h32):
  """Low 16 bits of an i32 as fp16 -> f32."""
  return asm(f32(), [h32], "{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, l; }",
             "=f,r")


def f16_high_to_f32(h32):
  return asm(f32(), [h32], "{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, h; }",
             "=f,r")


def bf16_bits_to_f32(h32):
  """Low 16 bits of an i32 as bf16 -> f32 (a shift)."""
  return bits_f32(shl(h32, 16))


def f32_to_bf16_bits(v):
  """f32 -> bf16 (round to nearest even) in the low 16 bits of an i32."""
  return asm(i32(), [v], "{ .reg .b16 h; cvt.rn.bf16.f32 h, $1; cvt.u32.u16 $0, h; }",
             "=r,f")


# --- synchronisation and shuffles -------------------------------------------------------

def bar_sync(barrier_id, threads: int):
  """Named barrier over `threads` threads (barrier 0 is __syncthreads)."""
  asm(None, [barrier_id], f"bar.sync $0, {threads};", "r", True)


def cta_sync():
  asm(None, [], "bar.sync 0;", "", True)


def shfl_bfly_f32(v, lane_mask: int):
  r = asm(i32(), [f32_bits(v)],
          f"shfl.sync.bfly.b32 $0, $1, {lane_mask}, 0x1f, 0xffffffff;", "=r,r", True)
  return bits_f32(r)


def warp_sum(v):
  for m in (16, 8, 4, 2, 1):
    v = fadd(v, shfl_bfly_f32(v, m))
  return v


# --- control flow ---------------------------------------------------------------------

class If:
  """`with If(cond):` emits an scf.if without results."""

  def __init__(self, cond):
    self._op = scf.IfOp(cond)
    self._ip = None

  def __enter__(self):
    self._ip = ir.InsertionPoint(self._op.then_block)
    self._ip.__enter__()

  def __exit__(self, *exc):
    if exc[0] is None:
      scf.yield_([])
    self._ip.__exit__(*exc)
    return False


# --- tensor-core GEMV helpers -------------------------------------------------------

def udiv(a, d: int):
  return arith.divui(a, const(d))


def prmt(a, b, sel):
  """PTX byte permute: byte i = byte (nibble i of sel, low 16 bits) of {b:a}."""
  sel = sel if isinstance(sel, ir.Value) else const(sel)
  return asm(i32(), [a, b, sel], "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r")


def ld_global_v4_u32(addr64):
  st = llvm.StructType.get_literal([i32()] * 4)
  r = asm(st, [addr64], "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
          "=r,=r,=r,=r,l", True)
  return [llvm.extractvalue(i32(), r, [i]) for i in range(4)]


def ld_global_v2_u32(addr64, imm: int = 0):
  st = llvm.StructType.get_literal([i32()] * 2)
  r = asm(st, [addr64], f"ld.global.nc.v2.b32 {{$0, $1}}, [$2+{imm}];", "=r,=r,l", True)
  return [llvm.extractvalue(i32(), r, [i]) for i in range(2)]


def ld_shared_v2_b32(addr32, imm: int = 0):
  st = llvm.StructType.get_literal([i32()] * 2)
  r = asm(st, [addr32], f"ld.shared.v2.b32 {{$0, $1}}, [$2+{imm}];", "=r,=r,r", True)
  return [llvm.extractvalue(i32(), r, [i]) for i in range(2)]


def ld_shared_v4_b32(addr32, imm: int = 0):
  st = llvm.StructType.get_literal([i32()] * 4)
  r = asm(st, [addr32], f"ld.shared.v4.b32 {{$0, $1, $2, $3}}, [$4+{imm}];",
          "=r,=r,=r,=r,r", True)
  return [llvm.extractvalue(i32(), r, [i]) for i in range(4)]


def st_shared_v4_f32(addr32, vals, imm: int = 0):
  asm(None, [addr32, *vals], f"st.shared.v4.f32 [$0+{imm}], {{$1, $2, $3, $4}};",
      "r,f,f,f,f", True)


def f16x2_to_bf16x2(h2):
  """Two fp16 in an i32 -> the same two values rounded to bf16, same halves."""
  return asm(i32(), [h2],
             "{ .reg .b16 l, h; .reg .f32 fl, fh; mov.b32 {l, h}, $1; "
             "cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; cvt.rn.bf16x2.f32 $0, fh, fl; }",
             "=r,r")


def mma_m16n8k16(a_regs, b_regs, c_vals, dtype: str):
  """D = A @ B + C on the tensor cores; dtype 'bf16' or 'f16' operands, f32 C/D."""
  st = llvm.StructType.get_literal([f32()] * 4)
  r = asm(st, [*a_regs, *b_regs, *c_vals],
          f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 "
          "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
          "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
  return [llvm.extractvalue(f32(), r, [i]) for i in range(4)]


def land(a, b):
  """Logical and of two i1 values."""
  return arith.andi(a, b)


def transpose8(words):
  """MLIR twin of `bitops.transpose8`: byte t of out[s] = code of column 8t + s.

  `words` are b <= 8 plane words, plane 0 the code's MSB; returns 8 words.
  """
  from anyprec_jax.pallas import bitops
  rows = bitops.transpose8_with(words, shr, shl, band, bxor)
  return [const(0) if r is None else r for r in rows]


def ld_shared_b32(addr32, imm: int = 0):
  return asm(i32(), [addr32], f"ld.shared.b32 $0, [$1+{imm}];", "=r,r", True)


def st_shared_v4_b32(addr32, vals, imm: int = 0):
  asm(None, [addr32, *vals], f"st.shared.v4.b32 [$0+{imm}], {{$1, $2, $3, $4}};",
      "r,r,r,r,r", True)


# --- asynchronous copies (cp.async, sm_80+) ----------------------------------------------

def cp_async_16(dst32, src64, src_bytes):
  """16-byte global -> shared copy; `src_bytes` (16 or 0, i32) bytes are read, the rest
  zero-filled (0: nothing is read)."""
  asm(None, [dst32, src64, src_bytes], "cp.async.cg.shared.global [$0], [$1], 16, $2;",
      "r,l,r", True)


def cp_async_commit():
  asm(None, [], "cp.async.commit_group;", "", True)


def cp_async_wait(pending: int):
  """Waits until at most `pending` of this thread's committed groups are in flight."""
  asm(None, [], f"cp.async.wait_group {pending};", "", True)


def warp_sync():
  """Barrier and memory ordering among the 32 lanes of a warp."""
  asm(None, [], "bar.warp.sync -1;", "", True)


def urem(a, d: int):
  return arith.remui(a, const(d))


# --- bulk copies completing on an mbarrier (sm_90) -------------------------------------

def mbarrier_init(bar32, count: int):
  """Initialises the 8-byte shared mbarrier at `bar32` for `count` arrivals."""
  asm(None, [bar32], f"mbarrier.init.shared::cta.b64 [$0], {count};", "r", True)


def fence_mbarrier_init():
  """Makes mbarrier initialisations visible to the async proxy (bulk copies)."""
  asm(None, [], "fence.mbarrier_init.release.cluster;", "", True)


def mbarrier_arrive_expect_tx(bar32, tx_bytes):
  """One arrival that also expects `tx_bytes` (i32) of asynchronous transactions."""
  asm(None, [bar32, tx_bytes], "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;",
      "r,r", True)


def cp_async_bulk_g2s(dst32, src64, size, bar32):
  """Bulk global -> shared copy of `size` (i32, a multiple of 16) bytes, both ends
  16-byte aligned, completing `size` transaction bytes on the mbarrier `bar32`."""
  asm(None, [dst32, src64, size, bar32],
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
      "[$0], [$1], $2, [$3];", "r,l,r,r", True)


def mbarrier_wait_parity(bar32, parity: int):
  """Spins until the phase of parity `parity` of the mbarrier has completed."""
  asm(None, [bar32],
      "{ .reg .pred P1; LAB_WAIT: "
      f"mbarrier.try_wait.parity.shared::cta.b64 P1, [$0], {parity}; "
      "@P1 bra DONE; bra LAB_WAIT; DONE: }", "r", True)


# --- thread-block clusters (sm_90) ---------------------------------------------------

def cluster_rank():
  """This CTA's rank in its cluster."""
  return asm(i32(), [], "mov.u32 $0, %cluster_ctarank;", "=r")


def cluster_sync():
  """All threads of all CTAs of the cluster; shared-memory writes before it are visible
  to `ld.shared::cluster` after it (release / acquire)."""
  asm(None, [], "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;", "", True)


def mapa_shared_cluster(addr32, rank):
  """The shared::cluster address of `addr32` (this CTA's shared window) in CTA `rank`."""
  return asm(i32(), [addr32, rank], "mapa.shared::cluster.u32 $0, $1, $2;", "=r,r,r")


def ld_shared_cluster_f32(addr32, imm: int = 0):
  return asm(f32(), [addr32], f"ld.shared::cluster.f32 $0, [$1+{imm}];", "=f,r", True)


def ld_shared_v2_f32(addr32, imm: int = 0, cluster: bool = False):
  """Two f32 at a shared address (8-byte aligned); `cluster`: a shared::cluster one."""
  st = llvm.StructType.get_literal([f32()] * 2)
  space = "shared::cluster" if cluster else "shared"
  r = asm(st, [addr32], f"ld.{space}.v2.f32 {{$0, $1}}, [$2+{imm}];", "=f,=f,r", True)
  return [llvm.extractvalue(f32(), r, [i]) for i in range(2)]


def st_global_v2_f32(addr64, a, b):
  asm(None, [addr64, a, b], "st.global.v2.f32 [$0], {$1, $2};", "l,f,f", True)


def pack_bf16x2(lo, hi):
  """Two f32 -> one word of two bf16 (round to nearest even), `lo` in the low half."""
  return asm(i32(), [hi, lo], "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f")


def sqrt_f32(v):
  """Correctly rounded square root."""
  return asm(f32(), [v], "sqrt.rn.f32 $0, $1;", "=f,f")
