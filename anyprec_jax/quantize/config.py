"""Configuration of the any-precision quantizer (Park et al., ICML 2024, arXiv 2402.10517).

Notation as in the paper: the *seed* precision is the bit width of the initial weighted
k-means (SqueezeLLM) quantization, the *parent* precision the widest model obtained by
incremental upscaling; every width b with seed <= b <= parent is a valid model.
"""

from __future__ import annotations

import dataclasses
import enum

from anyprec_jax import format as fmt

MIN_SEED_BITS = 2
MAX_PARENT_BITS = fmt.MAX_BITS
DEFAULT_DAMPING = 0.1  # fisher_damping of the ANYPREC method when not given


class Method(enum.Enum):
  """What `quantize_model` produces."""
  ANYPREC = "anyprec"          # seed k-means + incremental upscaling, one bitplane parent
  INDEPENDENT = "independent"  # our k-means (k-means++ and binned-DP starts) per width
  SQUEEZELLM = "squeezellm"    # the paper's baseline: one k-means++ start per width, no DP
  RTN = "rtn"                  # per-row uniform asymmetric round-to-nearest


class SplitMethod(enum.Enum):
  """How upscaling splits a cluster in two (quantize/split.py)."""
  OPTIMAL = "optimal"      # exact weighted 2-means of the range (default)
  BISECTION = "bisection"  # the original release's bisection for a Lloyd fixed point


class Nesting(enum.Enum):
  """Which nested tree of ranges upscaling builds (quantize/nesting.py)."""
  GREEDY = "greedy"    # the paper: best seed-bit k-means, then split each range
  OPTIMAL = "optimal"  # binned DP for sum_b lambda_b E_b, refined; the better of the two
  #                      (default from 2026-12-06: benchmarks/results/quality.md)


