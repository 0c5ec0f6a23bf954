"""The one place that chooses the Pallas GPU backend (Triton or Mosaic GPU).

`gemv_backend()` picks the M = 1 GEMV's lowering: Mosaic GPU (`mosaic/`) on compute
capability >= 9.0, Pallas-Triton (`triton/`) before (A100 users), overridable with
`ANYPREC_GPU_BACKEND`; `mosaic_available`, `tc_gemv_at_m1` and `tiled_prefill` decide
the other routes. `kernels.py` acts on these answers; each backend's kernels and their
lowering plumbing live in its own folder (`triton/`, `mosaic/`).
"""

from __future__ import annotations

import contextlib
import enum
import os

import jax


class GpuBackend(enum.Enum):
  TRITON = "triton"
  MOSAIC = "mosaic"


# Environment override of the GEMV backend choice ("triton" or "mosaic").
BACKEND_ENV = "ANYPREC_GPU_BACKEND"


def compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first GPU, None without one."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  cc = getattr(dev, "compute_capability", None)
  if dev.platform != "gpu" or not cc:
    return None
  major, _, minor = str(cc).partition(".")
  return int(major), int(minor or 0)


# Widths whose M = 1 GEMV runs on Mosaic GPU by default on Hopper: the H200 gate
# runs (benchmarks/notes_kernels.md) measured it 2.6-3.2x faster end to end than
# the Triton GEMV at 5..8 bits, and not faster at 3 and 4.
MOSAIC_DEFAULT_BITS = frozenset({5, 6, 7, 8})

def tc_gemv_at_m1(bits: int, n: int, k: int) -> bool:
  """Whether an M = 1 product on tensor-core-order planes takes the tensor-core GEMV
  (`mosaic/gemv_tc.py`) rather than the LUT GEMV (`mosaic/gemv.py`); M = 2..8 take the
  tensor-core GEMV at every width 3..8.

  H200 runs of 2026-12-03 (benchmarks/results/kernels_tc.md, step 3): at 5..8 bits the
  tensor-core GEMV wins where K > N (7B down: 24-37 us against 35-44 us) and loses
  where K <= N (7B gate/up: 28-53 against 25-35 us; 4096^2 even to slightly behind).
  """
  return bits <= 4 or k > n


# Prefill (M > 8) on Hopper with TC_TILED planes: "untile" (default: an XLA transpose
# back to TC order, then the Triton dequantisation kernel; measured, 2026-12-03) or
# "mosaic" (`mosaic/gemv_tc.dequantize_tc` reads the tiled planes directly; lowers and
# is tested natively, not yet timed).
PREFILL_ENV = "ANYPREC_TILED_PREFILL"


def tiled_prefill() -> str:
  """How M > 8 products on TC_TILED planes dequantise: "mosaic" (default;
  `gemv_tc.dequantize_tc` reads the tiled planes, H200 512-token prefill 1.02-1.10x
  bf16, benchmarks/results/e2e.md) or "untile" (an XLA transpose, then the Triton
  dequantisation)."""
  v = os.environ.get(PREFILL_ENV, "mosaic").strip().lower()
  if v not in ("untile", "mosaic"):
    raise ValueError(f"{PREFILL_ENV}={v!r}: expected 'untile' or 'mosaic'")
  return v


DECODE_ATTENTION_ENV = "ANYPREC_DECODE_ATTENTION"


# "auto" runs the kernel from this many cache slots on. With the in-kernel merge
# (kernels_tc.md steps 13-16, 7B batch 1, GPU time) the kernel is 2.0-2.3x XLA's
# attention at 128, 256 and 384 slots on the H100 (384: also on the H200), and a
# 384-slot 3-bit decode step is ~0.16 ms faster with it. Below 128: not measured.
AUTO_ATTENTION_SLOTS = 128
# "auto" leaves caches of AUTO_ATTENTION_GQA_SLOTS slots or more with
# AUTO_ATTENTION_MAX_G query heads per KV head or more to XLA: 8B GQA (G = 4) at 4096
# slots, XLA 16.9 us against the kernel's best 19.1 on the H200 (step 13), 19.7 against
# 23.2 on the H100 (step 14); at 384 slots the kernel is 2.0x XLA's (H100, step 16).
AUTO_ATTENTION_MAX_G = 4
AUTO_ATTENTION_GQA_SLOTS = 1024


def auto_runs_attention_kernel(slots: int, g: int) -> bool:
  """Whether "auto" runs the decode-attention kernel on a cache of `slots` slots with
  `g` query heads per KV head (the rule of the constants above)."""
  return slots >= AUTO_ATTENTION_SLOTS and not (
      slots >= AUTO_ATTENTION_GQA_SLOTS and g >= AUTO_ATTENTION_MAX_G)


