"""Batched, shape-bucketed scoring and generation for harness-style evaluation.

What `anyprec_jax.lm_eval_adapter` runs, kept free of `lm_eval` so it can be used and
tested without it:
- `EvalModel`: one model at one precision (an any-precision checkpoint at b bits, or
  a dense Hugging Face directory): config, params tree, tokenizer.
- `score`: sum of log p(continuation | context) and "is it the greedy continuation"
  for token sequences, through one jitted forward per (batch, length bucket) shape.
- `generate_tokens`: greedy / sampled continuations through the jitted prefill +
  on-device decode loop of `models.generate` (which buckets prompt and output length).

Shapes: rows are sorted by length (longest first), cut into batches of `batch_size`
rows, each batch right-padded to `models.generate.bucket(length)` (a power of two,
>= 16) and filled up to `batch_size` rows with copies of its first row, so the jit
cache holds one program per length bucket, not one per request.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from anyprec_jax import errors, evaluation
from anyprec_jax import checkpoint_reader as reader
from models.generate import bucket


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A model at one width, ready to score.

  Attributes:
    cfg: model config.
    params: params tree (dense, or `AnyPrecWeight`s active at `bits`).
    tokenizer: the directory's Hugging Face tokenizer.
    label: directory name.
    method: "anyprec" for an any-precision checkpoint, else "original" (or the
      fake-quantized baseline's method).
    bits: active precision; for a dense model the width of its dtype.
    model_dir: the directory.
  """
  cfg: models.ModelConfig
  params: object
  tokenizer: object
  label: str
  method: str
  bits: int
  model_dir: pathlib.Path


def is_anyprec_dir(path) -> bool:
  """Whether `path` is an any-precision checkpoint (`anyprec.method == "anyprec"`)."""
  config = models.hf_loader.read_hf_config(models.resolve_model_dir(path))
  return (config.get("anyprec") or {}).get("method") == "anyprec"


def from_anyprec(model, precision: int | None = None) -> EvalModel:
  """`EvalModel` of a loaded `AnyPrecisionForCausalLM` at `precision` (None: its
  default); the arrays are shared, so every precision of one load costs nothing more."""
  b = model.precision if precision is None else reader.as_precision(precision)
  params = model.params_at(b)  # Raises UsageError for a precision not loaded.
  return EvalModel(model.cfg, params, model.tokenizer, model.model_dir.name, "anyprec",
                   b, model.model_dir)


def load(path, precision: int | None = None, dtype=None) -> EvalModel:
  """Loads an any-precision checkpoint at `precision`, or a dense HF directory.

  Args:
    path: any-precision directory (`scripts/quantize.py --method=anyprec`), or a
      Hugging Face directory / hub id / alias (the original or a fake-quantized
      baseline).
    precision: bits for an any-precision checkpoint (only those planes are read);
      None: its highest. Must be None for a dense model.
    dtype: activation / dense-weight dtype; None: `runtime.default_dtype()`.

  Raises:
    errors.UsageError: `precision` given for a dense model, or not in the checkpoint.
  """
  from anyprec_jax.runtime import AnyPrecisionForCausalLM, default_dtype
  dtype = default_dtype() if dtype is None else dtype
  model_dir = models.resolve_model_dir(models.resolve_alias(str(path)))
  if is_anyprec_dir(model_dir):
    model = AnyPrecisionForCausalLM.from_quantized(
        model_dir, None if precision is None else [reader.as_precision(precision)],
        dtype)
    return from_anyprec(model, precision)
  if precision is not None:
    raise errors.UsageError(f"{model_dir} is a dense model, not an any-precision "
                            f"checkpoint: leave precision unset (got {precision})")
  cfg, params = models.load_pretrained(model_dir, dtype)
  meta = models.hf_loader.read_hf_config(model_dir).get("anyprec") or {}
  return EvalModel(cfg, params, evaluation.load_tokenizer(model_dir), model_dir.name,
                   str(meta.get("method", "original")),
                   int(meta.get("bits", jnp.dtype(dtype).itemsize * 8)), model_dir)


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_scores(cfg: models.ModelConfig, params, input_ids, attention_mask, targets):
  """Log-probability of each target and whether it is the argmax.

  Args:
    cfg: model config (static).
    params: params tree.
    input_ids: [B, T] int, right padded.
    attention_mask: [B, T], 1 = real token.
    targets: [B, T] int, the token that follows each input position.

  Returns:
    (logp [B, T] float32: log p(targets[:, t] | input_ids[:, :t+1]),
     greedy [B, T] bool: targets[:, t] is the argmax there).
  """
  logits = models.forward(cfg, params, input_ids, attention_mask)  # [B, T, V]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return picked, jnp.argmax(logits, axis=-1) == targets


