"""Binned dynamic-programming initialisation of the 1-D weighted k-means.

Not part of the original release (which, like SqueezeLLM, uses k-means++ only), but the
same objective. Lloyd from a k-means++ start often stops in a local minimum several
percent above the optimum of 1-D weighted k-means; the exact optimum is a dynamic
program over the sorted row (Wang & Song, 2011), O(n K^2) — too slow for every row of
an LLM. Here the DP runs over a few bin edges only (half at equal counts, half at equal
value spacing, so outliers get their own bins), O(n M^2) with M ~ 128, and Lloyd then
refines the result on the full row. `kmeans.seed_sorted_row` keeps the better of this
start and the k-means++ starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anyprec_jax.quantize import rowops

DEFAULT_BINS = 128
MAX_CLUSTERS = 16  # above this the DP costs more than it is worth; k-means++ only


def bin_edges(x: jax.Array, bins: int) -> jax.Array:
  """Candidate cluster borders of one sorted row.

  Args:
    x: float32 [K] sorted values.
    bins: number of bins M (static, even).

  Returns:
    int32 [M + 2] nondecreasing edges from 0 to K (duplicates allowed).
  """
  k = x.shape[0]
  half = bins // 2
  counts = jnp.round(jnp.linspace(0.0, k, half + 1)).astype(jnp.int32)  # [M/2 + 1]
  values = jnp.linspace(x[0], x[-1], half + 1)[1:-1]  # [M/2 - 1]
  by_value = jnp.searchsorted(x, values, side="left").astype(jnp.int32)
  return jnp.sort(jnp.concatenate([counts, by_value, jnp.array([0, k], jnp.int32)]))


def range_costs(pre_edges: jax.Array) -> jax.Array:
  """Weighted SSE of every range [edge i, edge j) around its weighted mean.

  Args:
    pre_edges: float32 [E, 8] prefix rows (SortedRow.pre) at the edges.

  Returns:
    float32 [E, E], >= 0 for j >= i, inf below the diagonal.
  """
  e = pre_edges.shape[0]
  sums = rowops.sums_between(pre_edges[:, None], pre_edges[None, :])  # [E, E, 4]
  w, s1, s2 = sums[..., rowops.S], sums[..., rowops.SX], sums[..., rowops.SXX]
  cost = jnp.maximum(s2 - s1 * s1 / jnp.where(w > 0, w, 1.0), 0.0)
  upper = jnp.arange(e)[None, :] >= jnp.arange(e)[:, None]
  return jnp.where(upper, cost, jnp.inf)


def partition(cost: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Best split of edges 0..E-1 into n consecutive ranges for a range cost matrix.

  Args:
    cost: float32 [E, E], cost[i, j] of the range [edge i, edge j) (inf for j < i).
    n: number of ranges (static); empty ranges (i == j) are allowed.

  Returns:
    (idx int32 [n + 1] edge indices, 0 first and E - 1 last; the minimal total cost).
  """
  e = cost.shape[0]

  def step(best, _):
    total = best[:, None] + cost  # [E(i), E(j)]
    return jnp.min(total, axis=0), jnp.argmin(total, axis=0).astype(jnp.int32)

  best, back = jax.lax.scan(step, cost[0], None, length=n - 1)  # back [n - 1, E]

  def trace(j, arg):
    i = arg[j]
    return i, i

  _, cut = jax.lax.scan(trace, jnp.int32(e - 1), back, reverse=True)  # [n - 1]
  idx = jnp.concatenate([jnp.zeros(1, jnp.int32), cut, jnp.full(1, e - 1, jnp.int32)])
  return idx, best[e - 1]


def dp_borders(row: rowops.SortedRow, n: int, bins: int = DEFAULT_BINS) -> jax.Array:
  """Optimal n-cluster borders of one sorted row restricted to `bin_edges`.

  Args:
    row: SortedRow.
    n: number of clusters (static).
    bins: number of bins M (static).

  Returns:
    int32 [n + 1] nondecreasing borders, 0 first and K last.
  """
  edges = bin_edges(row.x, bins)  # [E]
  idx, _ = partition(range_costs(row.pre[edges]), n)
  return edges[idx]