def decode_attention() -> str:
  """Which attention a one-query decode step runs on Hopper: "auto" (default: the
  Mosaic kernel `mosaic/decode_attention.py` for caches of AUTO_ATTENTION_SLOTS slots
  or more, except long caches (AUTO_ATTENTION_GQA_SLOTS) with AUTO_ATTENTION_MAX_G
  query heads per KV head or more; XLA's otherwise), "mosaic" (always the kernel) or "xla" (the decoder's jnp
  attention). Read at trace time."""
  v = os.environ.get(DECODE_ATTENTION_ENV, "auto").strip().lower()
  if v not in ("auto", "xla", "mosaic"):
    raise ValueError(f"{DECODE_ATTENTION_ENV}={v!r}: expected 'auto', 'xla' or 'mosaic'")
  return v


def _on_off(env: str, default: bool) -> bool:
  """An on/off switch from the environment: 1/on, 0/off (a bad value names the
  variable)."""
  v = os.environ.get(env, "1" if default else "0").strip().lower()
  if v not in ("0", "1", "off", "on"):
    raise ValueError(f"{env}={v!r}: expected 1 or 0")
  return v in ("1", "on")


FOLD_NORM_ENV = "ANYPREC_FOLD_NORM"


def fold_norm() -> bool:
  """Whether a decoder layer's RMSNorms fold into the quantized linears after them on
  the tensor-core GEMV (`ops.RmsNormed`; each CTA computes 1 / rms itself, so XLA's
  two norm kernels per norm go). `ANYPREC_FOLD_NORM=1|0`; default on: a 384-slot 3-bit
  7B decode step 2.836 -> 2.475 ms on the H100 (notes_kernels.md step 14). Read at
  trace time."""
  return _on_off(FOLD_NORM_ENV, default=True)


FUSE_RESIDUAL_ENV = "ANYPREC_FUSE_RESIDUAL"


def fuse_residual() -> bool:
  """Whether a pre-norm decoder layer's two residual adds, and the product of each sum
  with the next RMSNorm's weight, run in the epilogue of the quantized linear before
  them (o_proj, down_proj) on the tensor-core GEMV instead of an XLA kernel each
  (`ops.linear_residual`). Needs the folded norms (`fold_norm`).
  `ANYPREC_FUSE_RESIDUAL=1|0`; default on: a 384-slot 7B step 2.418 -> 2.213 ms at 3
  bits, 4.627 -> 4.457 at 8 (H100, notes_kernels.md step 21).
  Read at trace time."""
  return _on_off(FUSE_RESIDUAL_ENV, default=True)


FUSE_GLU_ENV = "ANYPREC_FUSE_GLU"


def fuse_glu() -> bool:
  """Whether a fused gate/up GEMV forms silu(gate) * up in its epilogue (one XLA
  kernel per layer fewer; `ops.linear_glu`). `ANYPREC_FUSE_GLU=1|0`; default on: GPU
  time of a 384-slot 7B step -41 us at 3 bits, -54 at 8 (H100, notes_kernels.md
  step 21). Read at trace time."""
  return _on_off(FUSE_GLU_ENV, default=True)


FUSE_ROPE_KV_ENV = "ANYPREC_FUSE_ROPE_KV"


def fuse_rope_kv() -> bool:
  """Whether a decode step's fused q/k/v GEMV applies RoPE to q and k, scales q and
  writes k and v into the KV caches in its epilogue (`ops.linear_rope_kv`; the q
  rotary and the two cache-write XLA kernels per layer go). `ANYPREC_FUSE_ROPE_KV=1|0`;
  default on: e2e 7B batch 1 decode 3 bits -6.2 %, 5 bits -3.3 % ms per token (H200,
  notes_kernels.md step 29). Read at trace time."""
  return _on_off(FUSE_ROPE_KV_ENV, default=True)


PDL_ENV = "ANYPREC_PDL"


def pdl() -> bool:
  """Whether the tensor-core GEMVs of the model path are launched as programmatic
  dependents of the kernel before them (`TcGemvConfig.pdl`): each starts in its
  predecessor's tail with its LUT and first plane loads in flight, and waits for it
  before reading activations. `ANYPREC_PDL=1|0`, default 1 (H100, 2026-12-05: a 7B
  step at 8 bits -2.8 % of GPU time and -3.5 % wall, 3 bits unchanged; inside XLA's command buffers the
  launches do not overlap, the gain is the reordered prologue: notes_kernels.md steps
  23-26). Ignored where jax cannot launch with PDL (jax < 0.11). Read at trace time."""
  return _on_off(PDL_ENV, default=True)


SMEM_TABLE_BITS_ENV = "ANYPREC_SMEM_TABLE_BITS"


def smem_table_bits() -> int:
  """The lowest width whose tensor-core GEMV keeps its LUTs in shared memory (below:
  register `prmt` tables). `ANYPREC_SMEM_TABLE_BITS=3..9` (9: never), default 5
  (`mosaic.gemv_tc.SMEM_TABLE_BITS`); a benchmark switch. Read at trace time."""
  v = os.environ.get(SMEM_TABLE_BITS_ENV, "5").strip()
  if not v.isdigit() or not 3 <= int(v) <= 9:
    raise ValueError(f"{SMEM_TABLE_BITS_ENV}={v!r}: expected a width 3..9")
  return int(v)


