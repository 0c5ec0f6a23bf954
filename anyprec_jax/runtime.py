"""The any-precision model a user runs (Park et al., ICML 2024, arXiv 2402.10517).

One checkpoint holds an 8-bit parent as bitplanes; the top b planes plus the b-bit LUT
give the b-bit model for every b in seed..parent. `AnyPrecisionForCausalLM` loads the
precisions asked for (reading only the planes and LUTs they need), and runs the
shared decoder of `models/` with `AnyPrecWeight` linears, which reach the kernels
through `anyprec_jax.ops.linear` (GEMV for decode, dequantise + matmul for prefill).

Precision is static pytree metadata (`AnyPrecWeight.bits`): the params tree at
precision b has its own treedef, so each jitted function (forward, prefill, the decode
loop, perplexity) compiles one program per precision on first use and caches it;
switching precision costs nothing after that.

A fractional precision (3.5) runs each module at its own width, chosen by the
checkpoint's allocation for that average (`anyprec_jax.allocation`: per fusion group,
so q/k/v and gate/up stay one launch each); it is just another params tree (one
program per allocation), and loading reads each module's planes and LUTs only up to
the widths it runs at.

    model = AnyPrecisionForCausalLM.from_quantized("out/smollm2-anyprec", precisions=[3, 4])
    logits = model.forward(ids, precision=3)          # [B, T, V]
    tokens = model.generate(ids, precision=4, max_new_tokens=32).tokens
    # Self-speculative (3 and 8 loaded): 3-bit drafts, verified at 8 bits.
    tokens = model.generate(ids, precision=8, draft_precision=3, num_draft=4,
                            max_new_tokens=32).tokens
"""

from __future__ import annotations

import functools
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp

import models
from models import params as models_params
from anyprec_jax import allocation as allocation_lib
from anyprec_jax import checkpoint_reader as reader
from anyprec_jax import errors, evaluation
from anyprec_jax import weight as weight_lib
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax.weight import AnyPrecWeight, set_precision, set_widths


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(cfg: models.ModelConfig, params, input_ids, attention_mask):
  return models.forward(cfg, params, input_ids, attention_mask)


def default_dtype():
  """Activation dtype of `from_quantized` and `scripts/generate.py` when none is given:
  bfloat16 on accelerators (the kernels' operand precision), float32 on CPU (where
  bfloat16 arithmetic is emulated and slower)."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def default_layout() -> PlaneLayout:
  """TC_TILED where the Mosaic GPU kernels run (weights with N % 16 != 0 get TC), FORMAT
  elsewhere."""
  from anyprec_jax.pallas import backend  # Local: no Pallas import on plain use.
  return PlaneLayout.TC_TILED if backend.mosaic_available() else PlaneLayout.FORMAT


def fuse_projections(params, mlp: bool = True):
  """`params` with each layer's any-precision q/k/v weights (and gate/up with `mlp`)
  stored as one (`models.params.fuse_projections`): one kernel launch instead of
  three (two). gate/up too by default: on the H200 one 22016-row GEMV took 18.9 /
  29.2 / 47.7 us GPU time at 3 / 4 / 8 bits against 2 x 11.3 / 16.3 / 26.0 for the
  two 11008-row ones (kernels_tc.md step 10)."""
  return models_params.fuse_projections(params, weight_lib.concat_rows, mlp=mlp)


def with_plane_layout(tree, layout):
  """`tree` with every `AnyPrecWeight`'s planes re-ordered into `layout`."""
  layout = PlaneLayout(layout)
  return jax.tree_util.tree_map(
      lambda x: x.with_layout(layout) if isinstance(x, AnyPrecWeight) else x,
      tree, is_leaf=lambda x: isinstance(x, AnyPrecWeight))


