"""Baselines of the paper's comparison (Park et al., ICML 2024, §5).

- *independent*: our weighted k-means (kmeans.py: k-means++ and binned-DP starts, the
  better kept) run separately at every bit width; one full model per width.
- *squeezellm*: the paper's baseline as SqueezeLLM and the original release run it:
  the same weighted k-means with one k-means++ start and no DP start, Lloyd until the
  borders stop moving (at most 50 updates), separately at every width.
- *rtn*: per-row uniform asymmetric round-to-nearest between the row's min and max.

Both return codes + LUTs per width, so they are evaluated exactly like any-precision
models (the pipeline writes them as dense dequantized checkpoints).
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax.quantize import dp
from anyprec_jax.quantize import kmeans
from anyprec_jax.quantize import rowops


def dequantize_codes(codes: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """Dense weights [N, K] = lut[n, codes[n, k]] (numpy)."""
  return np.take_along_axis(np.asarray(lut), np.asarray(codes).astype(np.int64), axis=1)


def independent(w, f, bits: Iterable[int], key: jax.Array, *, max_iter: int = 50,
                n_init: int = 1, dp_bins: int = dp.DEFAULT_BINS,
                chunk_elements: int | None = None,
                name: str | None = None) -> dict[int, kmeans.SeedResult]:
  """Weighted k-means at every width separately (no upscaling).

  Args:
    w: weight [N, K]; f: Fisher information [N, K].
    bits: widths to quantize to.
    key: PRNG key; width b uses fold_in(key, b).
    max_iter, n_init, dp_bins, chunk_elements: see `kmeans.seed_kmeans`.
    name: layer name for error messages.

  Returns:
    {b: SeedResult(codes uint8 [N, K], lut float32 [N, 2^b])}.
  """
  return {b: kmeans.seed_kmeans(w, f, b, jax.random.fold_in(key, b), max_iter=max_iter,
                                n_init=n_init, dp_bins=dp_bins,
                                chunk_elements=chunk_elements, name=name)
          for b in bits}


def squeezellm(w, f, bits: Iterable[int], key: jax.Array, *, max_iter: int = 50,
               chunk_elements: int | None = None,
               name: str | None = None) -> dict[int, kmeans.SeedResult]:
  """The paper's independent baseline: `independent` with n_init = 1, dp_bins = 0.

  Args / Returns: as `independent`.
  """
  return independent(w, f, bits, key, max_iter=max_iter, n_init=1, dp_bins=0,
                     chunk_elements=chunk_elements, name=name)


@functools.partial(jax.jit, static_argnames=("bits",))
def _rtn_chunk(row_offset, w, *, bits):
  """RTN of a chunk [R, K] -> codes uint8 [R, K], lut float32 [R, 2^bits]."""
  del row_offset
  w = w.astype(jnp.float32)
  levels = (1 << bits) - 1
  lo = jnp.min(w, axis=1, keepdims=True)  # [R, 1]
  hi = jnp.max(w, axis=1, keepdims=True)
  scale = (hi - lo) / levels  # [R, 1]
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round((w - lo) / safe), 0, levels)  # [R, K]
  codes = jnp.where(scale > 0, codes, 0).astype(jnp.uint8)
  lut = lo + scale * jnp.arange(levels + 1, dtype=jnp.float32)  # [R, 2^b]
  return codes, lut


def rtn(w, bits: int, *, chunk_elements: int | None = None,
        name: str | None = None) -> kmeans.SeedResult:
  """Per-row uniform asymmetric round-to-nearest (min/max).

  Code q = round((w - min) / scale), scale = (max - min) / (2^b - 1); the LUT holds
  min + q * scale, so a constant row is reproduced exactly.

  Args:
    w: weight [N, K].
    bits: width b (1..8).
    chunk_elements: about how many weights per jitted call.
    name: layer name for error messages.

  Returns:
    SeedResult(codes uint8 [N, K], lut float32 [N, 2^b]).
  """
  kmeans.check_bits(bits)
  kmeans.check_weight(w, name)
  n_rows, k = np.shape(w)
  rows = rowops.chunk_rows_for(n_rows, k, chunk_elements)
  codes, lut = rowops.map_row_chunks(functools.partial(_rtn_chunk, bits=bits), (w,), rows)
  return kmeans.SeedResult(codes, lut)
