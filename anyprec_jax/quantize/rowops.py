"""Per-row building blocks shared by the seed k-means and the upscaling.

Both algorithms of the paper (Park et al., ICML 2024, §3) work on one output row at a
time, on the row sorted by value, where every cluster is a contiguous range. Range sums
of the sample weights come from prefix sums. Prefix sums of K ~ 10^4 Fisher values
whose magnitudes span many decades lose all precision in float32 when a small cluster
is the difference of two large prefixes (the original uses float64). Float64 is not
cheap on every accelerator and needs a global JAX flag, so prefixes here are
*double-float* (hi + lo pairs of float32, error-free TwoSum), about 44 bits of mantissa.

`map_row_chunks` runs a jitted per-chunk function over the rows of a matrix in fixed-size
chunks (bounded memory, one compilation per chunk shape).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # ~4M weights per chunk on CPU
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24
_ROW_ALIGN = 64


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's error-free sum: a + b == s + err exactly (round-to-nearest)."""
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  return s, err


class Prefix(NamedTuple):
  """Double-float inclusive prefix sums with a leading zero: [..., K + 1] each."""
  hi: jax.Array
  lo: jax.Array


def df_cumsum(v: jax.Array) -> Prefix:
  """Double-float prefix sums along the last axis, starting with 0.

  hi is the float32 cumsum (whatever summation order XLA uses); the rounding error of
  each step is recovered exactly with TwoSum against the previous prefix and summed
  into lo, so hi + lo is accurate to ~1e-13 relative to the largest prefix.

  Args:
    v: float32 [..., K].

  Returns:
    Prefix with hi, lo float32 [..., K + 1]; hi[..., i] + lo[..., i] = sum(v[..., :i]).
  """
  v = v.astype(jnp.float32)
  hi = jnp.cumsum(v, axis=-1)
  prev = jnp.concatenate([jnp.zeros_like(v[..., :1]), hi[..., :-1]], axis=-1)
  s, err = two_sum(prev, v)
  lo = jnp.cumsum((s - hi) + err, axis=-1)
  pad = [(0, 0)] * (v.ndim - 1) + [(1, 0)]
  return Prefix(jnp.pad(hi, pad), jnp.pad(lo, pad))


# Columns of SortedRow.pre: quantities summed, then hi / lo halves.
S, SX, SXX, X = 0, 1, 2, 3
_NQ = 4


def sums_between(a: jax.Array, b: jax.Array) -> jax.Array:
  """Range sums from two gathered prefix rows: sum over [start, stop) of each quantity.

  Args:
    a, b: float32 [..., 8] = SortedRow.pre at start and at stop.

  Returns:
    float32 [..., 4] sums of (s, s*x, s*x^2, x); exactly 0 for ranges of zeros.
  """
  d, e = two_sum(b[..., :_NQ], -a[..., :_NQ])
  return d + (e + (b[..., _NQ:] - a[..., _NQ:]))


def range_sums(row: "SortedRow", start: jax.Array, stop: jax.Array) -> jax.Array:
  """Sums of (s, s*x, s*x^2, x) over x[start:stop] (one gathered row each end).

  Args:
    row: SortedRow (one row; vmapped by callers).
    start, stop: int arrays of one shape [...], 0 <= start <= stop <= K.

  Returns:
    float32 [..., 4].
  """
  return sums_between(row.pre[start], row.pre[stop])


class SortedRow(NamedTuple):
  """One weight row sorted by value, with its sample weights and prefix sums.

  x: float32 [K] sorted weights; s: float32 [K] sample weights (same order);
  order: int32 [K] with x = w[order];
  pre: float32 [K + 1, 8] double-float prefix sums of (s, s*x, s*x^2, x): columns 0-3
  the hi parts, 4-7 the lo parts (one gather fetches all of them).
  """
  x: jax.Array
  s: jax.Array
  order: jax.Array
  pre: jax.Array


