"""Inline PTX in the Pallas-Triton kernels: `prmt` and the fp16 half-word converts.

Each helper takes `interpret`: on the Pallas interpreter (CPU) the instruction is
replaced by its pure-jnp model (`bitops.prmt`, plain bitcasts). The Mosaic GPU kernels
have their own vocabulary of MLIR-built instructions (`pallas/mosaic/ptx.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anyprec_jax.pallas import bitops
from anyprec_jax.pallas.triton import lowering


def inline_asm_u32(asm: str, args: list) -> jax.Array:
  """One PTX instruction applied elementwise to uint32 tiles of one shape."""
  constraints = ",".join(["=r"] + ["r"] * len(args))
  # Triton integers are signless: declare int32 (an unsigned MLIR type fails to
  # verify) and reinterpret.
  [out] = lowering.triton_module().elementwise_inline_asm(
      asm, args=args, constraints=constraints, pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.int32)])
  return jax.lax.bitcast_convert_type(out, jnp.uint32)


def inline_asm_f32(asm: str, arg: jax.Array) -> jax.Array:
  """Inline PTX taking one 32-bit tile ($1) to one float32 tile ($0)."""
  # (Pallas-Triton mis-lowers multi-result inline asm, so one result per call.)
  [out] = lowering.triton_module().elementwise_inline_asm(
      asm, args=[jax.lax.bitcast_convert_type(arg, jnp.int32)], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(arg.shape, jnp.float32)])
  return out


def prmt(a, b, c, interpret: bool):
  """Byte permute: byte i of the result = byte (c's nibble i & 7) of the pair {b:a}.

  A nibble with bit 3 set replicates the sign bit of the chosen byte instead.

  Args:
    a, b: uint32 tiles (bytes 0-3 and 4-7 of the table); broadcastable.
    c: uint32 selector tile (its low 16 bits are read) or a static int.
    interpret: emulate in jnp (`bitops.prmt`) instead of emitting the PTX instruction.

  Returns:
    uint32 tile of the broadcast shape.
  """
  if interpret:
    return bitops.prmt(a, b, c)
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
  args = [jnp.broadcast_to(jnp.asarray(v).astype(jnp.uint32), shape) for v in (a, b, c)]
  return inline_asm_u32("prmt.b32 $0, $1, $2, $3;", args)


def halves_to_f32(pair, dtype, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """uint32 tile of two 16-bit floats (low, high) -> two float32 tiles.

  On GPU fp16 pairs convert in inline PTX straight from the register halves (left to
  the compiler, each pair is first repacked with an extra `prmt`).
  """
  if dtype == jnp.float16 and not interpret:
    asm = "{ .reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, %s; }"
    return inline_asm_f32(asm % "l", pair), inline_asm_f32(asm % "h", pair)
  lo = jax.lax.bitcast_convert_type(pair.astype(jnp.uint16), dtype)
  hi = jax.lax.bitcast_convert_type((pair >> jnp.uint32(16)).astype(jnp.uint16), dtype)
  return lo.astype(jnp.float32), hi.astype(jnp.float32)
