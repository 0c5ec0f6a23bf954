"""Bitplane LUT GEMV: y = x @ W_b^T for a few activation rows (Park et al., 2024, §4).

W_b[n, k] = LUT_b[n, code_b(n, k)] with code_b read from the top b bitplanes. One
program owns BN output rows and one of S slices of the K words; it walks its words in
chunks of BW words (32*BW columns), rebuilds the codes word-wide (`bitops`), gathers the
LUT values (`lut_ref[idx]`, an L1-cached gather load in Triton) and accumulates
val * x in fp32 in a [BN, BW] tile per activation row, reduced once at the end. With
S > 1 the wrapper sums the S partial outputs (split-K for tall-thin shapes).

Only planes 0..b-1 and the b-bit LUT are read; padding columns (K..32W-1) carry code 0
and meet zero activations, so they never contribute.
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
from anyprec_jax.weight import AnyPrecWeight, dequantize

MAX_ROWS = 8


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """Tiling of the GEMV (all static).

  block_n: output rows per program (power of two).
  block_w: words per chunk, 32 columns each (power of two).
  k_splits: S, programs along K, each owning a contiguous slice of the words.
  lookup: how codes become values (None: `decode.default_lookup(bits)`).
  prefetch: load chunk j+1's planes before decoding chunk j (software pipelining);
    off by default (it raised register use and was slower on the H100).
  launch: warps / pipeline stages.
  """
  block_n: int = 16
  block_w: int = 32
  k_splits: int = 1
  lookup: decode.Lookup | None = None
  prefetch: bool = False
  launch: lowering.LaunchParams = lowering.LaunchParams()


def padded_words(num_words: int, cfg: GemvConfig) -> int:
  """Words after padding K to a whole number of chunks in every split."""
  step = cfg.block_w * cfg.k_splits
  return -(-num_words // step) * step


def _gemv_kernel(x_ref, planes_ref, lut_ref, o_ref, *, bits: int, num_rows: int,
                 num_words: int, cfg: GemvConfig, interpret: bool):
  """One program: BN rows x one K split. Tiles are words-major, [BW, BN].

  Words-major tiles give the plane loads (contiguous along words) and the LUT gathers
  the same Triton layout, so no shared-memory layout conversion sits between them.

  x_ref:      [M, 32, Wp] f32, activations in kernel column order, zero past K
  planes_ref: [P, N, W] uint32 bitplanes (only planes 0..b-1 are read)
  lut_ref:    [N * 2^b] LUT of precision b, flattened row-major
  o_ref:      [S, M, N] f32 partial outputs
  """
  m_rows = x_ref.shape[0]
  bn, bw = cfg.block_n, cfg.block_w
  words_per_split = x_ref.shape[2] // cfg.k_splits
  i, split = pl.program_id(0), pl.program_id(1)
  rows = jnp.minimum(i * bn + jnp.arange(bn, dtype=jnp.int32), num_rows - 1)  # [BN]
  row_base = (rows * (1 << bits))[None, :]  # [1, BN]
  limit = num_words if x_ref.shape[2] != num_words else None
  lookup = cfg.lookup or decode.default_lookup(bits)
  if lookup is decode.Lookup.REGISTERS:
    tables = decode.register_tables(lut_ref, rows, bits)

  n_chunks = words_per_split // bw

  def load(j):  # b x [BW, BN] plane tiles of chunk j of this split
    w0 = split * words_per_split + j * bw
    return tuple(lowering.load_words_rows(planes_ref, p, rows, w0, bw, limit, interpret)
                 for p in range(bits))

  def chunk(j, carry):
    planes, accs = carry
    if cfg.prefetch:
      # Software pipelining: issue the next chunk's plane loads before decoding this
      # one (the last iteration re-reads its own chunk, harmlessly).
      nxt = load(jnp.minimum(j + 1, n_chunks - 1))
    else:
      planes = load(j)
      nxt = planes
    if lookup is decode.Lookup.REGISTERS:
      vals = decode.register_values(list(planes), bits, tables, lut_ref.dtype, interpret)
    else:
      vals = decode.gather_values(list(planes), bits, lut_ref, row_base)  # 32 x [BW, BN]
    words = (split * words_per_split + j * bw + jnp.arange(bw, dtype=jnp.int32))[:, None]
    accs = list(accs)
    for q in range(bitops.WORD_BITS):
      for m in range(m_rows):
        accs[m] = accs[m] + vals[q] * x_ref[m, q, words]  # x: [BW, 1]
    return nxt, tuple(accs)

  zero = jnp.zeros((bw, bn), jnp.float32)
  _, accs = jax.lax.fori_loop(0, n_chunks, chunk, (load(0), (zero,) * m_rows))
  for m in range(m_rows):
    o_ref[split, m, rows] = jnp.sum(accs[m], axis=0)  # [BN]; clamped rows repeat


@functools.partial(jax.jit, static_argnames=("bits", "cfg", "interpret", "poison"))
def gemv(x: jax.Array, planes: jax.Array, lut: jax.Array, *, bits: int,
         cfg: GemvConfig = GemvConfig(), interpret: bool = False,
         poison: bool = False) -> jax.Array:
  """y = x @ W_b^T with the Pallas GEMV kernel.

  Args:
    x: [M, K] activations (M <= 8; any float dtype).
    planes: uint32 [P, N, ceil(K/32)] bitplanes, P >= bits.
    lut: [N, 2^bits] LUT of precision `bits`.
    bits: precision b (static; one kernel per width).
    cfg: tiling (static).
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    poison: start the kernel's output buffer as NaN (tests: all must be written).

  Returns:
    [M, N] float32.
  """
  m, k = x.shape
  _, n, w = planes.shape
  if m > MAX_ROWS:
    raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
  if w != fmt.num_words(k):
    raise ValueError(f"planes hold {w} words per row; K={k} needs {fmt.num_words(k)}")
  if lut.shape != (n, 1 << bits):
    raise ValueError(f"LUT shape {lut.shape} != {(n, 1 << bits)}")
  wp = padded_words(w, cfg)
  xp = bitops.permute_columns(x.astype(jnp.float32), bits, wp)  # [M, 32, Wp]
  kernel = functools.partial(_gemv_kernel, bits=bits, num_rows=n, num_words=w, cfg=cfg,
                             interpret=interpret)
  partial = lowering.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((cfg.k_splits, m, n), jnp.float32),
      grid=(pl.cdiv(n, cfg.block_n), cfg.k_splits),
      launch=cfg.launch, interpret=interpret, name=f"anyprec_gemv_b{bits}",
      poison=poison,
  )(xp, planes, lut.reshape(-1))  # [S, M, N]
  return partial[0] if cfg.k_splits == 1 else jnp.sum(partial, axis=0)


def gemv_reference(x: jax.Array, w: AnyPrecWeight, bits: int | None = None) -> jax.Array:
  """fp32 reference of `gemv`: x [M, K] -> [M, N] through `weight.dequantize`."""
  wd = dequantize(w, bits, jnp.float32)  # [N, K]
  return jnp.dot(x.astype(jnp.float32), wd.T, precision=jax.lax.Precision.HIGHEST)
