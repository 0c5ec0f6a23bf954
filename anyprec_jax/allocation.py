"""Per-layer bit allocation: fractional precisions from one any-precision parent.

Every width seed..parent of every module lives in the one parent (Park et al., ICML
2024), so nothing forces all modules to run at the same width. For a target average
precision B (e.g. 3.5 bits) this module chooses a width b_g for every *group* g of
modules (by default the weights the runtime runs as one product: a layer's q/k/v, o,
gate/up, down; `fusion_groups`) that minimises the Fisher-estimated loss increase

    sum_g E_g(b_g),   E_g(b) = sum_{m in g} sum_{n,k} F_m[n,k] (W_m[n,k] - W_m,b[n,k])^2

(F: the quantizer's diagonal Fisher; the second-order term of the loss, as in
SqueezeLLM / the paper's §3.1) subject to the bytes a decode step reads,

    sum_g bytes_g(b_g) <= budget(B) = U(floor B) + (B - floor B) (U(ceil B) - U(floor B)),

bytes_m(b) = b planes of N * 4 ceil(K/32) bytes + the b-bit LUT (N * 2^b * itemsize),
and U(b) = sum_m bytes_m(b), the bytes of the uniform b-bit model: the budget is the
straight line between the neighbouring integer widths, so B = 4 is exactly the 4-bit
model's footprint and the allocated 3.5-bit model reads no more than half-way between
3 and 4 bits.

This is a multiple-choice knapsack with <= 6 choices per group. `solve` is exact: a
dynamic program over the bytes in units of their greatest common divisor (all sizes
are integers), which for real models keeps the table small (SmolLM2-135M: ~0.5 M
units); if it would exceed `MAX_UNITS`, sizes are rounded *up* to budget / MAX_UNITS
(the budget still holds; the optimum is then within that resolution) and the result
says `exact=False`. One table serves every budget up to the largest, so more budget
never gives a larger objective.

Arrays in, arrays out: `Problem` (errors and bytes per group and width), `solve`,
`random_choice` (the equal-bytes baseline), and `Allocation` (the result, and its JSON
in config.json `anyprec.allocations`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Mapping, Sequence

import numpy as np

from anyprec_jax import format as fmt

MAX_UNITS = 1 << 20


class Method(enum.Enum):
  """How an allocation is chosen."""
  OPTIMAL = "optimal"  # exact knapsack on the Fisher-weighted errors (`solve`)
  RANDOM = "random"    # baseline: a random set of groups at ceil(B), the rest floor(B)


def module_bytes(out_features: int, in_features: int, bits: int,
                 lut_itemsize: int = 2) -> int:
  """Bytes a decode step reads for one module at `bits`: planes (checkpoint layout,
  N x ceil(K/32) words each) plus the `bits`-bit LUT (N x 2^bits values)."""
  planes = bits * out_features * fmt.num_words(in_features) * 4
  return planes + out_features * (1 << bits) * lut_itemsize


def fisher_errors(w: np.ndarray, f: np.ndarray, codes: np.ndarray,
                  luts: Mapping[int, np.ndarray], parent_bits: int) -> dict[int, float]:
  """E(b) = sum F (W - W_b)^2 of one module at every width in `luts`.

  Args:
    w: source weight [N, K]; f: its Fisher information [N, K].
    codes: parent codes [N, K] (ints < 2^parent_bits).
    luts: {b: [N, 2^b]} as stored (the served values).
    parent_bits: width of `codes`.

  Returns:
    {b: float} (float64 sums).
  """
  w = np.asarray(w, np.float64)
  f = np.asarray(f, np.float64)
  codes = np.asarray(codes, np.int64)
  out = {}
  for b, lut in sorted(luts.items()):
    q = np.take_along_axis(np.asarray(lut, np.float64), codes >> (parent_bits - b), axis=1)
    out[int(b)] = float(np.sum(f * np.square(w - q)))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """The candidates of an allocation.

  Attributes:
    groups: group names, G of them.
    members: {group: its module names}.
    widths: the widths b to choose from (ascending; seed..parent).
    errors: float64 [G, len(widths)], E_g(b) (None: unknown, e.g. random weights).
    nbytes: int64 [G, len(widths)], bytes_g(b).
    weights: int64 [G], number of weights of each group (for the average width).
  """
  groups: tuple[str, ...]
  members: Mapping[str, tuple[str, ...]]
  widths: tuple[int, ...]
  errors: np.ndarray | None
  nbytes: np.ndarray
  weights: np.ndarray

  def uniform_bytes(self, bits: int) -> int:
    """U(b): bytes of every group at width b."""
    return int(self.nbytes[:, self.widths.index(bits)].sum())

  def budget(self, target: float) -> int:
    """budget(B): U linear between the neighbouring integer widths (floored)."""
    check_target(target, self.widths[0], self.widths[-1])
    lo, hi = math.floor(target), math.ceil(target)
    u_lo, u_hi = self.uniform_bytes(lo), self.uniform_bytes(hi)
    return u_lo + math.floor((target - lo) * (u_hi - u_lo))


def check_target(target: float, seed_bits: int, parent_bits: int) -> float:
  """`target` as a float in seed..parent.

  Raises:
    errors.UsageError: below the seed or above the parent (says which).
  """
  from anyprec_jax import errors  # noqa: PLC0415 (keeps this module array-only)
  if target < seed_bits:
    raise errors.UsageError(f"precision {target} is below the seed ({seed_bits} bits): "
                            f"the checkpoint holds {seed_bits}..{parent_bits} bits")
  if target > parent_bits:
    raise errors.UsageError(f"precision {target} is above the parent ({parent_bits} "
                            f"bits): the checkpoint holds {seed_bits}..{parent_bits} bits")
  return float(target)


def make_problem(shapes: Mapping[str, tuple[int, int]], widths: Sequence[int],
                 groups: Mapping[str, str] | None = None,
                 errors: Mapping[str, Sequence[float]] | None = None,
                 lut_itemsize: int = 2) -> Problem:
  """Builds the `Problem` of a set of modules.

  Args:
    shapes: {module: (in_features K, out_features N)} (as `AnyPrecMeta.modules`).
    widths: the widths to choose from (seed..parent).
    groups: {module: group name}; modules of a group share one width. None: one
      group per module.
    errors: {module: [E(b) for b in widths]}; None: unknown (random allocations only).
    lut_itemsize: bytes per LUT value (2 for float16 / bfloat16).

  Returns:
    The problem, groups in first-seen order of `shapes`.
  """
  widths = tuple(int(b) for b in widths)
  groups = {m: m for m in shapes} if groups is None else dict(groups)
  members: dict[str, list[str]] = {}
  for m in shapes:
    members.setdefault(groups[m], []).append(m)
  names = tuple(members)
  nbytes = np.array([[sum(module_bytes(shapes[m][1], shapes[m][0], b, lut_itemsize)
                          for m in members[g]) for b in widths] for g in names], np.int64)
  weights = np.array([sum(shapes[m][0] * shapes[m][1] for m in members[g])
                      for g in names], np.int64)
  err = None
  if errors is not None:
    err = np.array([[sum(float(errors[m][i]) for m in members[g])
                     for i in range(len(widths))] for g in names], np.float64)
  return Problem(names, {g: tuple(v) for g, v in members.items()}, widths, err,
                 nbytes, weights)


def solve(errors: np.ndarray, nbytes: np.ndarray, budgets: Sequence[int],
          max_units: int = MAX_UNITS) -> tuple[list[np.ndarray], bool]:
  """Exact multiple-choice knapsack: argmin sum_g errors[g, c_g] s.t. sum_g
  nbytes[g, c_g] <= budget, for each budget.

  Args:
    errors: float [G, C]; nbytes: int [G, C] (> 0).
    budgets: byte budgets (each >= the cheapest choice of every group).
    max_units: largest DP table (entries per group); above it sizes are rounded up.

  Returns:
    ([choice indices int [G] per budget], exact): exact is False when sizes were
    rounded up to fit `max_units` (the budgets still hold).

  Raises:
    ValueError: a budget below the cheapest allocation.
  """
  errors = np.asarray(errors, np.float64)
  nbytes = np.asarray(nbytes, np.int64)
  g_count, c_count = errors.shape
  top = int(max(budgets))
  cheapest = int(nbytes.min(axis=1).sum())
  if min(budgets) < cheapest:
    raise ValueError(f"budget {min(budgets)} bytes is below the cheapest allocation "
                     f"({cheapest} bytes)")
  unit = int(np.gcd.reduce(nbytes.ravel()))
  exact = top // unit <= max_units
  if not exact:
    unit = -(-top // max_units)
  size = -(-nbytes // unit)  # [G, C] (exact division when `exact`)
  cap = top // unit
  best = np.zeros(cap + 1)  # [cap + 1] min error within c units, no group yet
  pick = np.zeros((g_count, cap + 1), np.int8)  # [G, cap + 1]
  for g in range(g_count):
    new = np.full(cap + 1, np.inf)
    for c in range(c_count):
      s = int(size[g, c])
      if s > cap:
        continue
      cand = best[:cap + 1 - s] + errors[g, c]
      better = cand < new[s:]
      new[s:][better] = cand[better]
      pick[g, s:][better] = c
    best = new
  out = []
  for budget in budgets:
    left = budget // unit
    if not np.isfinite(best[left]):
      raise ValueError(f"budget {budget} bytes fits no allocation at unit {unit} bytes")
    choice = np.empty(g_count, np.int64)
    for g in range(g_count - 1, -1, -1):
      choice[g] = pick[g, left]
      left -= int(size[g, choice[g]])
    out.append(choice)
  return out, exact


def random_choice(nbytes: np.ndarray, widths: Sequence[int], target: float, budget: int,
                  seed: int = 0) -> np.ndarray:
  """The equal-bytes baseline: every group at floor(B), then groups in a random order
  raised to ceil(B) while the budget allows.

  Returns:
    choice indices int [G] (into `widths`).
  """
  lo = widths.index(math.floor(target))
  hi = widths.index(math.ceil(target))
  choice = np.full(nbytes.shape[0], lo, np.int64)
  left = budget - int(nbytes[:, lo].sum())
  for g in np.random.default_rng(seed).permutation(nbytes.shape[0]):
    extra = int(nbytes[g, hi] - nbytes[g, lo])
    if extra <= left:
      choice[g] = hi
      left -= extra
  return choice


@dataclasses.dataclass(frozen=True)
class Allocation:
  """Per-module widths for one target average precision.

  Attributes:
    target: the asked-for average precision B.
    method: how it was chosen (`Method` value).
    bits: {module: width}; modules of a group share one width.
    nbytes: bytes a decode step reads from the quantized modules (<= budget).
    budget: budget(B) in bytes.
    average_bits: the weight-weighted mean width.
    objective: sum of the Fisher-weighted errors (None where unknown).
    exact: the knapsack was solved exactly (False: sizes rounded to the DP's unit).
  """
  target: float
  method: str
  bits: Mapping[str, int]
  nbytes: int
  budget: int
  average_bits: float
  objective: float | None = None
  exact: bool = True

  def to_json(self) -> dict:
    return {"target": self.target, "method": self.method, "bytes": self.nbytes,
            "budget_bytes": self.budget, "average_bits": self.average_bits,
            "objective": self.objective, "exact": self.exact, "bits": dict(self.bits)}

  @classmethod
  def from_json(cls, d: Mapping) -> "Allocation":
    """Inverse of `to_json` (KeyError / TypeError / ValueError on a malformed entry)."""
    return cls(target=float(d["target"]), method=str(d["method"]),
               bits={str(m): int(b) for m, b in d["bits"].items()},
               nbytes=int(d["bytes"]), budget=int(d["budget_bytes"]),
               average_bits=float(d["average_bits"]),
               objective=None if d.get("objective") is None else float(d["objective"]),
               exact=bool(d.get("exact", True)))


def _result(problem: Problem, target: float, method: Method, choice: np.ndarray,
            budget: int, exact: bool = True) -> Allocation:
  rows = np.arange(len(problem.groups))
  width = np.asarray(problem.widths)[choice]  # [G]
  objective = (None if problem.errors is None else
               float(problem.errors[rows, choice].sum()))
  bits = {m: int(width[i]) for i, g in enumerate(problem.groups)
          for m in problem.members[g]}
  avg = float((width * problem.weights).sum() / problem.weights.sum())
  return Allocation(target=float(target), method=method.value, bits=bits,
                    nbytes=int(problem.nbytes[rows, choice].sum()), budget=budget,
                    average_bits=avg, objective=objective, exact=exact)


def allocate(problem: Problem, targets: Sequence[float],
             method: Method = Method.OPTIMAL, seed: int = 0) -> list[Allocation]:
  """Allocations of `problem` for each target average precision.

  Args:
    problem: errors and bytes per group and width (`make_problem`).
    targets: average precisions in seed..parent (fractional or not).
    method: OPTIMAL (needs errors) or RANDOM (the baseline; `seed` picks the order).

  Returns:
    One `Allocation` per target, in the order given.

  Raises:
    errors.UsageError: a target below the seed or above the parent.
    ValueError: OPTIMAL without errors.
  """
  budgets = [problem.budget(t) for t in targets]
  if method is Method.RANDOM:
    return [_result(problem, t, method, random_choice(problem.nbytes, problem.widths, t,
                                                      b, seed), b)
            for t, b in zip(targets, budgets)]
  if problem.errors is None:
    raise ValueError("an optimal allocation needs the Fisher-weighted errors")
  if not targets:
    return []
  choices, exact = solve(problem.errors, problem.nbytes, budgets)
  return [_result(problem, t, method, c, b, exact)
          for t, c, b in zip(targets, choices, budgets)]


def default_targets(seed_bits: int, parent_bits: int) -> tuple[float, ...]:
  """Quarter-bit steps strictly between the seed and the parent (stored at
  quantization time; 3.25, 3.5, 3.75, 4.25, ... for 3..8)."""
  return tuple(b + q / 4 for b in range(seed_bits, parent_bits) for q in (1, 2, 3))


def fusion_groups(cfg, names: Sequence[str]) -> dict[str, str]:
  """{HF module name: group}: the params path of the weight the runtime runs it in
  (`models.params.fused_path`: a layer's q/k/v share one, gate/up share one).

  Args:
    cfg: `models.ModelConfig`; names: HF module names of its quantized linears.
  """
  import models  # noqa: PLC0415 (only this helper needs the model code)
  from models import params as models_params  # noqa: PLC0415
  abstract = models.decoder.abstract_params(cfg)
  return {m: models_params.fused_path(models_params.param_path(abstract, m))
          for m in names}
