"""Timing of the quantizer on random data (used by scripts/bench_quantize.py).

- `throughput`: seed k-means + upscaling of [N, K] matrices, rows/s (after compilation).
- `llama2_7b_seed_upscale`: every linear of a Llama-2-7B-shaped model (32 layers of
  q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), grouped per layer by input
  width as in the pipeline; random weights and sensitivities generated on the device.
- `fisher_7b`: the Fisher pass of a Llama-2-7B-shaped model with random bf16 weights.
- `precision_check`: the double-float prefix sums against float64 on this backend.
- `upscale_vs_independent`: weighted error of upscaled vs independent codes per width.
Random Fisher values are |N(0,1)|^3 * 1e-6: positive, heavy-tailed, like squared
gradients.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import models
from anyprec_jax.quantize import rowops, sensitivity, upscaling
from anyprec_jax.quantize.config import QuantConfig

LLAMA2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2,
}
# Rows of each input width per layer: K=4096: q, k, v, o (4096 each), gate, up (11008);
# K=11008: down (4096).
LLAMA2_7B_GROUPS = ((4 * 4096 + 2 * 11008, 4096), (4096, 11008))


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_matrix(key, n: int, k: int):
  """Random weight [N, K] and Fisher [N, K] on the default device."""
  kw, kf = jax.random.split(key)
  w = 0.02 * jax.random.normal(kw, (n, k), jnp.float32)
  f = 1e-6 * jnp.abs(jax.random.normal(kf, (n, k), jnp.float32)) ** 3
  return w, f


def _timed(fn: Callable) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def nesting_options(config: QuantConfig) -> dict:
  """The nesting keyword arguments of `upscaling.seed_and_upscale` from a config."""
  return dict(nesting=config.nesting, nesting_bins=config.nesting_bins,
              nesting_weights=config.level_weights)


def throughput(shapes, config: QuantConfig, chunk_elements=None, log=print) -> list[dict]:
  """Seed + upscale throughput per shape (second call; the first compiles)."""
  out = []
  for n, k in shapes:
    w, f = random_matrix(jax.random.key(n * 7 + k), n, k)
    run = lambda: upscaling.seed_and_upscale(  # noqa: E731
        w, f, config.seed_bits, config.parent_bits, jax.random.key(0),
        dp_bins=config.dp_bins, n_init=config.n_init, split=config.split,
        chunk_elements=chunk_elements, **nesting_options(config)).codes
    first = _timed(run)
    sec = _timed(run)
    row = {"shape": f"{n}x{k}", "first_call_s": round(first, 3), "seconds": round(sec, 3),
           "rows_per_s": round(n / sec, 1), "chunk_elements": chunk_elements}
    log(row)
    out.append(row)
  return out


def llama2_7b_seed_upscale(config: QuantConfig, budget_s: float, chunk_elements=None,
                           log=print, groups=LLAMA2_7B_GROUPS,
                           layers: int = LLAMA2_7B["num_hidden_layers"]) -> dict:
  """Seed + upscale of all 32 layers of a Llama-2-7B-shaped model.

  Layer 0 is run twice: the first run includes compilation (reported apart), the
  second is timed like every other layer. Stops early (and says so) if the projected
  total exceeds `budget_s`, extrapolating the remaining layers from the mean layer time.
  """
  def layer(i):
    for g, (n, k) in enumerate(groups):
      w, f = random_matrix(jax.random.key(1000 * i + g), n, k)
      upscaling.seed_and_upscale(w, f, config.seed_bits, config.parent_bits,
                                 jax.random.key(i), dp_bins=config.dp_bins,
                                 n_init=config.n_init, split=config.split,
                                 chunk_elements=chunk_elements, **nesting_options(config))

  compile_s = _timed(lambda: layer(0))
  times = []
  for i in range(layers):
    times.append(_timed(lambda i=i: layer(i)))
    log({"layer": i, "seconds": round(times[-1], 3)})
    if sum(times) + np.mean(times) * (layers - i - 1) > budget_s and i < layers - 1:
      break
  measured = len(times)
  total = sum(times) + np.mean(times) * (layers - measured)
  return {"layers_measured": measured, "layers": layers,
          "measured_s": round(sum(times), 2), "total_s": round(float(total), 2),
          "extrapolated": measured < layers, "first_layer_with_compile_s": round(compile_s, 2),
          "rows": layers * sum(n for n, _ in groups)}


def random_params(cfg, dtype=jnp.bfloat16, seed: int = 0):
  """Random params of a model config, generated leaf by leaf on the device."""
  shapes = models.decoder.abstract_params(cfg, dtype)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def make(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  out = []
  for i, leaf in enumerate(leaves):
    if len(leaf.shape) == 1:  # norm weights
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append(make(jax.random.key(seed * 100003 + i), leaf.shape, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def fisher_7b(num_samples: int, seq_len: int, log=print, hf_config=None) -> dict:
  """Per-sample time of the Fisher pass for a random Llama-2-7B-shaped bf16 model."""
  cfg = models.config_from_hf(LLAMA2_7B if hf_config is None else hf_config)
  params = random_params(cfg)
  jax.block_until_ready(params)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (num_samples, seq_len))
  first = _timed(lambda: sensitivity.fisher_information(cfg, params, tokens[:1]))
  log({"fisher_first_sample_with_compile_s": round(first, 2)})
  rest = _timed(lambda: sensitivity.fisher_information(cfg, params, tokens))
  per_sample = rest / num_samples
  return {"samples_timed": num_samples, "seq_len": seq_len,
          "first_call_with_compile_s": round(first, 2),
          "per_sample_s": round(per_sample, 4),
          "extrapolated_100_samples_s": round(100 * per_sample, 1)}


def precision_check(k: int = 11008, seed: int = 0) -> dict:
  """Max error of double-float range sums vs float64 (relative to the row's scale)."""
  rng = np.random.default_rng(seed)
  v = (rng.standard_normal(k) * np.exp(rng.uniform(-20, 5, k))).astype(np.float32)
  p = jax.jit(rowops.df_cumsum)(jnp.asarray(v))
  ref = np.concatenate([[0.0], np.cumsum(v.astype(np.float64))])
  i = rng.integers(0, k, 2000)
  j = np.minimum(i + rng.integers(1, 40, 2000), k)
  hi, lo = np.asarray(p.hi, np.float64), np.asarray(p.lo, np.float64)
  got = (hi[j] - hi[i]) + (lo[j] - lo[i])
  f32 = np.concatenate([[0.0], np.cumsum(v)]).astype(np.float64)
  scale = np.abs(v).sum()
  return {"double_float_max_err": float(np.max(np.abs(got - (ref[j] - ref[i]))) / scale),
          "float32_max_err": float(np.max(np.abs((f32[j] - f32[i]) - (ref[j] - ref[i])))
                                   / scale)}


def weighted_error(w, f, codes, lut) -> float:
  """sum f * (w - lut[codes])^2 over a matrix (float64)."""
  from anyprec_jax.quantize.baselines import dequantize_codes
  d = np.asarray(w, np.float64) - dequantize_codes(codes, lut)
  return float(np.sum(np.asarray(f, np.float64) * d * d))


def upscale_vs_independent(w, f, seed_bits: int = 3, parent_bits: int = 8,
                           key=None) -> dict[int, dict]:
  """Weighted error of each upscaled width vs k-means run at that width alone.

  The b-bit upscaled codes are the top b bits of the parent codes. A ratio above 1
  is the price of the nesting constraint (each b-bit cluster is half of a (b-1)-bit
  one); at the seed width both are the same k-means. Errors are relative to
  sum f * w^2.
  """
  from anyprec_jax.quantize import baselines
  key = jax.random.key(0) if key is None else key
  up = upscaling.seed_and_upscale(w, f, seed_bits, parent_bits, key)
  ind = baselines.independent(w, f, range(seed_bits, parent_bits + 1), key)
  out = {}
  energy = float(np.sum(np.asarray(f, np.float64) * np.asarray(w, np.float64) ** 2))
  for b in range(seed_bits, parent_bits + 1):
    e_up = weighted_error(w, f, np.asarray(up.codes) >> (parent_bits - b), up.luts[b])
    e_ind = weighted_error(w, f, ind[b].codes, ind[b].lut)
    out[b] = {"upscaled": e_up / energy, "independent": e_ind / energy,
              "ratio": e_up / e_ind}
  return out