DECODE_GRAPHS_ENV = "ANYPREC_DECODE_GRAPHS"
# XLA's command-buffer command types without CUSTOM_CALL: the Pallas kernels launch
# outside the CUDA graphs (as kernels with the PDL attribute) and XLA's fusions and
# cuBLAS calls stay in them.
GRAPHS_WITHOUT_CUSTOM_CALLS = "FUSION,CUBLAS,CUBLASLT"
# `auto`: custom calls out of the graphs from this width on (every quantized weight).
AUTO_NO_CUSTOM_CALL_BITS = 5


class DecodeGraphs(enum.Enum):
  ALL = "all"  # XLA's default command buffers (custom calls captured as child graphs)
  NO_CUSTOM_CALLS = "no_custom_calls"  # GRAPHS_WITHOUT_CUSTOM_CALLS
  AUTO = "auto"  # NO_CUSTOM_CALLS where every quantized weight has >= 5 bits


_decode_graphs_override: DecodeGraphs | None = None


def decode_graphs() -> DecodeGraphs:
  """How the jitted decode loops use XLA's command buffers (CUDA graphs).

  Inside a graph a Pallas call is a captured child graph, so programmatic dependent
  launch (`pdl`) cannot overlap it with the kernel before; outside, each GEMV starts in
  its predecessor's tail, at the price of one host launch per kernel (same-run A/B, H200,
  notes_kernels.md step 29: no_custom_calls 5-8 bits -2.5 to -4 % ms per token, 3 bits
  +6 %, 4 bits +1.4 %; hence `auto`).
  `ANYPREC_DECODE_GRAPHS=all|no_custom_calls|auto` (default `auto`), or
  `use_decode_graphs` (benchmarks' same-run A/B). Read when a decode is called."""
  if _decode_graphs_override is not None:
    return _decode_graphs_override
  v = os.environ.get(DECODE_GRAPHS_ENV, DecodeGraphs.AUTO.value).strip().lower()
  try:
    return DecodeGraphs(v)
  except ValueError:
    raise ValueError(f"{DECODE_GRAPHS_ENV}={v!r}: expected one of "
                     f"{[m.value for m in DecodeGraphs]}") from None


@contextlib.contextmanager
def use_decode_graphs(mode: DecodeGraphs | str):
  """Within the block, `decode_graphs()` is `mode` (whatever the environment says)."""
  global _decode_graphs_override
  saved, _decode_graphs_override = _decode_graphs_override, DecodeGraphs(mode)
  try:
    yield
  finally:
    _decode_graphs_override = saved


def decode_compiler_options(min_bits: int | None) -> dict[str, str]:
  """XLA compiler options of a jitted decode loop whose quantized weights have at
  least `min_bits` bits (None: no quantized weight), per `decode_graphs()`.

  Empty (XLA's defaults) off the GPU, for `all`, and for `auto` below
  `AUTO_NO_CUSTOM_CALL_BITS`, without quantized weights or without PDL launches."""
  mode = decode_graphs()
  if mode is DecodeGraphs.ALL or not on_gpu():
    return {}
  if mode is DecodeGraphs.AUTO:
    if min_bits is None or min_bits < AUTO_NO_CUSTOM_CALL_BITS or not pdl():
      return {}
    from anyprec_jax.pallas.mosaic import ptx  # noqa: PLC0415 (Mosaic GPU imports)
    if not ptx.pdl_launches():
      return {}
  return {"xla_gpu_enable_command_buffer": GRAPHS_WITHOUT_CUSTOM_CALLS}


def is_hopper_or_newer() -> bool:
  """Whether the first device is a GPU of compute capability >= 9.0."""
  cc = compute_capability()
  return cc is not None and cc >= (9, 0)


def mosaic_available() -> bool:
  """Whether the Mosaic GPU kernels run here: compute capability >= 9.0, or forced.

  `ANYPREC_GPU_BACKEND=triton` turns them off, `=mosaic` on.
  """
  forced = os.environ.get(BACKEND_ENV, "").strip().lower()
  if forced:
    return gemv_backend() is GpuBackend.MOSAIC
  return is_hopper_or_newer()


def gemv_backend(bits: int | None = None) -> GpuBackend:
  """Backend of the M = 1 GEMV at precision `bits`.

  Mosaic GPU on compute capability >= 9.0 for the widths in `MOSAIC_DEFAULT_BITS`
  (all widths when `bits` is None), Triton otherwise and on older GPUs.
  `ANYPREC_GPU_BACKEND=triton|mosaic` forces one for every width (read at trace time).
  """
  forced = os.environ.get(BACKEND_ENV, "").strip().lower()
  if forced:
    try:
      return GpuBackend(forced)
    except ValueError:
      raise ValueError(f"{BACKEND_ENV}={forced!r}: expected 'triton' or 'mosaic'") from None
  if not is_hopper_or_newer():
    return GpuBackend.TRITON
  if bits is not None and bits not in MOSAIC_DEFAULT_BITS:
    return GpuBackend.TRITON
  return GpuBackend.MOSAIC


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() == "gpu"