def sample_weights(w: jax.Array, f: jax.Array) -> jax.Array:
  """Sample weights of one row as in the original release.

  Weights equal to 0 get weight 0; a row whose remaining Fisher sums to 0 uses
  uniform weights.

  Args:
    w: float32 [K] weights; f: float32 [K] Fisher information (>= 0).

  Returns:
    float32 [K].
  """
  s = jnp.where(w != 0, f, 0.0).astype(jnp.float32)
  return jnp.where(jnp.sum(s) > 0, s, jnp.ones_like(s))


def sort_row(w: jax.Array, s: jax.Array, order: jax.Array | None = None) -> SortedRow:
  """Sorts one row (or applies a given order) and builds its prefix sums.

  Args:
    w: float32 [K]; s: float32 [K] sample weights.
    order: optional int32 [K] permutation that sorts the clusters contiguously; by
      default the stable argsort of w.

  Returns:
    SortedRow.
  """
  if order is None:
    order = jnp.argsort(w, stable=True).astype(jnp.int32)
  x = w[order]
  ss = s[order]
  sx = ss * x
  sums = df_cumsum(jnp.stack([ss, sx, sx * x, x]))  # [4, K + 1]
  pre = jnp.concatenate([sums.hi, sums.lo], axis=0).T  # [K + 1, 8]
  return SortedRow(x, ss, order, pre)


def range_mean(row: SortedRow, start: jax.Array, stop: jax.Array,
               fallback: jax.Array) -> jax.Array:
  """Weighted mean of x[start:stop]; plain mean if the range has zero weight.

  Args:
    row: SortedRow; start, stop, fallback: arrays of one shape [C].

  Returns:
    float32 [C]; `fallback` for empty ranges.
  """
  sums = range_sums(row, start, stop)  # [C, 4]
  count = (stop - start).astype(jnp.float32)
  use_w = sums[..., S] > 0
  num = jnp.where(use_w, sums[..., SX], sums[..., X])
  den = jnp.where(use_w, sums[..., S], count)
  mean = num / jnp.where(den > 0, den, 1.0)
  return jnp.where(stop > start, mean, fallback)


def _seg_add(a, b):
  """Segmented-sum combine: a segment start in `b` resets the running sum."""
  return a[0] | b[0], jnp.where(b[0][..., None], b[1], a[1] + b[1])


def cluster_sums(row: SortedRow, borders: jax.Array) -> jax.Array:
  """Per-cluster sums of (s, s*x, x, 1), each over its own elements only.

  Unlike differences of row-wide prefix sums, their precision does not depend on the
  rest of the row (a segmented scan, deterministic on every backend).

  Args:
    row: SortedRow; borders: int32 [n + 1] cluster borders.

  Returns:
    float32 [n, 4]; zeros for empty clusters.
  """
  k = row.x.shape[0]
  starts = jnp.zeros(k, jnp.bool_).at[borders[:-1]].set(True, mode="drop")  # [K]
  sx = row.s * row.x
  vals = jnp.stack([row.s, sx, row.x, jnp.ones_like(row.x)], axis=-1)  # [K, 4]
  _, scanned = jax.lax.associative_scan(_seg_add, (starts, vals))
  ends = jnp.clip(borders[1:] - 1, 0, k - 1)
  nonempty = (borders[1:] > borders[:-1])[:, None]
  return jnp.where(nonempty, scanned[ends], 0.0)