def _batches(lengths: Sequence[int], batch_size: int,
             desc: str | None = None) -> list[list[int]]:
  """Row indices, longest first, cut into batches of `batch_size` (a tqdm bar over
  them when `desc` is given)."""
  if batch_size < 1:
    raise errors.UsageError(f"batch_size must be >= 1, got {batch_size}")
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
  if desc is None:
    return batches
  from tqdm import tqdm  # Local: only progress bars need it.
  return tqdm(batches, desc=desc, leave=False)


def score(model: EvalModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
          batch_size: int, max_length: int, desc: str | None = None
          ) -> list[tuple[float, bool]]:
  """Sum of log p(continuation | context) and whether it is the greedy continuation.

  Args:
    model: the model.
    requests: (context ids, continuation ids) pairs; the context must hold at least
      one token (a BOS / prefix token for an empty text context) and the
      continuation at least one.
    batch_size: rows per forward.
    max_length: the most tokens one forward sees; longer sequences keep their last
      `max_length + 1` tokens (the continuation is scored in full while it fits).
    desc: label of a progress bar over the batches; None: no bar.

  Returns:
    [(logprob, is_greedy)] in the order of `requests`.
  """
  seqs, conts = [], []
  for ctx, cont in requests:
    if not ctx or not cont:
      raise ValueError(f"context and continuation need >= 1 token each, got "
                       f"{len(ctx)} and {len(cont)}")
    whole = (list(ctx) + list(cont))[-(max_length + 1):]
    seqs.append(whole)
    conts.append(min(len(cont), len(whole) - 1))
  out: list[tuple[float, bool] | None] = [None] * len(seqs)
  for rows in _batches([len(s) for s in seqs], batch_size, desc):
    t = bucket(len(seqs[rows[0]]) - 1)
    ids = np.zeros((batch_size, t), np.int32)
    tgt = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for r in range(batch_size):
      s = seqs[rows[min(r, len(rows) - 1)]]
      ids[r, :len(s) - 1], tgt[r, :len(s) - 1], mask[r, :len(s) - 1] = s[:-1], s[1:], 1
    logp, greedy = jax.device_get(token_scores(model.cfg, model.params, ids, mask, tgt))
    for r, i in enumerate(rows):
      n, c = len(seqs[i]) - 1, conts[i]
      out[i] = (float(logp[r, n - c:n].sum()), bool(greedy[r, n - c:n].all()))
  return out


def generate_tokens(model: EvalModel, prompts: Sequence[Sequence[int]], *,
                    batch_size: int, max_new_tokens: int, eos_ids: Sequence[int],
                    sampling: models.SamplingConfig = models.SamplingConfig(),
                    seed: int = 0, desc: str | None = None) -> list[list[int]]:
  """Continuations of token prompts (EOS included when one was produced).

  Args:
    model: the model.
    prompts: token ids per prompt (each >= 1 token; already truncated to fit).
    batch_size: prompts per call (a short last batch is filled with copies).
    max_new_tokens: at most this many tokens each.
    eos_ids: ids that end a continuation on device (EOS, single-token stop strings).
    sampling: greedy by default.
    seed: PRNG seed of sampling (batch k uses fold_in(key(seed), k)).
    desc: label of a progress bar over the batches; None: no bar.

  Returns:
    [continuation ids] in the order of `prompts`.
  """
  out: list[list[int] | None] = [None] * len(prompts)
  for k, rows in enumerate(_batches([len(p) for p in prompts], batch_size, desc)):
    t = len(prompts[rows[0]])
    ids = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for r in range(batch_size):
      p = prompts[rows[min(r, len(rows) - 1)]]
      ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
    res = models.generate(
        model.cfg, model.params, ids, mask, max_new_tokens=max_new_tokens,
        sampling=sampling, rng=jax.random.fold_in(jax.random.key(seed), k),
        eos_token_id=tuple(eos_ids))
    tokens, lengths = jax.device_get((res.tokens, res.lengths))
    for r, i in enumerate(rows):
      out[i] = [int(x) for x in tokens[r, :lengths[r]]]
  return out
