"""Incremental upscaling of a seed model to the parent (Park et al., ICML 2024, §3.2).

Starting from the seed's clusters at b = seed bits, every cluster (a contiguous range of
the sorted row) is split into two by weighted 2-means inside its range (split.py: the
exact best split by default, or the original release's bisection); the
children of cluster c are 2c and 2c + 1. After parent - seed levels, the parent code of
a weight determines its cluster at every level b: it is the top b bits,

    code_b = code_parent >> (parent - b),

so one bitplane parent holds every precision. The LUT at level b holds the weighted
mean of each level-b cluster (an empty child copies its parent's centroid). Nothing is
re-optimised across levels, as in the paper (Nesting.GREEDY, this module's default;
`QuantConfig`, the quantizer's, defaults to OPTIMAL since 2026-12-06).

Nesting.OPTIMAL (not in the paper, nesting.py) also builds the nested tree of ranges
that minimises sum_b lambda_b E_b by a binned dynamic program (seed partition
included), refined at full resolution, with the levels below the DP split as above,
and keeps whichever of the two trees has the lower objective: the seed is then chosen
for the 3-bit *and* finer errors together, so it is no longer the best 3-bit k-means.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax.quantize import dp
from anyprec_jax.quantize import kmeans
from anyprec_jax.quantize import nesting as nesting_lib
from anyprec_jax.quantize import rowops
from anyprec_jax.quantize import split as split_lib
from anyprec_jax.quantize.config import Nesting, SplitMethod


class UpscaleResult(NamedTuple):
  """Any-precision quantization of a matrix [N, K].

  codes: uint8 [N, K] parent codes (parent_bits wide);
  luts: {b: float32 [N, 2^b]} for b = seed_bits..parent_bits; the b-bit weight is
  luts[b][n, codes[n, k] >> (parent_bits - b)].
  """
  codes: np.ndarray
  luts: dict[int, np.ndarray]


def upscale_sorted_row(row: rowops.SortedRow, borders: jax.Array, levels: int,
                       split: SplitMethod = SplitMethod.OPTIMAL) -> jax.Array:
  """Splits every cluster `levels` times.

  Args:
    row: SortedRow of one row.
    borders: int32 [n + 1] seed cluster borders in sorted order.
    levels: parent_bits - seed_bits (static).
    split: split rule (static).

  Returns:
    parent borders int32 [n * 2^levels + 1]; cluster c of a level has children 2c, 2c+1.
  """
  for _ in range(levels):
    start, stop = borders[:-1], borders[1:]
    if split is SplitMethod.OPTIMAL:
      t = split_lib.optimal_split_points(row, borders)
    else:
      t = split_lib.bisection_split_points(row, start, stop)
    borders = jnp.concatenate([jnp.stack([start, t], axis=-1).reshape(-1), stop[-1:]])
  return borders


def finish_row(row: rowops.SortedRow, borders: jax.Array, seed_lut: jax.Array,
               seed_bits: int, parent_bits: int):
  """Parent codes (original column order) and the LUT of every level for one row.

  Returns:
    (codes uint8 [K], lut_seed, ..., lut_parent); LUTs are cluster means computed
    per cluster (rowops.cluster_sums), empty clusters copy their parent.
  """
  codes = rowops.unsort(rowops.codes_from_borders(borders, row.x.shape[0]), row.order)
  sums = rowops.cluster_sums(row, borders)
  luts = rowops.level_luts(row, borders, sums, seed_lut, seed_bits, parent_bits)
  return (codes.astype(jnp.uint8), *luts)


def optimal_nesting_row(row: rowops.SortedRow, greedy: jax.Array, seed_lut: jax.Array,
                        seed_bits: int, parent_bits: int, split: SplitMethod, bins: int,
                        weights: tuple[float, ...]):
  """The better (lower sum_b lambda_b E_b) of the greedy tree and the nested DP's.

  Args:
    row: SortedRow; greedy: int32 [2^parent + 1] greedy parent borders.
    seed_lut: float32 [2^seed] the seed k-means centroids (fallback of empty clusters).
    bins, weights: the DP's bins and lambda_b for b = seed..parent (static).

  Returns:
    (parent borders int32 [2^parent + 1], seed fallback values float32 [2^seed]).
  """
  depth = nesting_lib.dp_depth(seed_bits, parent_bits, bins)
  coarse = nesting_lib.optimal_borders(row, seed_bits, depth, bins,
                                       nesting_lib.dp_weights(weights, seed_bits, depth))
  tree = upscale_sorted_row(row, coarse, parent_bits - depth, split)
  use = (nesting_lib.objective(row, tree, weights, seed_bits) <
         nesting_lib.objective(row, greedy, weights, seed_bits))
  seed_edge = tree[::1 << (parent_bits - seed_bits)]
  fallback = row.x[jnp.clip(seed_edge[:-1], 0, row.x.shape[0] - 1)]
  return jnp.where(use, tree, greedy), jnp.where(use, fallback, seed_lut)


@functools.partial(jax.jit, static_argnames=(
    "seed_bits", "parent_bits", "max_iter", "n_init", "dp_bins", "split", "nesting",
    "nesting_bins", "nesting_weights"))
def _seed_upscale_chunk(key, row_offset, w, f, *, seed_bits, parent_bits, max_iter,
                        n_init, dp_bins, split, nesting, nesting_bins, nesting_weights):
  """Seed + upscale of a chunk: w, f [R, K] -> (codes [R, K], lut_seed, ..., lut_parent)."""
  w = w.astype(jnp.float32)
  f = f.astype(jnp.float32)
  keys = rowops.row_keys(key, row_offset, w.shape[0])

  def one(w_row, f_row, k):
    row = rowops.sort_row(w_row, rowops.sample_weights(w_row, f_row))
    borders, lut = kmeans.seed_sorted_row(row, 1 << seed_bits, k, max_iter, n_init, dp_bins)
    borders = upscale_sorted_row(row, borders, parent_bits - seed_bits, split)
    if nesting is Nesting.OPTIMAL:
      borders, lut = optimal_nesting_row(row, borders, lut, seed_bits, parent_bits, split,
                                         nesting_bins, nesting_weights)
    return finish_row(row, borders, lut, seed_bits, parent_bits)

  return jax.vmap(one)(w, f, keys)


@functools.partial(jax.jit, static_argnames=("seed_bits", "parent_bits", "split"))
def _upscale_chunk(row_offset, w, f, codes, lut, *, seed_bits, parent_bits, split):
  """Upscale of given seed codes [R, K] / LUTs [R, 2^seed] of a chunk."""
  del row_offset
  w = w.astype(jnp.float32)
  f = f.astype(jnp.float32)
  n = 1 << seed_bits

  def one(w_row, f_row, c_row, lut_row):
    k = w_row.shape[0]
    iota = jnp.arange(k, dtype=jnp.int32)
    c_sorted, _, order = jax.lax.sort((c_row.astype(jnp.int32), w_row, iota), num_keys=2)
    row = rowops.sort_row(w_row, rowops.sample_weights(w_row, f_row), order=order)
    borders = jnp.searchsorted(c_sorted, jnp.arange(n + 1), side="left").astype(jnp.int32)
    seed_lut = lut_row.astype(jnp.float32)
    borders = upscale_sorted_row(row, borders, parent_bits - seed_bits, split)
    out = finish_row(row, borders, seed_lut, seed_bits, parent_bits)
    return (out[0], seed_lut, *out[2:])  # the given seed LUT is kept

  return jax.vmap(one)(w, f, codes, lut)


def _check_bit_range(seed_bits: int, parent_bits: int) -> None:
  kmeans.check_bits(seed_bits)
  kmeans.check_bits(parent_bits)
  if seed_bits > parent_bits:
    raise ValueError(f"seed_bits ({seed_bits}) must be <= parent_bits ({parent_bits})")


def _result(outs, seed_bits: int) -> UpscaleResult:
  return UpscaleResult(outs[0], {seed_bits + i: lut for i, lut in enumerate(outs[1:])})


def upscale(w, f, seed_codes, seed_lut, seed_bits: int, parent_bits: int, *,
            split: SplitMethod = SplitMethod.OPTIMAL, chunk_elements: int | None = None,
            name: str | None = None) -> UpscaleResult:
  """Incremental upscaling of a given seed quantization to `parent_bits`.

  Each seed cluster must be a contiguous range of the row sorted by value (true for
  any 1-D k-means result); rows are re-sorted by (code, value).

  Args:
    w: weight [N, K]; f: Fisher information [N, K] (>= 0).
    seed_codes: int [N, K] in [0, 2^seed_bits); seed_lut: float [N, 2^seed_bits].
    seed_bits, parent_bits: code widths, seed_bits <= parent_bits <= 8.
    split: split rule (OPTIMAL: exact 2-means; BISECTION: the original's).
    chunk_elements: about how many weights per jitted call.
    name: layer name for error messages.

  Returns:
    UpscaleResult (the seed LUT is returned as given, as float32).
  """
  _check_bit_range(seed_bits, parent_bits)
  kmeans.check_inputs(w, f, name)
  seed_codes = np.asarray(seed_codes)
  n_rows, k = np.shape(w)
  if seed_codes.shape != (n_rows, k):
    raise ValueError(f"seed codes shape {seed_codes.shape} != weight shape {(n_rows, k)}")
  if np.shape(seed_lut) != (n_rows, 1 << seed_bits):
    raise ValueError(f"seed LUT shape {np.shape(seed_lut)} != {(n_rows, 1 << seed_bits)}")
  if seed_codes.min() < 0 or seed_codes.max() >= (1 << seed_bits):
    raise ValueError(f"seed codes out of range for {seed_bits} bits")
  rows = rowops.chunk_rows_for(n_rows, k, chunk_elements)
  fn = functools.partial(_upscale_chunk, seed_bits=seed_bits, parent_bits=parent_bits,
                         split=split)
  return _result(rowops.map_row_chunks(fn, (w, f, seed_codes, seed_lut), rows), seed_bits)


def seed_and_upscale(w, f, seed_bits: int, parent_bits: int, key: jax.Array, *,
                     max_iter: int = 50, n_init: int = 1, dp_bins: int = dp.DEFAULT_BINS,
                     split: SplitMethod = SplitMethod.OPTIMAL,
                     nesting: Nesting = Nesting.GREEDY,
                     nesting_bins: int = nesting_lib.DEFAULT_BINS,
                     nesting_weights: tuple[float, ...] | None = None,
                     chunk_elements: int | None = None,
                     name: str | None = None) -> UpscaleResult:
  """Seed k-means + incremental upscaling in one pass (one sort per row).

  Args:
    w: weight [N, K]; f: Fisher information [N, K] (>= 0).
    seed_bits, parent_bits: code widths, seed_bits <= parent_bits <= 8.
    key: PRNG key of the k-means++ starts.
    max_iter, n_init, dp_bins: seed k-means options (see `kmeans.seed_kmeans`).
    split: split rule of the upscaling.
    nesting: GREEDY (the paper) or OPTIMAL (nesting.py: the better of the greedy tree
      and the nested DP's for sum_b lambda_b E_b).
    nesting_bins: bins of the OPTIMAL nesting's DP.
    nesting_weights: lambda_b for b = seed..parent (None: all 1).
    chunk_elements: about how many weights per jitted call.
    name: layer name for error messages.

  Returns:
    UpscaleResult; with GREEDY nesting identical to `upscale(w, f, *seed_kmeans(w, f, seed_bits, key), ...)`
    up to ties in the sort order.
  """
  _check_bit_range(seed_bits, parent_bits)
  kmeans.check_inputs(w, f, name)
  n_rows, k = np.shape(w)
  rows = rowops.chunk_rows_for(n_rows, k, chunk_elements)
  weights = tuple(float(v) for v in (nesting_weights or
                                     (1.0,) * (parent_bits - seed_bits + 1)))
  if len(weights) != parent_bits - seed_bits + 1:
    raise ValueError(f"nesting_weights needs {parent_bits - seed_bits + 1} values, "
                     f"got {len(weights)}")
  fn = functools.partial(_seed_upscale_chunk, key, seed_bits=seed_bits,
                         parent_bits=parent_bits, max_iter=max_iter, n_init=n_init,
                         dp_bins=dp_bins, split=split, nesting=nesting,
                         nesting_bins=nesting_bins, nesting_weights=weights)
  return _result(rowops.map_row_chunks(fn, (w, f), rows), seed_bits)
