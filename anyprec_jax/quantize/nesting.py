"""Optimal nested quantization: the tree of ranges that minimises sum_b lambda_b E_b.

Beyond the paper (Park et al., ICML 2024, §3.2 upscale greedily: the seed is the best
seed-bit k-means, then every cluster is split in two by a 2-means of its own range).
In 1-D every level b is a partition of the sorted row into 2^b contiguous ranges and the
upscaled levels form a binary tree of ranges: a level-b range is the union of its two
children at level b + 1 (either may be empty). The best such tree for the weighted sum
of the levels' Fisher-weighted errors,

    J = sum_{b = seed}^{D} lambda_b E_b,   E_b = sum over level-b ranges of their SSE,

is a dynamic program over the sorted row. With SSE(i, j) the weighted squared error of
the range [i, j) around its weighted mean,

    T_D(i, j) = lambda_D SSE(i, j),
    T_d(i, j) = lambda_d SSE(i, j) + min_{i <= t <= j} T_{d+1}(i, t) + T_{d+1}(t, j),

and the seed partition is the best split of the whole row into 2^seed ranges for the
range cost T_seed (dp.partition, the same DP as the seed's binned start).

Binning and cost. Over E candidate borders the interval levels cost O(E^3) each and the
seed partition O(2^seed E^2) per row. The candidates are dp.bin_edges (half at equal
counts, half at equal value spacing): E = bins + 2. Bins are too coarse for the fine
levels (2^8 parent ranges), so the DP covers levels seed..D only, D = the deepest level
with 4 * 2^D <= bins (D = 4 at the default 64 bins, 5 at 128), and the finer levels enter the DP through a
tail factor: a range at level D is charged (lambda_D + sum_{b > D} lambda_b 4^-(b-D))
times its SSE (a range split g more times keeps about 4^-g of its error). Then
`refine` moves the level seed..D borders at full resolution (exact coordinate descent on
J over the levels seed..D: red-black sweeps, each border to its best position between
its two neighbours; J never increases), and the levels below D are split greedily at
full resolution (split.py). `upscaling` keeps the better of this tree and the greedy
one on the exact objective over all levels, so the result is never worse than greedy.
Per row: (D - seed) E^3 + 2^seed E^2 min-plus steps, then 2 * sweeps * (K + 1) window
positions (one pass per half-sweep), each costing two range SSEs per level of its
border (1 level for odd borders, 2 for even ones at D = seed + 1): at the default 64
bins (seed 3) about 0.3M min-plus steps + the sweeps, at 128 bins 4.4M (levels 3-5 by
the DP; better 5-bit trees, ~15x the DP time). On CPU the sweeps were most of the time
(benchmarks/nesting_phases.py times each phase on any device). All jitted and vmapped
over rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax.quantize import dp
from anyprec_jax.quantize import rowops

DEFAULT_BINS = 64
DEFAULT_SWEEPS = 8
TAIL_DECAY = 0.25  # error kept per further split, for the levels below the DP


def dp_depth(seed_bits: int, parent_bits: int, bins: int) -> int:
  """Deepest level D the binned DP decides: 4 * 2^D <= bins, seed <= D <= parent."""
  d = int(np.floor(np.log2(max(bins, 1) / 4)))
  return int(min(parent_bits, max(seed_bits, d)))


def dp_weights(weights: tuple[float, ...], seed_bits: int, depth: int) -> tuple[float, ...]:
  """Level weights of the DP (seed..depth), the last one with the tail factor.

  Args:
    weights: lambda_b for b = seed..parent.
  """
  used = list(weights[:depth - seed_bits + 1])
  tail = weights[depth - seed_bits + 1:]
  used[-1] += sum(lam * TAIL_DECAY ** (g + 1) for g, lam in enumerate(tail))
  return tuple(float(v) for v in used)


def _split_min(t_next: jax.Array) -> tuple[jax.Array, jax.Array]:
  """min_t t_next[i, t] + t_next[t, j] and its first argmin t, for all i, j.

  Args:
    t_next: float32 [E, E] (inf below the diagonal).

  Returns:
    (best float32 [E, E], arg int32 [E, E]).
  """
  e = t_next.shape[0]

  def body(t, carry):
    best, arg = carry
    cand = t_next[:, t][:, None] + t_next[t, :][None, :]  # [E, E]
    better = cand < best
    return jnp.where(better, cand, best), jnp.where(better, t, arg)

  init = (jnp.full((e, e), jnp.inf, jnp.float32), jnp.zeros((e, e), jnp.int32))
  return jax.lax.fori_loop(0, e, body, init)


def nested_tree(cost: jax.Array, n_seed: int,
                weights: tuple[float, ...]) -> tuple[list[jax.Array], jax.Array]:
  """Optimal nested tree of ranges over E candidate borders.

  Args:
    cost: float32 [E, E] SSE of [edge i, edge j) (inf below the diagonal).
    n_seed: number of seed ranges 2^seed (static).
    weights: lambda of each level seed..D (static, >= 0).

  Returns:
    ([idx_seed int32 [n_seed + 1], ..., idx_D [n_seed 2^(D-seed) + 1]] edge indices
    of every level, children of range c being 2c and 2c + 1; the minimal J).
  """
  e = cost.shape[0]
  upper = jnp.arange(e)[None, :] >= jnp.arange(e)[:, None]

  def own(lam):
    return jnp.where(upper, lam * cost, jnp.inf)

  total = own(weights[-1])
  args = []
  for lam in reversed(weights[:-1]):
    best, arg = _split_min(total)
    args.append(arg)
    total = own(lam) + best
  idx, value = dp.partition(total, n_seed)
  levels = [idx]
  for arg in reversed(args):
    start, stop = idx[:-1], idx[1:]
    t = arg[start, stop]
    idx = jnp.concatenate([jnp.stack([start, t], axis=-1).reshape(-1), stop[-1:]])
    levels.append(idx)
  return levels, value


def sse_of_sums(sums: jax.Array) -> jax.Array:
  """Weighted SSE around the weighted mean from range sums [..., 4] (0 if no weight)."""
  w, s1, s2 = sums[..., rowops.S], sums[..., rowops.SX], sums[..., rowops.SXX]
  return jnp.where(w > 0, jnp.maximum(s2 - s1 * s1 / jnp.where(w > 0, w, 1.0), 0.0), 0.0)


def range_sse(row: rowops.SortedRow, start: jax.Array, stop: jax.Array) -> jax.Array:
  """Weighted SSE of x[start:stop] around its weighted mean (0 for empty ranges)."""
  return sse_of_sums(rowops.range_sums(row, start, stop))


def objective(row: rowops.SortedRow, borders: jax.Array, weights: tuple[float, ...],
              seed_bits: int) -> jax.Array:
  """J = sum_b lambda_b E_b of nested borders [2^D + 1], D = seed + len(weights) - 1."""
  depth = seed_bits + len(weights) - 1
  total = jnp.float32(0.0)
  for i, lam in enumerate(weights):
    edge = borders[::1 << (depth - seed_bits - i)]
    total = total + lam * jnp.sum(range_sse(row, edge[:-1], edge[1:]))
  return total


def _level_table(n_borders: int, depth_levels: int, parity: int):
  """Static tables of the borders of one parity that move together.

  Returns:
    (moving int [M]: border indices m = parity, parity + 2, ... in 1..C-1;
     step int [M, L + 1]: 2^(D - b) for the levels b where m is a border, else 0;
     used int [U]: the levels (columns of step) where some moving border is a border).
  """
  c = n_borders - 1
  moving = np.arange(2 - parity if parity == 0 else 1, c, 2)
  steps = np.array([[(1 << l) if m % (1 << l) == 0 and l <= depth_levels else 0
                     for l in range(depth_levels, -1, -1)] for m in moving], np.int32)
  steps = steps.reshape(len(moving), depth_levels + 1)
  return moving, steps, np.flatnonzero(steps.any(axis=0))


def _window_min_scatter(c: jax.Array, win: jax.Array, n_win: int):
  """(min, first argmin) of c over each window by two segment_min scatters.

  Args:
    c: float32 [Q] costs; win: int32 [Q] nondecreasing window of each position.

  Returns:
    (best float32 [M], inf for a window without positions; pos int32 [M]).
  """
  best = jax.ops.segment_min(c, win, num_segments=n_win)
  q = jnp.arange(c.shape[0], dtype=jnp.int32)
  pos = jax.ops.segment_min(jnp.where(c <= best[win], q, c.shape[0]), win,
                            num_segments=n_win)
  return best, pos


def _window_min_dense(c: jax.Array, win: jax.Array, n_win: int):
  """As `_window_min_scatter`, by a masked argmin over [M, Q] (no scatter).

  The optimization barrier asks XLA to materialise c rather than recompute it per
  window (XLA CPU was seen to fuse part of it into the reduction regardless).
  """
  c, win = jax.lax.optimization_barrier((c, win))
  ids = jnp.arange(n_win)
  pos = jnp.argmin(jnp.where(win[None, :] == ids[:, None], c[None, :], jnp.inf),
                   axis=1).astype(jnp.int32)  # [M]; 0 for a window without finite c
  return jnp.where(win[pos] == ids, c[pos], jnp.inf), pos


WINDOW_MIN = {"scatter": _window_min_scatter, "dense": _window_min_dense}


def default_window_min() -> str:
  """"scatter" on CPU (2x faster there); "dense" elsewhere.

  The accelerator choice is not measured yet: it avoids scatter-min, whose updates of
  one window go to one address; benchmarks/nesting_phases.py times both.
  """
  return "scatter" if jax.default_backend() == "cpu" else "dense"


def _by_window(table: jax.Array, win: jax.Array) -> jax.Array:
  """table[win] for a small table [M, ...] as M - 1 selects (dense, no gather).

  Args:
    table: [M, ...]; win: int32 [Q] in 0..M-1.

  Returns:
    [Q, ...].
  """
  out = jnp.broadcast_to(table[0], win.shape + table.shape[1:])
  for j in range(1, table.shape[0]):
    pick = (win >= j).reshape(win.shape + (1,) * (table.ndim - 1))
    out = jnp.where(pick, table[j], out)
  return out


def _half_sweep(row: rowops.SortedRow, bd: jax.Array, weights: tuple[float, ...],
                parity: int, window_min: str = "scatter") -> jax.Array:
  """Moves every border of one parity to its best position between its neighbours.

  The windows [bd[m - 1], bd[m + 1]] of the M moving borders tile 0..K (a shared end
  belongs to the lower window), so one pass over the K + 1 positions q evaluates every
  window: the prefix rows at q are row.pre itself, those of the fixed neighbours are
  gathered once per window ([M, U, 8]) and spread over the positions of their window
  by selects (`_by_window`); the window of q is a compare with the M window ends (no
  search); levels where no moving border lies are skipped. The first minimum of each
  window comes from `WINDOW_MIN[window_min]` (same result either way). A border moves
  only if that lowers its cost by more than a relative 1e-6.
  """
  k = row.x.shape[0]
  moving, steps, used = _level_table(bd.shape[0], len(weights) - 1, parity)
  if moving.size == 0:
    return bd
  n_win = moving.size
  st = steps[:, used]  # [M, U] static: levels where no moving border is one are left out
  on = st > 0
  lam = jnp.asarray([weights[u] for u in used], jnp.float32)  # [U]
  m = jnp.asarray(moving)
  left = bd[np.where(on, moving[:, None] - st, 0)]  # [M, U] fixed neighbours per level
  right = bd[np.where(on, moving[:, None] + st, 0)]
  pre_left, pre_right = row.pre[left], row.pre[right]  # [M, U, 8]
  lo, hi = bd[m - 1], bd[m + 1]  # [M] window of each moving border

  def cost(w_idx, pre_q, use):  # w_idx [Q], pre_q [Q, 8], use bool [Q, U] -> [Q]
    per = []
    for u in range(used.size):
      a = _by_window(pre_left[:, u], w_idx)  # [Q, 8]
      z = _by_window(pre_right[:, u], w_idx)
      per.append(sse_of_sums(rowops.sums_between(a, pre_q)) +
                 sse_of_sums(rowops.sums_between(pre_q, z)))
    # `use` is data-dependent (never constant-folded), so the select rounds every
    # lambda_b * SSE_b before the sum: XLA could otherwise fuse a product into the sum
    # (an FMA), change the last bit and so a border in a near-tie.
    return jnp.sum(jnp.where(use, jnp.stack(per, axis=-1) * lam, 0.0), axis=-1)

  q = jnp.arange(k + 1, dtype=jnp.int32)
  win = jnp.minimum(jnp.sum(hi[None, :] < q[:, None], axis=1), n_win - 1)  # [K + 1]
  valid = (_by_window(lo, win) <= q) & (q <= _by_window(hi, win))
  use = _by_window(jnp.asarray(on), win) & valid[:, None]  # [K + 1, U]
  c = jnp.where(valid, cost(win, row.pre, use), jnp.inf)  # [K + 1]
  best, pos = WINDOW_MIN[window_min](c, win, n_win)
  # The cost of staying is written (and so rounded by XLA, FMAs included) as in the
  # previous formulation: it decides near-ties at the 1e-6 threshold.
  here = bd[m]  # [M]
  stay = jnp.broadcast_to(here[:, None], left.shape)
  per = range_sse(row, left, stay) + range_sse(row, stay, right)  # [M, U]
  keep = jnp.asarray(on)[jnp.arange(n_win)]
  current = jnp.sum(jnp.where(keep, per * lam, 0.0), axis=-1)
  take = best < current * (1 - 1e-6)
  return bd.at[m].set(jnp.where(take, pos, here).astype(bd.dtype))


def refine(row: rowops.SortedRow, borders: jax.Array, weights: tuple[float, ...],
           sweeps: int = DEFAULT_SWEEPS, window_min: str | None = None) -> jax.Array:
  """Exact coordinate descent on J at full resolution (J never increases).

  Args:
    row: SortedRow; borders: int32 [2^D + 1] nested borders of level D.
    weights: lambda of the levels seed..D (static).
    sweeps: red-black sweeps (static).
    window_min: "scatter" or "dense" (static; None: `default_window_min()`); both give
      the same borders.

  Returns:
    int32 [2^D + 1] nested borders.
  """
  window_min = window_min or default_window_min()

  def body(_, bd):
    bd = _half_sweep(row, bd, weights, 1, window_min)
    return _half_sweep(row, bd, weights, 0, window_min)

  return jax.lax.fori_loop(0, sweeps, body, borders)


def optimal_borders(row: rowops.SortedRow, seed_bits: int, depth: int, bins: int,
                    weights: tuple[float, ...], sweeps: int = DEFAULT_SWEEPS) -> jax.Array:
  """Level-D borders of the binned nested DP, refined at full resolution.

  Args:
    row: SortedRow.
    seed_bits, depth: levels seed..D decided here (static).
    bins: DP bins (static).
    weights: lambda of the levels seed..D, tail factor included (static).
    sweeps: refinement sweeps (static).

  Returns:
    int32 [2^D + 1] borders; level b is borders[::2^(D - b)].
  """
  edges = dp.bin_edges(row.x, bins)  # [E]
  levels, _ = nested_tree(dp.range_costs(row.pre[edges]), 1 << seed_bits, weights)
  borders = edges[levels[-1]]
  assert depth == seed_bits + len(weights) - 1
  return refine(row, borders, weights, sweeps)
