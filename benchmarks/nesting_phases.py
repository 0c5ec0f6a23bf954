"""Time of each phase of the optimal nesting (quantize/nesting.py) on any device.

  PYTHONPATH=. python3 benchmarks/nesting_phases.py --rows=256 --k=4096      # CPU
  PYTHONPATH=. python3 benchmarks/nesting_phases.py --rows=4096 --k=4096    # GPU chunk

Random rows (Gaussian weights, |N(0,1)|^3 Fisher, as quantize/bench.py). Each phase is
its own jitted function of the previous phases' outputs, vmapped over the rows, timed
after a warm-up call (block_until_ready), the minimum of --repeats calls. `optimal_row`
is the whole `upscaling.optimal_nesting_row` (what Nesting.OPTIMAL adds to greedy),
with the refinement's default window minimum (nesting.default_window_min: "scatter"
on CPU, "dense" elsewhere); `refine` is timed with each method. The phases need not
sum to the total exactly (XLA fuses across them there); --sweeps applies to the
`refine` phases only. With --check (default) the previous refinement (searchsorted
windows, per-level gathers, segment_min; tests/quantize/test_nesting.py) is timed too
and every method's borders are compared with its borders on this device (--nocheck
for a checkout without that test). Prints one JSON object per line.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from anyprec_jax.quantize import bench, dp, kmeans, nesting, rowops, upscaling
from anyprec_jax.quantize.config import SplitMethod

_ROWS = flags.DEFINE_integer("rows", 256, "Rows timed.")
_K = flags.DEFINE_integer("k", 4096, "Row length.")
_SEED = flags.DEFINE_integer("seed_bits", 3, "Seed width.")
_PARENT = flags.DEFINE_integer("parent_bits", 8, "Parent width.")
_BINS = flags.DEFINE_integer("bins", nesting.DEFAULT_BINS, "Bins of the nesting DP.")
_SWEEPS = flags.DEFINE_integer("sweeps", nesting.DEFAULT_SWEEPS, "Refinement sweeps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per phase (minimum kept).")
_CHECK = flags.DEFINE_boolean(
    "check", True, "Also time the previous refinement (tests/quantize/test_nesting.py's "
    "half_sweep_reference) and count rows whose refined borders differ from it.")


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compiles
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  seed, parent, bins, sweeps = _SEED.value, _PARENT.value, _BINS.value, _SWEEPS.value
  depth = nesting.dp_depth(seed, parent, bins)
  lams = (1.0,) * (parent - seed + 1)
  dp_lams = nesting.dp_weights(lams, seed, depth)
  split = SplitMethod.OPTIMAL
  print(json.dumps({"date": datetime.date.today().isoformat(), "jax": jax.__version__,
                    "device": str(jax.devices()[0].device_kind),
                    "python": platform.python_version(), "argv": sys.argv[1:],
                    "rows": _ROWS.value, "k": _K.value, "seed": seed, "parent": parent,
                    "bins": bins, "depth": depth, "sweeps": sweeps}), flush=True)
  w, f = bench.random_matrix(jax.random.key(0), _ROWS.value, _K.value)
  vmap = lambda fn: jax.jit(jax.vmap(fn))  # noqa: E731

  sort = vmap(lambda a, b: rowops.sort_row(a, rowops.sample_weights(a, b)))

  def greedy_fn(row, key):
    borders, lut = kmeans.seed_sorted_row(row, 1 << seed, key, 50, 1, dp.DEFAULT_BINS)
    return upscaling.upscale_sorted_row(row, borders, parent - seed, split), lut

  greedy = vmap(greedy_fn)
  edges_fn = vmap(lambda row: dp.bin_edges(row.x, bins))
  cost_fn = vmap(lambda row, e: dp.range_costs(row.pre[e]))
  tree_fn = vmap(lambda c: nesting.nested_tree(c, 1 << seed, dp_lams)[0][-1])
  methods = getattr(nesting, "WINDOW_MIN", None) or {None: None}  # older code: one method
  refine_fns = {wm: vmap(lambda row, e, lv, wm=wm: nesting.refine(
      row, e[lv], dp_lams, sweeps, **({"window_min": wm} if wm else {})))
                for wm in methods}
  below_fn = vmap(lambda row, bd: upscaling.upscale_sorted_row(row, bd, parent - depth, split))
  objective_fn = vmap(lambda row, a, b: (nesting.objective(row, a, lams, seed),
                                         nesting.objective(row, b, lams, seed)))
  optimal_fn = vmap(lambda row, g, lut: upscaling.optimal_nesting_row(
      row, g, lut, seed, parent, split, bins, lams))

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
      jnp.arange(_ROWS.value))
  rows = sort(w, f)
  g_borders, g_lut = greedy(rows, keys)
  edges = edges_fn(rows)
  costs = cost_fn(rows, edges)
  levels = tree_fn(costs)
  coarse = vmap(lambda row, e, lv: nesting.refine(row, e[lv], dp_lams, sweeps))(
      rows, edges, levels)
  tree = below_fn(rows, coarse)
  phases = {
      "sort_row (shared with greedy)": (sort, w, f),
      "greedy seed + upscale (reference)": (greedy, rows, keys),
      "bin_edges": (edges_fn, rows),
      "range_costs": (cost_fn, rows, edges),
      "nested_tree (split_min + partition)": (tree_fn, costs),
      **{f"refine ({wm or 'one method'})": (fn, rows, edges, levels)
         for wm, fn in refine_fns.items()},
      "split below D": (below_fn, rows, coarse),
      "objective x2": (objective_fn, rows, tree, g_borders),
      "optimal_row (total)": (optimal_fn, rows, g_borders, g_lut),
  }
  if _CHECK.value:
    from tests.quantize.test_nesting import half_sweep_reference

    def previous(row, e, lv):
      body = lambda _, bd: half_sweep_reference(  # noqa: E731
          row, half_sweep_reference(row, bd, dp_lams, 1), dp_lams, 0)
      return jax.lax.fori_loop(0, sweeps, body, e[lv])

    phases["refine (previous formulation)"] = (vmap(previous), rows, edges, levels)
    want = phases["refine (previous formulation)"][0](rows, edges, levels)
    for wm, fn in refine_fns.items():
      differ = jnp.sum(jnp.any(fn(rows, edges, levels) != want, axis=-1))
      print(json.dumps({"check": f"refine ({wm or 'one method'}) vs previous formulation",
                        "rows_with_other_borders": int(differ)}), flush=True)
  for name, (fn, *args) in phases.items():
    s = _time(fn, *args)
    print(json.dumps({"phase": name, "seconds": round(s, 4),
                      "ms_per_row": round(1e3 * s / _ROWS.value, 4)}), flush=True)


if __name__ == "__main__":
  app.run(main)
