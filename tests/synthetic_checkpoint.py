"""Tiny any-precision checkpoints written straight from the format contract.

Independent of the quantizer: random 8-bit parent codes and random LUTs per precision,
written as docs/ARCHITECTURE.md specifies (`M.planes`, `M.lut{b}`, anyprec section),
plus the matching *dense* HF directory at any precision b, whose weights are computed
here in NumPy as W_b[n, k] = lut_b[n, code[n, k] >> (parent - b)] (the reference).
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
from safetensors.numpy import save_file

import models
from anyprec_jax import format as fmt

SEED_BITS, PARENT_BITS = 3, 8

# Llama with K not a multiple of 32 (48, 80: padded words) and GQA.
TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97,
    "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}


def _dense_tensors(cfg: models.ModelConfig, rng: np.random.Generator) -> dict:
  """Random unquantized tensors (embeddings, norms, lm_head) under their HF names."""
  d, v = cfg.hidden_size, cfg.vocab_size
  out = {"model.embed_tokens.weight": rng.normal(0, 1.0, (v, d)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=d),
         "lm_head.weight": rng.normal(0, 0.3, (v, d))}
  for i in range(cfg.num_layers):
    for norm in ("input_layernorm", "post_attention_layernorm"):
      out[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * rng.normal(size=d)
  return {k: np.asarray(a, np.float32) for k, a in out.items()}


def _linear_shapes(cfg: models.ModelConfig) -> dict[str, tuple[int, int]]:
  """{module: (N, K)} from an abstract init of the model."""
  shapes = {}
  params = models.decoder.abstract_params(cfg)
  for name in models.linear_names(cfg):
    shapes[name] = tuple(models.get_param(params, name).shape)
  return shapes


def fisher_errors(seed: int = 0) -> dict[str, list[float]]:
  """Random Fisher-weighted errors per module, decreasing in the width (about 4x per
  bit, with a random sensitivity per module), for widths SEED_BITS..PARENT_BITS."""
  rng = np.random.default_rng(seed + 1000)
  widths = np.arange(SEED_BITS, PARENT_BITS + 1)
  return {m: list(rng.lognormal(0, 1) * 4.0 ** -(widths - SEED_BITS)
                  * rng.uniform(0.7, 1.3, len(widths)).cumprod())
          for m in linear_names()}


def write(out_dir: pathlib.Path | None = None, seed: int = 0, shards: int = 1,
          allocations=None):
  """Writes a random any-precision checkpoint.

  Args:
    out_dir: target directory (created); None: a fresh temp dir.
    seed: RNG seed.
    shards: 1: `model.safetensors`; 2: two shards + index (planes and LUTs of a module
      in different shards).
    allocations: None: no allocation fields; else the targets to store, with
      `fisher_errors(seed)` as `anyprec.fisher_errors` (written by the quantizer's
      `fractional.section_fields`).

  Returns:
    (directory, {module: (codes [N, K] int, {b: lut [N, 2^b] float16})}, dense tensors).
  """
  out = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="anyprec_synth_"))
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  cfg = models.config_from_hf(TINY_CONFIG)
  dense = _dense_tensors(cfg, rng)
  quant, tensors_a, tensors_b, modules = {}, {}, {}, {}
  for name, (n, k) in _linear_shapes(cfg).items():
    codes = rng.integers(0, 1 << PARENT_BITS, (n, k))
    scale = 1.0 / np.sqrt(k)
    luts = {b: np.sort(rng.normal(0, scale, (n, 1 << b)), axis=1).astype(np.float16)
            for b in range(SEED_BITS, PARENT_BITS + 1)}
    quant[name] = (codes, luts)
    tensors_a[f"{name}.planes"] = fmt.pack_bitplanes(codes, PARENT_BITS)
    for b, lut in luts.items():
      tensors_b[f"{name}.lut{b}"] = lut
    modules[name] = {"in_features": k, "out_features": n}
  config = dict(TINY_CONFIG, anyprec={
      "format_version": 1, "method": "anyprec", "seed_bits": SEED_BITS,
      "parent_bits": PARENT_BITS, "lut_dtype": "float16", "quantized_modules": modules,
      "calibration": {"dataset": "synthetic", "num_samples": 0, "seq_len": 0, "seed": seed}})
  if allocations is not None:
    from anyprec_jax.quantize import fractional  # noqa: PLC0415
    shapes = {m: (v["in_features"], v["out_features"]) for m, v in modules.items()}
    config["anyprec"].update(fractional.section_fields(
        fisher_errors(seed), shapes, cfg, SEED_BITS, PARENT_BITS, 2, None,
        list(allocations)))
  (out / "config.json").write_text(json.dumps(config, indent=1))
  if shards == 1:
    save_file({**dense, **tensors_a, **tensors_b}, str(out / "model.safetensors"))
  else:
    files = {"model-00001-of-00002.safetensors": {**dense, **tensors_a},
             "model-00002-of-00002.safetensors": tensors_b}
    weight_map = {}
    for fname, tensors in files.items():
      save_file(tensors, str(out / fname))
      weight_map.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
  return out, quant, dense


def dense_reference_dir(quant: dict, dense: dict, bits) -> pathlib.Path:
  """A plain HF directory whose linears are the b-bit weights computed in NumPy.

  `bits`: one width for every module, or {module: width} (an allocation)."""
  out = pathlib.Path(tempfile.mkdtemp(prefix="anyprec_dense_"))
  tensors = dict(dense)
  for name, (codes, luts) in quant.items():
    b = bits[name] if isinstance(bits, dict) else bits
    top = codes >> (PARENT_BITS - b)  # [N, K] top b bits of the parent code.
    tensors[f"{name}.weight"] = np.take_along_axis(
        luts[b].astype(np.float32), top, axis=1)
  save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps(TINY_CONFIG))
  return out


def linear_names() -> list[str]:
  """Quantized module names of the tiny model."""
  return models.linear_names(models.config_from_hf(TINY_CONFIG))