def level_luts(row: SortedRow, borders: jax.Array, sums: jax.Array,
               seed_fallback: jax.Array, seed_bits: int, parent_bits: int) -> list[jax.Array]:
  """LUTs of every level from the per-cluster sums of the parent clusters.

  The sums of a level-b cluster are the sums over its 2^(parent - b) descendants.
  LUT = weighted mean (plain mean for zero-weight clusters), clamped to the cluster's
  [min, max] (so a cluster of equal values is exact); an empty cluster copies its
  parent's value (at the seed level: `seed_fallback`).

  Args:
    row: SortedRow; borders: int32 [2^parent + 1] parent cluster borders.
    sums: float32 [2^parent, 4] from `cluster_sums`.
    seed_fallback: float32 [2^seed] values for empty seed clusters.
    seed_bits, parent_bits: static.

  Returns:
    [lut_seed [2^seed], ..., lut_parent [2^parent]].
  """
  k = row.x.shape[0]
  luts = []
  for b in range(seed_bits, parent_bits + 1):
    g = sums.reshape(1 << b, -1, 4).sum(axis=1)  # [2^b, 4]
    edge = borders[::1 << (parent_bits - b)]  # [2^b + 1] level-b borders
    lo = row.x[jnp.clip(edge[:-1], 0, k - 1)]
    hi = row.x[jnp.clip(edge[1:] - 1, 0, k - 1)]
    fallback = seed_fallback if b == seed_bits else jnp.repeat(luts[-1], 2)
    weighted = g[:, 1] / jnp.where(g[:, 0] > 0, g[:, 0], 1.0)
    plain = g[:, 2] / jnp.where(g[:, 3] > 0, g[:, 3], 1.0)
    mean = jnp.clip(jnp.where(g[:, 0] > 0, weighted, plain), lo, hi)
    luts.append(jnp.where(g[:, 3] > 0, mean, fallback))
  return luts


def codes_from_borders(borders: jax.Array, k: int) -> jax.Array:
  """Cluster index of every sorted position for cluster borders of one row.

  Args:
    borders: int32 [n + 1], nondecreasing, borders[0] = 0, borders[n] = k; cluster c
      is the range [borders[c], borders[c + 1]).
    k: row length K (static).

  Returns:
    int32 [K]: the nonempty cluster holding each sorted position.
  """
  marks = jnp.zeros(k + 1, jnp.int32).at[borders[1:-1]].add(1)  # [K + 1]
  return jnp.cumsum(marks)[:k]


def unsort(values_sorted: jax.Array, order: jax.Array) -> jax.Array:
  """Inverse of `x = w[order]`: returns v with v[order] = values_sorted."""
  return jnp.zeros_like(values_sorted).at[order].set(values_sorted)


def row_keys(key: jax.Array, row_offset: jax.Array, n_rows: int) -> jax.Array:
  """One PRNG key per global row index, so results do not depend on the chunking."""
  rows = row_offset + jnp.arange(n_rows, dtype=jnp.int32)
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)


def chunk_rows_for(n_rows: int, n_cols: int, chunk_elements: int | None = None) -> int:
  """Rows per chunk: about `chunk_elements` weights, balanced over the chunks."""
  if chunk_elements is None:
    on_cpu = jax.default_backend() == "cpu"
    chunk_elements = DEFAULT_CHUNK_ELEMENTS if on_cpu else ACCELERATOR_CHUNK_ELEMENTS
  target = max(1, chunk_elements // max(n_cols, 1))
  if n_rows <= target:
    return n_rows
  n_chunks = -(-n_rows // target)
  rows = -(-n_rows // n_chunks)
  return min(-(-rows // _ROW_ALIGN) * _ROW_ALIGN, n_rows)


def map_row_chunks(fn: Callable, arrays: Sequence[np.ndarray | jax.Array],
                   chunk_rows: int) -> list[np.ndarray]:
  """Applies `fn(row_offset, *chunk_arrays)` to fixed-size row chunks.

  The last chunk is zero-padded to `chunk_rows` (one compilation per chunk shape) and
  the padding is dropped from the outputs. All chunks are dispatched before any result
  is read back, so the device stays busy.

  Args:
    fn: jitted function returning a tuple of arrays with leading dim chunk_rows.
    arrays: inputs with a common leading dimension N.
    chunk_rows: rows per call.

  Returns:
    list of numpy arrays with leading dimension N.
  """
  n = arrays[0].shape[0]
  outs = []
  for start in range(0, n, chunk_rows):
    stop = min(start + chunk_rows, n)
    chunk = [_pad_rows(a[start:stop], chunk_rows) for a in arrays]
    outs.append((stop - start, fn(jnp.int32(start), *chunk)))
  results = []
  for i in range(len(outs[0][1])):
    results.append(np.concatenate([np.asarray(o[i])[:m] for m, o in outs], axis=0))
  return results


def _pad_rows(a, rows: int):
  a = jnp.asarray(a)
  if a.shape[0] == rows:
    return a
  return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
