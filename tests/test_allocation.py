"""Per-layer bit allocation (anyprec_jax/allocation.py): exactness, budget, monotonicity."""

from __future__ import annotations

import itertools
import math

import numpy as np
from absl.testing import absltest, parameterized

import models
from anyprec_jax import allocation, errors
from tests import synthetic_checkpoint as synth


def _brute_force(err: np.ndarray, nbytes: np.ndarray, budget: int) -> float:
  """min sum_g err[g, c_g] over every choice vector within the budget (numpy)."""
  g, c = err.shape
  combos = np.array(list(itertools.product(range(c), repeat=g)))  # [C^G, G]
  rows = np.arange(g)
  total = nbytes[rows, combos].sum(1)
  obj = err[rows, combos].sum(1)
  return float(obj[total <= budget].min())


def _tiny_problem(seed: int = 0) -> allocation.Problem:
  """The synthetic tiny Llama (2 layers, 8 fusion groups), random errors."""
  cfg = models.config_from_hf(synth.TINY_CONFIG)
  shapes = {m: tuple(models.get_param(models.decoder.abstract_params(cfg), m).shape[::-1])
            for m in synth.linear_names()}
  return allocation.make_problem(shapes, range(synth.SEED_BITS, synth.PARENT_BITS + 1),
                                 allocation.fusion_groups(cfg, list(shapes)),
                                 synth.fisher_errors(seed))


class SolveTest(parameterized.TestCase):

  @parameterized.parameters(range(6))
  def test_equals_brute_force_on_random_problems(self, seed):
    rng = np.random.default_rng(seed)
    g, c = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    err = rng.random((g, c))  # any errors, not only monotone ones
    nbytes = rng.integers(1, 40, (g, c))
    budgets = [int(nbytes.min(1).sum() + extra) for extra in (0, 7, 25, 200)]
    choices, exact = allocation.solve(err, nbytes, budgets)
    self.assertTrue(exact)
    for budget, choice in zip(budgets, choices):
      self.assertLessEqual(nbytes[np.arange(g), choice].sum(), budget)
      self.assertAlmostEqual(err[np.arange(g), choice].sum(),
                             _brute_force(err, nbytes, budget), places=12)

  def test_rounded_units_keep_the_budget(self):
    rng = np.random.default_rng(7)
    err = np.sort(rng.random((5, 4)), 1)[:, ::-1]
    nbytes = np.sort(rng.integers(1000, 5000, (5, 4)), 1) * 7 + 1  # gcd 1
    budget = int(nbytes[:, 1].sum())
    (coarse,), exact = allocation.solve(err, nbytes, [budget], max_units=300)
    self.assertFalse(exact)
    self.assertLessEqual(nbytes[np.arange(5), coarse].sum(), budget)
    self.assertLessEqual(err[np.arange(5), coarse].sum(),
                         err[:, 1].sum() + 1e-12)  # no worse than the uniform choice

  def test_budget_below_the_cheapest_is_refused(self):
    with self.assertRaisesRegex(ValueError, r"below the cheapest allocation \(6 bytes\)"):
      allocation.solve(np.ones((2, 2)), np.array([[3, 4], [3, 5]]), [5])


class AllocateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.problem = _tiny_problem()

  def test_tiny_model_equals_brute_force(self):
    """8 groups x 6 widths (1.7 M allocations), every target of a sweep."""
    p = self.problem
    self.assertLen(p.groups, 8)  # q/k/v, o, gate/up, down per layer
    targets = [3.1, 3.5, 4.25, 6.9]
    for a in allocation.allocate(p, targets):
      self.assertAlmostEqual(a.objective, _brute_force(p.errors, p.nbytes, a.budget),
                             places=12)

  def test_budget_met_and_monotone(self):
    p = self.problem
    targets = np.linspace(3, 8, 41).tolist()
    allocs = allocation.allocate(p, targets)
    objectives = [a.objective for a in allocs]
    for a in allocs:
      self.assertLessEqual(a.nbytes, a.budget)
      self.assertTrue(a.exact)
    self.assertTrue(all(x >= y for x, y in zip(objectives, objectives[1:])), objectives)
    self.assertLess(objectives[-1], objectives[0])
    for b in range(3, 9):  # integer budgets: exactly the uniform bytes; never worse
      a = allocs[targets.index(float(b))]
      self.assertEqual(a.budget, p.uniform_bytes(b))
      self.assertLessEqual(a.objective, p.errors[:, b - 3].sum() + 1e-15)
    self.assertEqual(set(allocs[0].bits.values()), {3})
    self.assertEqual(set(allocs[-1].bits.values()), {8})

  def test_groups_share_widths_and_budget_interpolates(self):
    p = self.problem
    a = allocation.allocate(p, [3.5])[0]
    for i in range(2):
      attn = {a.bits[f"model.layers.{i}.self_attn.{x}_proj"] for x in "qkv"}
      mlp = {a.bits[f"model.layers.{i}.mlp.{x}_proj"] for x in ("gate", "up")}
      self.assertLen(attn, 1)
      self.assertLen(mlp, 1)
    self.assertEqual(a.budget, (p.uniform_bytes(3) + p.uniform_bytes(4)) // 2)
    self.assertEqual(allocation.Allocation.from_json(a.to_json()), a)

  def test_random_baseline(self):
    p = self.problem
    for t in (3.25, 3.5, 4.75):
      a = allocation.allocate(p, [t], allocation.Method.RANDOM, seed=3)[0]
      self.assertLessEqual(a.nbytes, a.budget)
      self.assertContainsSubset(set(a.bits.values()), {math.floor(t), math.ceil(t)})
      self.assertGreaterEqual(a.objective, allocation.allocate(p, [t])[0].objective)

  def test_targets_outside_seed_and_parent(self):
    with self.assertRaisesRegex(errors.UsageError, r"precision 2\.5 is below the seed "
                                r"\(3 bits\): the checkpoint holds 3\.\.8 bits"):
      allocation.allocate(self.problem, [2.5])
    with self.assertRaisesRegex(errors.UsageError, r"precision 8\.25 is above the parent "
                                r"\(8 bits\)"):
      allocation.allocate(self.problem, [8.25])
    bare = allocation.make_problem({"m": (64, 8)}, range(3, 9))
    with self.assertRaisesRegex(ValueError, "needs the Fisher-weighted errors"):
      allocation.allocate(bare, [3.5])

  def test_errors_and_bytes_of_a_module(self):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (4, 40))
    luts = {b: rng.normal(size=(4, 1 << b)) for b in (3, 8)}
    w = np.take_along_axis(luts[8], codes, 1)
    f = rng.random((4, 40))
    e = allocation.fisher_errors(w, f, codes, luts, 8)
    self.assertEqual(e[8], 0.0)
    q3 = np.take_along_axis(luts[3], codes >> 5, 1)
    self.assertAlmostEqual(e[3], float(np.sum(f * (w - q3) ** 2)))
    # 40 columns = 2 words per row and plane; 4 rows; LUT 4 x 8 float16.
    self.assertEqual(allocation.module_bytes(4, 40, 3), 3 * 4 * 2 * 4 + 4 * 8 * 2)


if __name__ == "__main__":
  absltest.main()
