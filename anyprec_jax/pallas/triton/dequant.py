"""Bitplane dequantisation kernel: the dense W_b for prefill (Park et al., 2024, §4).

Each program decodes one [BW words x BN rows] tile of the top b planes (`decode`) and
writes the values in *kernel column order*: out[n, q, w] = W_b[n, 32 w + order[q]]
with order = `bitops.kernel_order(b)`. A matmul needs no un-permuting: it multiplies
with activations permuted the same way (`bitops.permute_columns`). `dequantize` below
returns the natural [N, K] order (an extra XLA transpose; for tests and tools).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from anyprec_jax import format as fmt
from anyprec_jax.pallas import bitops
from anyprec_jax.pallas.triton import decode, lowering
from anyprec_jax.weight import AnyPrecWeight
from anyprec_jax.weight import dequantize as _dequantize_weight


@dataclasses.dataclass(frozen=True)
class DequantConfig:
  """Tiling of the dequantisation kernel (static): rows and words per program."""
  block_n: int = 32
  block_w: int = 32
  lookup: decode.Lookup | None = None
  launch: lowering.LaunchParams = lowering.LaunchParams()


def padded_words(num_words: int, cfg: DequantConfig) -> int:
  return -(-num_words // cfg.block_w) * cfg.block_w


def _dequant_kernel(planes_ref, lut_ref, o_ref, *, bits: int, num_rows: int,
                    num_words: int, cfg: DequantConfig, interpret: bool):
  """One program: BN rows x BW words.

  planes_ref: [P, N, W] uint32 bitplanes (only planes 0..b-1 are read)
  lut_ref:    [N * 2^b] LUT of precision b, flattened row-major
  o_ref:      [N, 32, Wp] dense weight in kernel column order
  """
  bn, bw = cfg.block_n, cfg.block_w
  rows = jnp.minimum(pl.program_id(0) * bn + jnp.arange(bn, dtype=jnp.int32),
                     num_rows - 1)  # [BN]; clamped rows rewrite row N-1 identically
  w0 = pl.program_id(1) * bw
  limit = num_words if o_ref.shape[2] != num_words else None
  planes = [lowering.load_words_rows(planes_ref, p, rows, w0, bw, limit, interpret)
            for p in range(bits)]  # b x [BW, BN]
  lookup = cfg.lookup or decode.default_lookup(bits)
  if lookup is decode.Lookup.REGISTERS:
    tables = decode.register_tables(lut_ref, rows, bits)
    vals = decode.register_values(planes, bits, tables, lut_ref.dtype, interpret)
  else:
    vals = decode.gather_values(planes, bits, lut_ref, (rows * (1 << bits))[None, :])
  words = (w0 + jnp.arange(bw, dtype=jnp.int32))[:, None]  # [BW, 1]
  for q in range(bitops.WORD_BITS):
    o_ref[rows[None, :], q, words] = vals[q].astype(o_ref.dtype)  # [BW, BN]


@functools.partial(jax.jit,
                   static_argnames=("bits", "dtype", "cfg", "interpret", "poison"))
def dequantize_permuted(planes: jax.Array, lut: jax.Array, *, bits: int, dtype=jnp.float32,
                        cfg: DequantConfig = DequantConfig(), interpret: bool = False,
                        poison: bool = False) -> jax.Array:
  """Dense W_b in kernel column order with the Pallas kernel.

  Args:
    planes: uint32 [P, N, W] bitplanes, P >= bits.
    lut: [N, 2^bits] LUT of precision `bits` (fp16 or bf16).
    bits: precision b (static).
    dtype: output dtype.
    cfg: tiling (static).
    interpret: run in the Pallas interpreter.
    poison: start the output buffer as NaN (tests: all must be written).

  Returns:
    [N, 32 * Wp], column q * Wp + w = W_b[:, 32 w + kernel_order(bits)[q]]; columns
    past K hold LUT[n, 0] (code 0) and must meet zero activations.
  """
  _, n, w = planes.shape
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape} != {(n, 1 << bits)}")
  wp = padded_words(w, cfg)
  kernel = functools.partial(_dequant_kernel, bits=bits, num_rows=n, num_words=w,
                             cfg=cfg, interpret=interpret)
  out = lowering.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((n, bitops.WORD_BITS, wp), dtype),
      grid=(pl.cdiv(n, cfg.block_n), wp // cfg.block_w), launch=cfg.launch,
      interpret=interpret, name=f"anyprec_dequant_b{bits}", poison=poison,
  )(planes, lut.reshape(-1))  # [N, 32, Wp]
  return out.reshape(n, bitops.WORD_BITS * wp)


def dequantize(planes: jax.Array, lut: jax.Array, *, bits: int, in_features: int,
               dtype=jnp.float32, cfg: DequantConfig = DequantConfig(),
               interpret: bool = False, poison: bool = False) -> jax.Array:
  """Dense W_b [N, K] in natural column order (kernel + an XLA un-permute)."""
  n, w = planes.shape[1], planes.shape[2]
  if w != fmt.num_words(in_features):
    raise ValueError(f"{w} words per row do not fit K={in_features}")
  out = dequantize_permuted(planes, lut, bits=bits, dtype=dtype, cfg=cfg,
                            interpret=interpret, poison=poison)
  wp = out.shape[1] // bitops.WORD_BITS
  out = out.reshape(n, bitops.WORD_BITS, wp).transpose(0, 2, 1)  # [N, Wp, 32] by q
  inverse = jnp.argsort(jnp.asarray(bitops.kernel_order(bits)))
  out = out[:, :, inverse].reshape(n, bitops.WORD_BITS * wp)  # natural order
  return out[:, :in_features]


def dequantize_reference(w: AnyPrecWeight, bits: int | None = None,
                         dtype=jnp.float32) -> jax.Array:
  """Reference of `dequantize`: `weight.dequantize`, the source of truth."""
  return _dequantize_weight(w, bits, dtype)
