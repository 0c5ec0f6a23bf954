"""Sensitivity: diagonal Fisher information of the linear weights (Park et al., §3.1).

As in SqueezeLLM and the original release, the sensitivity of weight W[n, k] is the
diagonal of the empirical Fisher information,

    F[n, k] = sum_s (dL_s / dW[n, k])^2,

a sum over calibration sequences s of the *squared per-sample* gradient of the causal
LM loss L_s (mean next-token cross-entropy of sequence s, batch 1). The gradients come
from `jax.grad` inside a jitted `lax.scan` over samples; only the quantizable linear
weights are differentiated, and only their float32 accumulators are kept besides the
(bf16) parameters: a 7B model needs ~13.5 GB of bf16 weights + 26 GB of float32
accumulators + one bf16 gradient (13 GB), which fits one 80 GB GPU.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import models

ProgressFn = Callable[[int], None]


def causal_lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy, as Hugging Face's `labels=input_ids` loss.

  Args:
    logits: float32 [B, T, V].
    tokens: int [B, T].

  Returns:
    scalar float32.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
  target = tokens[:, 1:, None]  # [B, T-1, 1]
  return -jnp.mean(jnp.take_along_axis(logp, target, axis=-1))


@functools.partial(jax.jit, static_argnames=("cfg", "names"), donate_argnums=(2,))
def _fisher_block(cfg, names, acc, params, tokens, valid):
  """Adds the squared per-sample gradients of a block of samples to `acc`.

  Args:
    cfg: ModelConfig (static); names: tuple of module names (static).
    acc: {name: float32 [N, K]} running sums (donated).
    params: params tree.
    tokens: int32 [S, T] samples; valid: float32 [S], 0 for padding samples.

  Returns:
    (acc, losses float32 [S]).
  """
  lin = {n: models.get_param(params, n) for n in names}

  def loss_fn(lin_w, tok):  # tok [T]
    logits = models.forward(cfg, models.replace_params(params, lin_w), tok[None])
    return causal_lm_loss(logits, tok[None])

  def body(acc, sample):
    tok, v = sample
    loss, grads = jax.value_and_grad(loss_fn)(lin, tok)
    acc = {n: acc[n] + v * jnp.square(grads[n].astype(jnp.float32)) for n in names}
    return acc, loss

  return jax.lax.scan(body, acc, (tokens, valid))


def fisher_information(cfg, params, tokens: np.ndarray, names=None, *,
                       block_size: int = 1,
                       progress: ProgressFn | None = None) -> dict[str, jax.Array]:
  """Diagonal Fisher information of every quantizable linear weight.

  Args:
    cfg: models.ModelConfig.
    params: params tree (dense weights; bf16 recommended on accelerators).
    tokens: int [S, T] calibration samples (one sequence each, batch 1).
    names: module names (default: `models.linear_names(cfg)`).
    block_size: samples per jitted call (the scan length); the last block is padded
      with zero-weighted samples. Samples are added in the same order for any block
      size (bit-identical results on CPU; on GPUs the two compiled programs may round
      differently).
    progress: called with the number of samples done after each block.

  Returns:
    {name: float32 [N, K] on device}.

  Raises:
    ValueError: naming the first module whose weight or Fisher information is NaN/inf.
  """
  names = tuple(models.linear_names(cfg) if names is None else names)
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"tokens must be [S, T] with S >= 1, got {tokens.shape}")
  check_finite({n: models.get_param(params, n) for n in names}, "weights")
  acc = {n: jnp.zeros(models.get_param(params, n).shape, jnp.float32) for n in names}
  for start in range(0, tokens.shape[0], block_size):
    block = tokens[start:start + block_size]
    valid = np.ones(block_size, np.float32)
    if block.shape[0] < block_size:
      valid[block.shape[0]:] = 0.0
      block = np.concatenate([block, np.repeat(block[:1], block_size - block.shape[0], 0)])
    acc, _ = _fisher_block(cfg, names, acc, params, jnp.asarray(block), jnp.asarray(valid))
    if progress is not None:
      jax.block_until_ready(acc)
      progress(min(block_size, tokens.shape[0] - start))
  check_finite(acc, "gradients")
  return acc


def check_finite(arrays: Mapping[str, jax.Array], what: str) -> None:
  """Raises ValueError naming the first module (in order) with NaN/inf values.

  Args:
    arrays: {module name: array}.
    what: "weights" or "gradients" (for the message).
  """
  flags = {n: jnp.all(jnp.isfinite(v)) for n, v in arrays.items()}
  for name, ok in flags.items():
    if not bool(ok):
      hint = ("" if what == "weights" else
              ": the Fisher information is unusable (overflow in the chosen dtype?)")
      raise ValueError(f"non-finite (NaN/inf) {what} in {name}{hint}")