def widths_by_path(params, module_bits: dict[str, int], paths: dict[str, str],
                   target=None) -> dict[str, int]:
  """An allocation's {module: width} as {params path: width} for `params` (fused
  q/k/v and gate/up take the width of their parts).

  Args:
    params: the params tree the widths are for (fused or not).
    module_bits: {HF module name: width}.
    paths: {HF module name: its path in the unfused tree}.
    target: the allocation's precision (for the error message).

  Raises:
    errors.UsageError: the parts of a fused weight have different widths (load with
      fuse=False to run such an allocation).
  """
  present = set(weight_lib.weight_paths(params))
  out: dict[str, int] = {}
  for module, bits in module_bits.items():
    path = paths[module]
    if path not in present:
      path = models_params.fused_path(path)
    if out.setdefault(path, bits) != bits:
      raise errors.UsageError(
          f"precision {target}: the allocation gives the parts of the fused weight "
          f"{path} different widths; load with fuse=False to run it")
  return out


class AnyPrecisionForCausalLM:
  """A causal LM whose quantized linears can run at any loaded precision.

  Attributes:
    cfg: the model config (`models.ModelConfig`).
    supported_precisions: sorted precisions held in memory (ints: every module at
      that width; floats: a per-module allocation of that average).
    precision: the default precision of `forward` / `generate`.
    allocations: {fractional precision: `allocation.Allocation`} where known.
    model_dir: the checkpoint directory (tokenizer files live there), or None.
  """

  def __init__(self, cfg: models.ModelConfig, params, *, model_dir=None,
               precision: int | float | None = None,
               widths: dict[float, dict[str, int]] | None = None,
               allocations: dict[float, allocation_lib.Allocation] | None = None,
               precisions=None):
    """Wraps a params tree holding `AnyPrecWeight`s.

    Args:
      cfg: model config.
      params: params tree; the widths loaded in every `AnyPrecWeight` are the
        integer precisions.
      model_dir: directory with tokenizer files (optional).
      precision: default precision; None: the highest supported.
      widths: {fractional precision: {params path: width}} (`widths_by_path`).
      allocations: the `Allocation`s behind `widths` (for inspection).
      precisions: the supported precisions; None: every width all weights hold,
        plus the keys of `widths`.
    """
    weights = [x for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, AnyPrecWeight))
               if isinstance(x, AnyPrecWeight)]
    if not weights:
      raise ValueError("params hold no AnyPrecWeight")
    ints = set.intersection(*(set(w.precisions) for w in weights))
    self._widths = {weight_lib.as_precision(p): dict(v) for p, v in (widths or {}).items()}
    for p, v in self._widths.items():
      set_widths(params, v)  # every weight has a loaded width (raises otherwise)
    if not ints and not self._widths:
      raise ValueError("quantized weights share no precision: "
                       f"{sorted({w.precisions for w in weights})}")
    self.cfg = cfg
    self.model_dir = None if model_dir is None else pathlib.Path(model_dir)
    runnable = ints | set(self._widths)
    self.supported_precisions: tuple[int | float, ...] = (
        tuple(sorted(runnable)) if precisions is None
        else weight_lib.as_precisions(precisions))
    missing = set(self.supported_precisions) - runnable
    if missing:
      raise ValueError(f"precisions {sorted(missing)} are not loaded in every weight")
    self.allocations = dict(allocations or {})
    self._base = params
    self._at: dict[int | float, object] = {}
    self._tokenizer = None
    self.precision = self._check(max(self.supported_precisions)
                                 if precision is None else precision)

  @classmethod
  def from_quantized(cls, path, precisions: Iterable[int] | int | None = None,
                     dtype=None, layout=None, fuse: bool = True,
                     allocation: allocation_lib.Method = allocation_lib.Method.OPTIMAL
                     ) -> "AnyPrecisionForCausalLM":
    """Loads an any-precision checkpoint directory (or hub id).

    Args:
      path: directory written by `scripts/quantize.py --method=anyprec`, or hub id.
      precisions: precisions to load: ints in seed..parent, and/or fractional
        averages strictly between them (3.5: each fusion group at its own width, the
        checkpoint's allocation, `anyprec.allocations`, or one computed from its
        `anyprec.fisher_errors`); None: every integer width. Each module reads only
        `planes[:w]` and the LUTs of the widths it runs at (w: the largest).
      dtype: dtype of the unquantized tensors and of the activations; None:
        `default_dtype()` (bfloat16 on GPU, float32 on CPU), the same default as
        `scripts/generate.py`. LUTs keep their stored dtype.
      layout: in-memory bit order of the planes (`PlaneLayout` or its value); None
        picks TC where the Mosaic GPU kernels run (Hopper), FORMAT elsewhere. The
        checkpoint stores FORMAT; TC is one re-ordering on the device at load.
      fuse: store each layer's q/k/v weights as one, and its gate/up weights as one
        (`fuse_projections`; one GEMV launch instead of three / two at decode, the
        same bytes).
      allocation: how fractional precisions pick widths: `Method.OPTIMAL` (the
        Fisher-weighted knapsack) or `Method.RANDOM` (the equal-bytes baseline).

    Returns:
      The model, active at max(precisions).

    Raises:
      errors.UsageError: `precisions` not a number / iterable of numbers, outside the
        checkpoint's range (lists the supported; a fractional one below the seed or
        above the parent says so), or fractional with no allocation to be had.
      QuantizedCheckpointError: not a valid any-precision checkpoint (names the file).
    """
    dtype = default_dtype() if dtype is None else dtype
    model_dir = models.resolve_model_dir(path)
    config = reader.read_config(model_dir)
    meta = reader.parse_meta(config, model_dir)
    want = reader.check_precisions(meta, precisions)
    cfg = models.hf_loader.parse_config(config, model_dir)
    method = allocation_lib.Method(allocation)
    allocs = {p: reader.allocation_for(meta, cfg, p, method, model_dir)
              for p in want if weight_lib.is_fractional(p)}
    ints = {p for p in want if not weight_lib.is_fractional(p)}
    loaded = {m: tuple(sorted(ints | {a.bits[m] for a in allocs.values()}))
              for m in meta.modules}
    params = reader.load_quantized_params(model_dir, cfg, meta, loaded, dtype)
    paths = {m: models_params.param_path(params, m) for m in meta.modules}
    params = with_plane_layout(params, default_layout() if layout is None else layout)
    if fuse:
      params = fuse_projections(params)
    widths = {p: widths_by_path(params, a.bits, paths, p) for p, a in allocs.items()}
    return cls(cfg, params, model_dir=model_dir, widths=widths, allocations=allocs,
               precisions=want)

  def _check(self, precision) -> int | float:
    b = reader.as_precision(precision)
    if b not in self.supported_precisions:
      raise errors.UsageError(f"precision {b} not supported; supported: "
                              f"{list(self.supported_precisions)}")
    return b

  def set_precision(self, precision: int | float) -> None:
    """Sets the default precision of `forward` / `generate` / `nll_fn`."""
    self.precision = self._check(precision)

  def params_at(self, precision: int | float | None = None):
    """The params tree with every quantized weight active at `precision` (shared
    arrays): one width for all, or each at its allocated width (fractional)."""
    b = self.precision if precision is None else self._check(precision)
    if b not in self._at:
      self._at[b] = (set_widths(self._base, self._widths[b]) if b in self._widths
                     else set_precision(self._base, b))
    return self._at[b]

  def forward(self, input_ids, precision: int | float | None = None, attention_mask=None):
    """Full-sequence logits (no cache).

    Args:
      input_ids: [B, T] int.
      precision: bits to run at; None: `self.precision`.
      attention_mask: [B, T], 1 = real token; None: all real.

    Returns:
      logits [B, T, V] float32.
    """
    ids = jnp.asarray(input_ids)
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(
        attention_mask)
    return _forward(self.cfg, self.params_at(precision), ids, mask)

  def generate(self, input_ids, precision: int | float | None = None, attention_mask=None, *,
               max_new_tokens: int, sampling: models.SamplingConfig | None = None,
               rng=None, eos_token_id=None, pad_token_id: int | None = None,
               draft_precision: int | float | None = None, num_draft: int | None = None
               ) -> models.GenerationResult:
    """Generates with the foundation's jitted prefill + on-device decode loop.

    With `draft_precision`, decoding is self-speculative (`models.speculative`): the
    same weights at `draft_precision` propose `num_draft` tokens per round and the
    model at `precision` verifies them in one forward. Greedy output is token for
    token that of plain decoding at `precision`; sampling keeps its distribution.

    Args:
      input_ids: [B, T] prompt ids.
      precision: bits; None: `self.precision`.
      attention_mask, max_new_tokens, rng, eos_token_id, pad_token_id: as
        `models.generate`.
      sampling: `models.SamplingConfig`; None: greedy.
      draft_precision: bits of the draft (a loaded precision below `precision`);
        None: plain decoding.
      num_draft: draft tokens per round, 1..7 (with `draft_precision` only); None:
        `models.speculative.DEFAULT_NUM_DRAFT`.

    Returns:
      GenerationResult(tokens [B, max_new_tokens], lengths [B]).
    """
    kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if draft_precision is not None:
      return self.timed_speculative_generate(
          input_ids, precision, attention_mask, draft_precision=draft_precision,
          num_draft=num_draft, **kwargs)[0]
    return self.timed_generate(input_ids, precision, attention_mask, **kwargs)[0]

  def timed_speculative_generate(
      self, input_ids, precision: int | float | None = None, attention_mask=None, *,
      draft_precision: int | float, num_draft: int | None = None, **kwargs
  ) -> tuple[models.GenerationResult, models.Timing, "speculative.SpeculativeStats"]:
    """Self-speculative `generate` plus wall times and acceptance counts.

    Args:
      input_ids, precision, attention_mask: as `generate`.
      draft_precision: a loaded precision below `precision`.
      num_draft: draft tokens per round, 1..7; None: `speculative.DEFAULT_NUM_DRAFT`.
      **kwargs: max_new_tokens, sampling, rng, eos_token_id, pad_token_id.

    Returns:
      (GenerationResult, models.Timing, speculative.SpeculativeStats).

    Raises:
      ValueError: draft_precision not loaded or not below precision; num_draft
        outside 1..7.
    """
    from models import speculative  # Local: models imports this package first.
    target, draft, num_draft = self.check_draft(precision, draft_precision, num_draft)
    if kwargs.get("sampling") is None:
      kwargs["sampling"] = models.SamplingConfig()
    return speculative.timed_generate(self.cfg, self.params_at(target),
                                      self.params_at(draft), input_ids, attention_mask,
                                      num_draft=num_draft, **kwargs)

  def timed_generate(self, input_ids, precision: int | float | None = None, attention_mask=None,
                     **kwargs) -> tuple[models.GenerationResult, models.Timing]:
    """`generate` plus prefill / decode wall times (see `models.timed_generate`)."""
    if kwargs.get("sampling") is None:
      kwargs["sampling"] = models.SamplingConfig()
    return models.timed_generate(self.cfg, self.params_at(precision), input_ids,
                                 attention_mask, **kwargs)

  def check_draft(self, precision: int | float | None, draft_precision: int | float,
                  num_draft: int | None = None) -> tuple[int, int, int]:
    """(target, draft, k) of a speculative call, checked.

    Raises:
      ValueError: a precision not loaded; draft_precision not below the target;
        num_draft outside 1..7.
    """
    from models import speculative  # Local: models imports this package first.
    target = self.precision if precision is None else self._check(precision)
    draft = self._check(draft_precision)
    if draft >= target:
      raise ValueError(f"draft_precision ({draft}) must be below the target "
                       f"precision ({target})")
    k = speculative.check_num_draft(
        speculative.DEFAULT_NUM_DRAFT if num_draft is None else num_draft)
    return target, draft, k

  def nll_fn(self, precision: int | float | None = None):
    """input_ids [B, T] -> [B] mean next-token NLL at `precision` (for perplexity)."""
    return evaluation.dense_nll_fn(self.cfg, self.params_at(precision))

  @property
  def tokenizer(self):
    """The checkpoint's Hugging Face tokenizer (loaded on first use)."""
    if self._tokenizer is None:
      if self.model_dir is None:
        raise ValueError("model has no directory to load a tokenizer from")
      self._tokenizer = evaluation.load_tokenizer(self.model_dir)
    return self._tokenizer

  def memory_bytes(self) -> dict[str, int]:
    """Bytes held on device: {"quantized": planes + LUTs, "other": everything else}."""
    quant = other = 0
    for leaf in jax.tree_util.tree_leaves(
        self._base, is_leaf=lambda x: isinstance(x, AnyPrecWeight)):
      if isinstance(leaf, AnyPrecWeight):
        quant += leaf.planes.nbytes + sum(v.nbytes for v in leaf.luts.values())
      else:
        other += leaf.nbytes
    return {"quantized": quant, "other": other}