class LutDtype(enum.Enum):
  """Storage dtype of the lookup tables."""
  FLOAT16 = "float16"
  BFLOAT16 = "bfloat16"
  FLOAT32 = "float32"


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """Calibration data of the Fisher pass (defaults of the paper / original release).

  Attributes:
    dataset: "c4", "wikitext2" (hub names, need `datasets` and network) or a local
      .txt / .jsonl / .json / .parquet file.
    num_samples: number of calibration sequences (batch 1 each).
    seq_len: tokens per sequence.
    seed: seed of the document sampling.
  """
  dataset: str = "c4"
  num_samples: int = 100
  seq_len: int = 512
  seed: int = 0

  def __post_init__(self):
    if not self.dataset:
      raise ValueError("calibration dataset must not be empty")
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2 (causal LM loss), got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Bit settings and algorithm options, validated on construction.

  Attributes:
    seed_bits: width of the seed k-means (>= 2).
    parent_bits: width of the parent model (<= 8); seed_bits <= parent_bits.
    method: anyprec (default) or a baseline. SQUEEZELLM is the paper's (and the
      original release's) baseline: it fixes n_init = 1 and dp_bins = 0 (set in
      __post_init__, whatever was passed), i.e. one weighted k-means++ start and
      Lloyd until the borders stop moving, at most max_iter updates.
    seed: PRNG seed of the k-means++ initialisation (results are deterministic in it).
    max_iter: maximum Lloyd iterations of the k-means (the original uses 50).
    n_init: k-means++ starts per row; the best weighted objective is kept
      (1 = the original's single k-means++ run).
    dp_bins: bins of an extra binned dynamic-programming start of the seed k-means
      (quantize/dp.py; not in the original; 0 disables it, reproducing the original).
    split: how upscaling splits clusters (BISECTION reproduces the original).
    nesting: OPTIMAL (nested DP, not in the paper; the default) or GREEDY (the paper's
      upscaling).
    nesting_bins: bins of the OPTIMAL nesting's DP (even, >= 8).
    nesting_weights: lambda_b of the OPTIMAL nesting's objective sum_b lambda_b E_b,
      one per width seed..parent; () = 2^(b - seed) (1, 2, 4, ... : each finer width
      counts twice the one before, which keeps the fine widths in view although their
      errors are 4-5x smaller per bit).
    lut_dtype: storage dtype of the LUTs.
    fisher_damping: alpha >= 0; every method weights the squared error of W[n, k] by
      F[n, k] + alpha * mean_k F[n, :] instead of F (0: the plain diagonal Fisher, as
      the paper). Damping moves the weights towards a row-wise uniform (MSE) objective.
      None (the default): DEFAULT_DAMPING for the ANYPREC method, 0 for the baselines
      (SQUEEZELLM stays the paper's).
    The ANYPREC defaults (OPTIMAL, 2^(b - seed), damping 0.1) are the best of the
    measured settings on SmolLM2 over WikiText-2, PTB and held-out C4 (4 bits 2.5-5.5 %
    lower perplexity than the paper's GREEDY, 5-8 bits equal or lower, 3 bits mixed:
    benchmarks/results/quality.md, 2026-12-06); `nesting=GREEDY, fisher_damping=0`
    is the paper's quantizer.
  """
  seed_bits: int = 3
  parent_bits: int = 8
  method: Method = Method.ANYPREC
  seed: int = 0
  max_iter: int = 50
  n_init: int = 1
  dp_bins: int = 128
  split: SplitMethod = SplitMethod.OPTIMAL
  nesting: Nesting = Nesting.OPTIMAL
  nesting_bins: int = 64
  nesting_weights: tuple[float, ...] = ()
  lut_dtype: LutDtype = LutDtype.FLOAT16
  fisher_damping: float | None = None

  def __post_init__(self):
    for name in ("seed_bits", "parent_bits", "seed", "max_iter", "n_init", "dp_bins",
                 "nesting_bins"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if self.seed_bits < MIN_SEED_BITS:
      raise ValueError(
          f"seed_bits must be >= {MIN_SEED_BITS}, got {self.seed_bits}")
    if self.parent_bits > MAX_PARENT_BITS:
      raise ValueError(
          f"parent_bits must be <= {MAX_PARENT_BITS}, got {self.parent_bits}")
    if self.seed_bits > self.parent_bits:
      raise ValueError(f"seed_bits ({self.seed_bits}) must be <= parent_bits "
                       f"({self.parent_bits})")
    if not isinstance(self.method, Method):
      raise TypeError(f"method must be a Method, got {self.method!r}")
    if not isinstance(self.split, SplitMethod):
      raise TypeError(f"split must be a SplitMethod, got {self.split!r}")
    if not isinstance(self.nesting, Nesting):
      raise TypeError(f"nesting must be a Nesting, got {self.nesting!r}")
    if self.nesting_bins < 8 or self.nesting_bins % 2:
      raise ValueError(f"nesting_bins must be an even number >= 8, got {self.nesting_bins}")
    weights = tuple(float(v) for v in self.nesting_weights)
    object.__setattr__(self, "nesting_weights", weights)
    if weights and (len(weights) != len(self.bit_widths) or
                    not all(0 <= v < float("inf") for v in weights) or not any(weights)):
      raise ValueError(f"nesting_weights must be {len(self.bit_widths)} finite values >= 0 "
                       f"(one per width {self.seed_bits}..{self.parent_bits}), not all 0; "
                       f"got {self.nesting_weights!r}")
    damping = (float(self.fisher_damping) if self.fisher_damping is not None
               else DEFAULT_DAMPING if self.method is Method.ANYPREC else 0.0)
    if not 0 <= damping < float("inf"):
      raise ValueError(f"fisher_damping must be a finite value >= 0, got "
                       f"{self.fisher_damping!r}")
    object.__setattr__(self, "fisher_damping", damping)
    if not isinstance(self.lut_dtype, LutDtype):
      raise TypeError(f"lut_dtype must be a LutDtype, got {self.lut_dtype!r}")
    if self.method is Method.SQUEEZELLM:
      object.__setattr__(self, "n_init", 1)
      object.__setattr__(self, "dp_bins", 0)
    if self.max_iter < 1:
      raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
    if self.n_init < 1:
      raise ValueError(f"n_init must be >= 1, got {self.n_init}")
    if self.dp_bins < 0 or self.dp_bins % 2:
      raise ValueError(f"dp_bins must be an even number >= 0, got {self.dp_bins}")

  @property
  def level_weights(self) -> tuple[float, ...]:
    """lambda_b for b = seed..parent (the OPTIMAL nesting's objective)."""
    return self.nesting_weights or tuple(2.0 ** i for i in range(len(self.bit_widths)))

  @property
  def bit_widths(self) -> tuple[int, ...]:
    """Every precision the output supports: seed_bits..parent_bits."""
    return tuple(range(self.seed_bits, self.parent_bits + 1))
