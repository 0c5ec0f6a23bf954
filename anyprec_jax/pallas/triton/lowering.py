"""How the Pallas-Triton kernels are lowered: launch parameters, `pallas_call`, loads.

Every kernel in this folder builds its `pallas_call` through `pallas_call` below. The
Triton compiler-parameter class is looked up by name because it moved between
releases (`CompilerParams` in jax 0.10/0.11's `pallas.triton`, formerly
`TritonCompilerParams` in `pallas.gpu`). Pallas-Triton is deprecated from JAX 0.11;
its successor Mosaic GPU (`pallas/mosaic/`) has no array indexing on H100, which these
kernels' LUT gathers need, so the Mosaic kernels are written separately.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class LaunchParams:
  """Launch parameters of one kernel."""
  num_warps: int = 4
  num_stages: int = 1


@functools.cache
def triton_module():
  """`jax.experimental.pallas.triton` (or its older name `pallas.gpu`)."""
  try:
    from jax.experimental.pallas import triton as pltriton  # jax >= 0.4.36
    return pltriton
  except ImportError:  # Older layout.
    from jax.experimental.pallas import gpu as pltriton  # pytype: disable=import-error
    return pltriton


def _triton_params_class():
  mod = triton_module()
  for name in ("CompilerParams", "TritonCompilerParams"):
    cls = getattr(mod, name, None)
    if cls is not None:
      return cls
  raise ImportError("no Triton compiler-parameter class in jax.experimental.pallas")


def compiler_params(launch: LaunchParams) -> Any:
  """The Triton compiler-parameter object for `launch`."""
  return _triton_params_class()(num_warps=launch.num_warps, num_stages=launch.num_stages)


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
  return triton_module().load(ref.at[plane, rows[None, :], words[:, None]],
                              mask=mask, other=0)


def pallas_call(kernel: Callable, *, out_shape, grid, launch: LaunchParams,
                interpret: bool, name: str, poison: bool = False):
  """`pl.pallas_call` with whole-array refs and the Triton compiler parameters.

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
