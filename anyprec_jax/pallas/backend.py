"""The one place that chooses the Pallas GPU backend (Triton or Mosaic GPU).

`gemv_backend()` picks the M = 1 GEMV's lowering: Mosaic GPU (`mosaic/`) on compute
capability >= 9.0, Pallas-Triton before (A100 users), overridable with
`ANYPREC_GPU_BACKEND`. The rest of this module is the Triton plumbing.

Every kernel in this package builds its `pallas_call` through `pallas_call` below, so
swapping the lowering (Pallas-Triton is deprecated from JAX 0.11; Mosaic GPU is its
successor but has no array indexing on H100, which the LUT gathers need) touches only
this file. The Triton compiler-parameter class is looked up by name because it moved
between releases (`CompilerParams` in jax 0.10/0.11's `pallas.triton`, formerly
`TritonCompilerParams` in `pallas.gpu`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class GpuBackend(enum.Enum):
  TRITON = "triton"
  MOSAIC = "mosaic"


# The backend the Triton-era kernels (gemv.py, dequant.py) are lowered with.
ACTIVE = GpuBackend.TRITON

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


@dataclasses.dataclass(frozen=True)
class LaunchParams:
  """Backend-neutral launch parameters of one kernel."""
  num_warps: int = 4
  num_stages: int = 1


@functools.cache
def _triton_module():
  try:
    from jax.experimental.pallas import triton as pltriton  # jax >= 0.4.36
    return pltriton
  except ImportError:  # Older layout.
    from jax.experimental.pallas import gpu as pltriton  # pytype: disable=import-error
    return pltriton


def _triton_params_class():
  mod = _triton_module()
  for name in ("CompilerParams", "TritonCompilerParams"):
    cls = getattr(mod, name, None)
    if cls is not None:
      return cls
  raise ImportError("no Triton compiler-parameter class in jax.experimental.pallas")


def compiler_params(launch: LaunchParams) -> Any:
  """The backend's compiler-parameter object for `launch`."""
  if ACTIVE is GpuBackend.TRITON:
    return _triton_params_class()(num_warps=launch.num_warps,
                                  num_stages=launch.num_stages)
  raise NotImplementedError(
      "the kernels use LUT gathers (ref[int_array]), which Mosaic GPU does not lower")


def load_words_rows(ref, plane, rows, w0, width: int, limit: int | None,
                    interpret: bool):
  """ref[plane, rows, w0:w0+width] transposed to [width, len(rows)]; 0 past `limit`.

  Args:
    ref: [P, N, W] ref.
    plane: static plane index.
    rows: int32 [R] row indices (in bounds).
    w0: first word (scalar).
    width: words to read (static power of two).
    limit: words at or past `limit` read as 0 (None: all in bounds).
    interpret: interpreter path (clamps instead of a masked load).
  """
  words = w0 + jnp.arange(width, dtype=jnp.int32)  # [width]
  if limit is None:
    return ref[plane, rows[None, :], words[:, None]]
  mask = (words < limit)[:, None]  # [width, 1]
  if interpret:
    safe = jnp.minimum(words, limit - 1)
    vals = ref[plane, rows[None, :], safe[:, None]]
    return jnp.where(mask, vals, jnp.zeros_like(vals))
  return _triton_module().load(ref.at[plane, rows[None, :], words[:, None]],
                               mask=mask, other=0)


def inline_asm_u32(asm: str, args: list) -> jax.Array:
  """One PTX instruction applied elementwise to uint32 tiles of one shape."""
  if ACTIVE is not GpuBackend.TRITON:
    raise NotImplementedError("inline PTX is wired for the Triton backend only")
  constraints = ",".join(["=r"] + ["r"] * len(args))
  # Triton integers are signless: declare int32 (an unsigned MLIR type fails to
  # verify) and reinterpret.
  [out] = _triton_module().elementwise_inline_asm(
      asm, args=args, constraints=constraints, pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.int32)])
  return jax.lax.bitcast_convert_type(out, jnp.uint32)


def inline_asm_f32(asm: str, arg: jax.Array) -> jax.Array:
  """Inline PTX taking one 32-bit tile ($1) to one float32 tile ($0)."""
  if ACTIVE is not GpuBackend.TRITON:
    raise NotImplementedError("inline PTX is wired for the Triton backend only")
  # (Pallas-Triton mis-lowers multi-result inline asm, so one result per call.)
  [out] = _triton_module().elementwise_inline_asm(
      asm, args=[jax.lax.bitcast_convert_type(arg, jnp.int32)], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(arg.shape, jnp.float32)])
  return out


def pallas_call(kernel: Callable, *, out_shape, grid, launch: LaunchParams,
                interpret: bool, name: str, poison: bool = False):
  """`pl.pallas_call` with whole-array refs and the active backend's parameters.

  Kernels index their refs themselves (array row indices, word slices), so no
  BlockSpecs are used: this keeps the kernels valid for any N and K (the Triton
  lowering requires power-of-two *tiles*, not arrays).

  With `poison`, the output buffer starts as NaN (an extra input aliased to the
  output, ignored by the kernel): every element the kernel fails to write stays NaN.
  """
  params = None if interpret else compiler_params(launch)
  if not poison:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                          compiler_params=params, name=name)

  def with_init(*refs):
    *ins, _, out = refs
    kernel(*ins, out)

  def call(*args):
    init = jnp.full(out_shape.shape, jnp.nan, out_shape.dtype)
    return pl.pallas_call(
        with_init, out_shape=out_shape, grid=grid, interpret=interpret,
        compiler_params=params, name=name,
        input_output_aliases={len(args): 0})(*args, init)
  return call


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU."""
  return jax.default_backend() == "gpu"
