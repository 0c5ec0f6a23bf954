"""Weighted 2-means of contiguous ranges of a sorted row (Park et al., ICML 2024, §3.2).

Incremental upscaling splits every cluster of a b-bit model into two to obtain the
(b+1)-bit model. In 1-D the two children of a range [s, e) are [s, t) and [t, e).

- `optimal_split_points` (default): the split point with the largest decrease of the
  weighted squared error, W_L W_R / (W_L + W_R) (mean_L - mean_R)^2, over *every* t of
  every cluster at once (prefix sums, a segmented max; O(K) per level): the exact
  weighted 2-means of each range.
- `bisection_split_points` (the original release): a binary search over t for a Lloyd
  fixed point x[t-1] <= (mean_L + mean_R) / 2 <= x[t]; cheaper per step, but the fixed
  point it finds can be far from the best split (up to 1.8x its error on random rows).

A cluster whose total weight is 0 is split with uniform weights (as the original); a
cluster that cannot be split usefully (size < 2, a single weighted element, equal
values) keeps all its elements in the left child.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp

from anyprec_jax.quantize import rowops


def _part_sums(weighted, pa, pb, a, b):
  """(weight, weighted sum) of x[a:b] from prefix rows pa, pb [C, 8] at a and b;
  uniform weights where not `weighted`."""
  sums = rowops.sums_between(pa, pb)  # [C, 4]
  wsum = jnp.where(weighted, sums[:, rowops.S], (b - a).astype(jnp.float32))
  xsum = jnp.where(weighted, sums[:, rowops.SX], sums[:, rowops.X])
  return wsum, xsum


def _safe_div(num, den):
  return num / jnp.where(den > 0, den, 1.0)


def bisection_split_points(row: rowops.SortedRow, start: jax.Array,
                           stop: jax.Array) -> jax.Array:
  """Split points of every range [start, stop) by the original's bisection.

  Sizes 0 and 1 are not split (the element, if any, goes left); size 2 gives one
  element per child; larger ranges get the fixed point found by bisection (the last
  probed t when the bisection ends without one, as the original).

  Args:
    row: SortedRow of one row (x [K]).
    start, stop: int32 [C] cluster ranges.

  Returns:
    int32 [C] split points t, start <= t <= stop.
  """
  k = row.x.shape[0]
  n_steps = max(1, math.ceil(math.log2(k + 1)))
  p_start, p_stop = row.pre[start], row.pre[stop]  # [C, 8]
  weighted = rowops.sums_between(p_start, p_stop)[:, rowops.S] > 0  # [C]

  def probe(t):
    p_t = row.pre[t]
    wl, sl = _part_sums(weighted, p_start, p_t, start, t)
    wr, sr = _part_sums(weighted, p_t, p_stop, t, stop)
    mid = (_safe_div(sl, wl) + _safe_div(sr, wr)) * 0.5
    x_prev = row.x[jnp.clip(t - 1, 0, k - 1)]
    x_next = row.x[jnp.clip(t, 0, k - 1)]
    go_left = (wl > 0) & ((wr <= 0) | (x_prev > mid))
    go_right = (wl <= 0) | ((wr > 0) & (x_prev <= mid) & (mid > x_next))
    return go_left, go_right

  def step(_, state):
    lo, hi, t_last, done = state
    active = ~done & (hi - lo > 1)
    t = (lo + hi) // 2
    go_left, go_right = probe(t)
    found = active & ~go_left & ~go_right
    t_last = jnp.where(active, t, t_last)
    lo = jnp.where(active & go_right, t, lo)
    hi = jnp.where(active & go_left, t, hi)
    return lo, hi, t_last, done | found

  init = (start, stop, stop, jnp.zeros(start.shape, jnp.bool_))
  _, _, t, _ = jax.lax.fori_loop(0, n_steps, step, init)
  return t


def optimal_split_points(row: rowops.SortedRow, borders: jax.Array) -> jax.Array:
  """Split points maximising the decrease of the weighted squared error.

  Args:
    row: SortedRow of one row (x [K]).
    borders: int32 [C + 1] cluster borders (cluster c = [borders[c], borders[c + 1])).

  Returns:
    int32 [C] split points t (t = stop: not split, e.g. size < 2 or all values equal).
  """
  k = row.x.shape[0]
  c = borders.shape[0] - 1
  start, stop = borders[:-1], borders[1:]
  p_start, p_stop = row.pre[start], row.pre[stop]  # [C, 8]
  weighted = rowops.sums_between(p_start, p_stop)[:, rowops.S] > 0  # [C]
  cid = rowops.codes_from_borders(borders, k)  # [K] cluster of each sorted position
  pos = jnp.arange(k, dtype=jnp.int32)  # candidate t: the first element of the right part
  here = row.pre[:k]  # [K, 8] prefix at t
  wl, sl = _part_sums(weighted[cid], p_start[cid], here, start[cid], pos)
  wr, sr = _part_sums(weighted[cid], here, p_stop[cid], pos, stop[cid])
  valid = (pos > start[cid]) & (wl > 0) & (wr > 0)
  gain = _safe_div(wl * wr, wl + wr) * (_safe_div(sl, wl) - _safe_div(sr, wr)) ** 2  # [K]
  gain = jnp.where(valid, gain, -1.0)
  best = jax.ops.segment_max(gain, cid, num_segments=c)  # [C]
  is_best = valid & (gain >= best[cid]) & (best[cid] > 0)
  t = jax.ops.segment_min(jnp.where(is_best, pos, k), cid, num_segments=c)  # [C]
  return jnp.where((t >= start) & (t < stop), t, stop).astype(jnp.int32)
