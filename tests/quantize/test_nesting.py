"""Tests of the optimal nested quantizer (anyprec_jax/quantize/nesting.py) on tiny rows."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from anyprec_jax.quantize import dp, nesting, rowops, upscaling
from anyprec_jax.quantize.config import Nesting
from tests.quantize import reference as ref
from tests.quantize.test_kmeans import K, N, rows
from tests import slow

K_TINY = 7  # 3432 nested trees of 8 ranges: brute force is instant


def brute_force(x, s, n_ranges, weights):
  """min over every nested tree of sum_b lambda_b E_b, float64.

  A nested tree with empty ranges allowed is exactly a nondecreasing vector of the
  deepest level's borders; the coarser levels are every 2nd, 4th, ... border.
  """
  k = len(x)
  ps, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (s, s * x, s * x * x))

  def sse(a, b):
    w = ps[b] - ps[a]
    return np.where(w > 0, p2[b] - p2[a] - (p1[b] - p1[a]) ** 2 / np.where(w > 0, w, 1), 0)

  inner = np.array(list(itertools.combinations_with_replacement(range(k + 1), n_ranges - 1)))
  bd = np.concatenate([np.zeros((len(inner), 1), int), inner,
                       np.full((len(inner), 1), k)], axis=1)
  total = 0.0
  for i, lam in enumerate(weights):
    e = bd[:, ::1 << (len(weights) - 1 - i)]
    total = total + lam * sse(e[:, :-1], e[:, 1:]).sum(1)
  return float(total.min())


@jax.jit
def _dp_and_refined(x, s, weights):
  """(DP value over every position, J of the refined bin-edge borders) of one row."""
  weights = tuple(weights[i] for i in range(3))  # traced: one compilation for all cases
  row = rowops.sort_row(x, s)
  cost = dp.range_costs(row.pre[jnp.arange(K_TINY + 1)])  # every position an edge
  levels, value = nesting.nested_tree(cost, 2, weights)  # 2 seed ranges, 3 levels
  bd = nesting.optimal_borders(row, 1, 3, 16, weights)  # 16 bins >= 2K: every position
  return levels, value, nesting.objective(row, bd, weights, 1)


def half_sweep_reference(row, bd, weights, parity):
  """The previous `nesting._half_sweep`: searchsorted windows, per-level gathers of
  the prefix rows at every position, two segment_min scatters."""
  k = row.x.shape[0]
  moving, steps, _ = nesting._level_table(bd.shape[0], len(weights) - 1, parity)
  lam = jnp.asarray(weights, jnp.float32)
  m, st = jnp.asarray(moving), jnp.asarray(steps)
  on = st > 0
  left = bd[jnp.where(on, m[:, None] - st, 0)]
  right = bd[jnp.where(on, m[:, None] + st, 0)]
  lo, hi = bd[m - 1], bd[m + 1]

  def cost(w_idx, q):
    a, z = left[w_idx], right[w_idx]
    qq = jnp.broadcast_to(q[:, None], a.shape)
    per = nesting.range_sse(row, a, qq) + nesting.range_sse(row, qq, z)
    return jnp.sum(jnp.where(on[w_idx], per * lam, 0.0), axis=-1)

  q = jnp.arange(k + 1, dtype=jnp.int32)
  win = jnp.clip(jnp.searchsorted(hi, q, side="left"), 0, m.shape[0] - 1)
  valid = (lo[win] <= q) & (q <= hi[win])
  c = jnp.where(valid, cost(win, q), jnp.inf)
  best = jax.ops.segment_min(c, win, num_segments=m.shape[0])
  pos = jax.ops.segment_min(jnp.where(valid & (c <= best[win]), q, k + 1), win,
                            num_segments=m.shape[0])
  take = (best < cost(jnp.arange(m.shape[0]), bd[m]) * (1 - 1e-6)) & (pos <= k)
  return bd.at[m].set(jnp.where(take, pos, bd[m]).astype(bd.dtype))


@functools.partial(jax.jit, static_argnames=("weights",))
def _sweeps_three_ways(w, f, bd, weights):
  """Two sweeps of (reference, scatter, dense) half-sweeps of every row [N, K]."""
  def one(w_row, f_row, b):
    row = rowops.sort_row(w_row, rowops.sample_weights(w_row, f_row))
    out = []
    for fn in (lambda b, p: half_sweep_reference(row, b, weights, p),
               lambda b, p: nesting._half_sweep(row, b, weights, p, "scatter"),
               lambda b, p: nesting._half_sweep(row, b, weights, p, "dense")):
      trace = []
      bb = b
      for _ in range(2):
        for parity in (1, 0):
          bb = fn(bb, parity)
          trace.append(bb)
      out.append(jnp.stack(trace))
    return jnp.stack(out)  # [3, 4, C + 1]

  return jax.vmap(one)(w, f, bd)


def level_errors(w, f, res, seed, parent):
  return np.stack([ref.weighted_error(w, f, res.codes.astype(np.int64) >> (parent - b),
                                      res.luts[b]) for b in range(seed, parent + 1)])


class NestedDPTest(parameterized.TestCase):

  def test_dp_and_refined_borders_equal_brute_force(self):
    rng = np.random.default_rng(0)
    for weights in ((1.0, 1.0, 1.0), (0.3, 2.0, 0.7), (1.0, 0.0, 0.0)):
      for _ in range(2):
        x = np.sort(rng.standard_normal(K_TINY)).astype(np.float32)
        s = (rng.random(K_TINY) ** 3).astype(np.float32)  # spiky sensitivities
        best = brute_force(x.astype(np.float64), s.astype(np.float64), 8, weights)
        levels, value, refined = _dp_and_refined(x, s, jnp.float32(weights))
        self.assertAlmostEqual(float(value), best, delta=1e-4 * best + 1e-9)
        self.assertAlmostEqual(float(refined), best, delta=1e-4 * best + 1e-9)
        deepest = np.asarray(levels[-1])
        self.assertTrue(np.all(np.diff(deepest) >= 0))
        np.testing.assert_array_equal(np.asarray(levels[0]), deepest[::4])  # nested
        np.testing.assert_array_equal(np.asarray(levels[1]), deepest[::2])

  @parameterized.parameters(((0.5, 1.3),), ((1.0, 0.4, 2.0),))
  def test_half_sweep_equals_previous_formulation(self, weights):
    # Gaussian, heavy-tailed and tied rows (values on a coarse grid, so many equal
    # values and equal costs), zero weights; random nested borders with empty ranges.
    rng = np.random.default_rng(len(weights))
    w, f = rows(5)
    w[:4] = np.round(w[:4] * 4) / 4
    f[4:8, ::3] = 0.0
    w[8:10, ::2] = 0.0
    n_borders = 8 + 1
    inner = np.sort(rng.integers(0, K + 1, (N, n_borders - 2)), axis=1)
    inner[:6, 2:5] = inner[:6, 2:3]  # repeated borders: empty windows
    bd = np.concatenate([np.zeros((N, 1)), inner, np.full((N, 1), K)], 1).astype(np.int32)
    out = np.asarray(_sweeps_three_ways(w, f, bd, weights))
    self.assertGreater(np.sum(out[:, 0, -1] != bd), N)  # borders do move
    np.testing.assert_array_equal(out[:, 1], out[:, 0])  # scatter == previous
    np.testing.assert_array_equal(out[:, 2], out[:, 0])  # dense == previous

  @slow.slow("the optimal-nesting DP on a full layer")
  def test_optimal_nesting_beats_greedy_and_stays_nested(self):
    # Shapes and options of test_upscale's greedy run: one compilation in the suite.
    seed, parent = 3, 8
    w, f = rows(0)
    key = jax.random.key(0)
    greedy = upscaling.seed_and_upscale(w, f, seed, parent, key)
    opt = upscaling.seed_and_upscale(w, f, seed, parent, key, nesting=Nesting.OPTIMAL,
                                     nesting_bins=64)
    j_greedy = level_errors(w, f, greedy, seed, parent).sum(0)  # [N], lambda = 1
    j_opt = level_errors(w, f, opt, seed, parent).sum(0)
    np.testing.assert_array_less(j_opt, j_greedy * (1 + 1e-5))
    self.assertLess(j_opt.sum(), 0.995 * j_greedy.sum())  # 0.9% lower here
    order = np.argsort(w, axis=1, kind="stable")
    for b in range(seed, parent + 1):
      codes = opt.codes.astype(np.int64) >> (parent - b)  # the top b bits
      sorted_codes = np.take_along_axis(codes, order, 1)
      self.assertTrue(np.all(np.diff(sorted_codes, axis=1) >= 0), f"level {b}")
      means = ref.cluster_means(w, f, codes, 1 << b)
      used = ~np.isnan(means)
      np.testing.assert_allclose(opt.luts[b][used], means[used], rtol=2e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
