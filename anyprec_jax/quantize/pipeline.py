"""Model-walking quantization pipeline (Park et al., ICML 2024, Any-Precision LLM).

`quantize_model` runs, for a Hugging Face checkpoint:
  1. the Fisher pass (sensitivity.py) on calibration data (calibration.py), unless the
     method is RTN;
  2. layer by layer, streaming each weight from the source safetensors: seed k-means +
     incremental upscaling (anyprec), or the baselines (baselines.py);
  3. writing the output directory (checkpoint.py).

Every step's result goes to a cache directory, each file written atomically (temporary
name + rename) and keyed by a digest of everything it depends on. A run killed at any
point (even SIGKILL) resumes from the finished steps; since every step is
deterministic for a fixed seed, the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import re
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from anyprec_jax import format as fmt
from anyprec_jax.quantize import baselines, calibration as calib, checkpoint, kmeans
from anyprec_jax.quantize import sensitivity, tensor_io, upscaling
from anyprec_jax.quantize.config import (CalibrationConfig, LutDtype, Method, Nesting,
                                         QuantConfig)
from anyprec_jax.quantize.tensor_io import OutTensor

_CACHE_VERSION = 1
_LUT_DTYPES = {LutDtype.FLOAT16: np.float16, LutDtype.BFLOAT16: tensor_io.DTYPES["BF16"],
               LutDtype.FLOAT32: np.float32}
_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How to run (not what to compute; the output does not depend on these).

  Attributes:
    cache_dir: cache of resumable steps (default: `<output_dir>.cache`).
    dtype: compute dtype of the Fisher pass, "bfloat16" / "float16" / "float32";
      None: bfloat16 on accelerators, float32 on CPU. (Part of the Fisher cache key.)
    max_shard_bytes: safetensors shard size limit.
    chunk_elements: weights per jitted k-means call (None: by backend).
    fisher_block_size: calibration samples per jitted Fisher call.
    progress: show progress bars.
    keep_cache: keep this run's cache entries after a successful run; None: keep them
      when `cache_dir` was given (a cache shared between runs, e.g. one Fisher pass
      for several methods), remove them from the default `<output_dir>.cache`. An
      interrupted run always leaves them, so a rerun resumes.
  """
  cache_dir: str | None = None
  dtype: str | None = None
  max_shard_bytes: int = checkpoint.DEFAULT_MAX_SHARD_BYTES
  chunk_elements: int | None = None
  fisher_block_size: int = 1
  progress: bool = True
  keep_cache: bool | None = None


@dataclasses.dataclass(frozen=True)
class Layer:
  """The quantizable linears of one decoder layer: names and shapes [N, K]."""
  index: int
  modules: tuple[tuple[str, tuple[int, int]], ...]


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_model(model_path: str):
  """(local dir, HF config dict, ModelConfig) of an alias, local dir or hub id.

  Raises:
    ValueError: unknown architecture (model_type), with the supported ones.
  """
  model_dir = models.resolve_model_dir(models.resolve_alias(str(model_path)))
  hf_config = json.loads((model_dir / "config.json").read_text())
  try:
    cfg, _ = models.load_config(model_dir)
  except (ValueError, NotImplementedError) as e:
    raise ValueError(f"cannot quantize {model_path}: {e}") from e
  return model_dir, hf_config, cfg


def plan_layers(cfg, source: tensor_io.TensorIndex) -> list[Layer]:
  """Groups `models.linear_names(cfg)` by decoder layer, with shapes from the source."""
  layers: dict[int, list] = {}
  for name in models.linear_names(cfg):
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match is None:
      raise ValueError(f"cannot find the layer index of module {name!r}")
    key = f"{name}.weight"
    if key not in source:
      raise ValueError(f"source checkpoint has no tensor {key!r}")
    shape = source.entries[key].shape
    if len(shape) != 2:
      raise ValueError(f"{key} has shape {shape}, expected [out, in]")
    layers.setdefault(int(match.group(1)), []).append((name, tuple(shape)))
  return [Layer(i, tuple(m)) for i, m in sorted(layers.items())]


def _layer_file(directory: pathlib.Path, layer: Layer) -> pathlib.Path:
  return directory / f"layer_{layer.index:05d}.safetensors"


def _compute_dtype(dtype: str | None):
  if dtype is None:
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if dtype not in _COMPUTE_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_COMPUTE_DTYPES)}, got {dtype!r}")
  return _COMPUTE_DTYPES[dtype]


def ensure_fisher(model_dir: pathlib.Path, cfg, layers: list[Layer],
                  calibration: CalibrationConfig, dtype, fisher_dir: pathlib.Path,
                  options: RunOptions) -> None:
  """Runs the Fisher pass unless `fisher_dir` already holds its complete result."""
  done = fisher_dir / "complete.json"
  if done.exists():
    return
  from transformers import AutoTokenizer  # noqa: PLC0415 (slow import)
  tokens = calib.calibration_tokens(calibration, AutoTokenizer.from_pretrained(model_dir))
  _, params = models.load_pretrained(model_dir, dtype=dtype)
  names = [m for layer in layers for m, _ in layer.modules]
  with tqdm(total=len(tokens), desc="Fisher", unit="sample",
            disable=not options.progress) as bar:
    fisher = sensitivity.fisher_information(cfg, params, tokens, names,
                                            block_size=options.fisher_block_size,
                                            progress=bar.update)
  del params
  for layer in layers:
    arrays = [OutTensor.of_array(m, np.asarray(fisher.pop(m))) for m, _ in layer.modules]
    tensor_io.write_safetensors(_layer_file(fisher_dir, layer), arrays)
  meta = {"num_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
          "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
  tensor_io.write_bytes_atomic(done, json.dumps(meta, indent=2).encode())


def _group_by_in_features(layer: Layer) -> list[list[tuple[str, tuple[int, int]]]]:
  groups: dict[int, list] = {}
  for name, shape in layer.modules:
    groups.setdefault(shape[1], []).append((name, shape))
  return [groups[k] for k in sorted(groups)]


def _lut_array(lut: np.ndarray, config: QuantConfig, name: str) -> np.ndarray:
  dtype = _LUT_DTYPES[config.lut_dtype]
  if config.lut_dtype is LutDtype.FLOAT16 and np.abs(lut).max() > np.finfo(np.float16).max:
    raise ValueError(f"LUT values of {name} overflow float16; use lut_dtype bfloat16 "
                     "or float32")
  return lut.astype(dtype)


def _quantize_group(w, f, config: QuantConfig, key, options: RunOptions, name: str):
  """{b: (codes uint8 [N, K], lut float32 [N, 2^b])}; anyprec: {"parent": result}."""
  opts = dict(max_iter=config.max_iter, n_init=config.n_init, dp_bins=config.dp_bins,
              chunk_elements=options.chunk_elements, name=name)
  if config.method is Method.ANYPREC:
    return upscaling.seed_and_upscale(w, f, config.seed_bits, config.parent_bits, key,
                                      split=config.split, nesting=config.nesting,
                                      nesting_bins=config.nesting_bins,
                                      nesting_weights=config.level_weights, **opts)
  if config.method is Method.INDEPENDENT:
    return baselines.independent(w, f, config.bit_widths, key, **opts)
  if config.method is Method.SQUEEZELLM:
    return baselines.squeezellm(w, f, config.bit_widths, key, max_iter=config.max_iter,
                                chunk_elements=options.chunk_elements, name=name)
  return {b: baselines.rtn(w, b, chunk_elements=options.chunk_elements, name=name)
          for b in config.bit_widths}


def pack_planes(codes: np.ndarray, bits: int, block_rows: int = 256) -> np.ndarray:
  """`format.pack_bitplanes` over row blocks in threads (rows pack independently).

  Args:
    codes: uint8 [N, K]; bits: parent width.

  Returns:
    uint32 [bits, N, ceil(K/32)], identical to `format.pack_bitplanes(codes, bits)`.
  """
  starts = range(0, codes.shape[0], block_rows)
  with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
    parts = list(pool.map(lambda s: fmt.pack_bitplanes(codes[s:s + block_rows], bits),
                          starts))
  return np.concatenate(parts, axis=1)


def _module_tensors(result, rows: slice, module: str, config: QuantConfig) -> list[OutTensor]:
  if config.method is Method.ANYPREC:
    out = [OutTensor.of_array(f"{module}.planes",
                              pack_planes(result.codes[rows], config.parent_bits))]
    out += [OutTensor.of_array(f"{module}.lut{b}", _lut_array(lut[rows], config, module))
            for b, lut in result.luts.items()]
    return out
  out = []
  for b, res in result.items():
    out.append(OutTensor.of_array(f"{module}.codes{b}", res.codes[rows]))
    out.append(OutTensor.of_array(f"{module}.lut{b}", res.lut[rows]))
  return out


def quantize_layer(layer: Layer, source: tensor_io.TensorIndex,
                   fisher: tensor_io.TensorIndex | None, config: QuantConfig,
                   options: RunOptions) -> list[OutTensor]:
  """Quantizes every linear of one layer (modules with equal K in one batch).

  Args:
    layer: the layer's modules and shapes.
    source: source checkpoint tensors (weights read one at a time, as float32).
    fisher: this layer's Fisher information (None for RTN).
    config: method and bit widths; options: chunking.

  Returns:
    anyprec: `M.planes`, `M.lut{b}`; baselines: `M.codes{b}`, `M.lut{b}` (float32).
  """
  out = []
  for g, group in enumerate(_group_by_in_features(layer)):
    ws, fs = [], []
    for name, _ in group:
      w = source.array(f"{name}.weight").astype(np.float32)
      f = None if fisher is None else fisher.array(name)
      if f is None:
        kmeans.check_weight(w, name)
      else:
        kmeans.check_inputs(w, f, name)
      ws.append(w)
      fs.append(f)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), layer.index), g)
    label = f"layer {layer.index} ({', '.join(n for n, _ in group)})"
    w_all = np.concatenate(ws)
    f_all = None if fisher is None else np.concatenate(fs)
    result = _quantize_group(w_all, f_all, config, key, options, label)
    start = 0
    for name, (n, _) in group:
      out += _module_tensors(result, slice(start, start + n), name, config)
      start += n
  return out


def _cache_keys(model_dir, hf_config, source, config, calibration, dtype) -> tuple:
  files = sorted((e.file.name, e.file.stat().st_size) for e in source.entries.values())
  model = {"dir": str(pathlib.Path(model_dir).resolve()), "config": hf_config,
           "files": sorted(set(files)), "version": _CACHE_VERSION}
  fisher = None
  if config.method is not Method.RTN:
    fisher = _digest({"model": model, "calibration": dataclasses.asdict(calibration),
                      "dtype": jnp.dtype(dtype).name})
  quant = _digest({"model": model, "fisher": fisher,
                   "config": dataclasses.asdict(config)})
  return fisher, quant


def _output_config(hf_config: dict, config: QuantConfig, calibration: CalibrationConfig,
                   layers: list[Layer], model_path: str, bits=None) -> dict:
  modules = {m: shape for layer in layers for m, shape in layer.modules}
  calib_info = (None if config.method is Method.RTN else
                dataclasses.asdict(calibration))
  extra = {"source_model": str(model_path),
           "quantizer": {"seed": config.seed, "max_iter": config.max_iter,
                         "n_init": config.n_init, "dp_bins": config.dp_bins}}
  if config.method is Method.ANYPREC:
    extra["quantizer"]["split"] = config.split.value
    extra["quantizer"]["nesting"] = config.nesting.value
    if config.nesting is Nesting.OPTIMAL:
      extra["quantizer"].update(nesting_bins=config.nesting_bins,
                                nesting_weights=list(config.level_weights))
  if bits is None:
    bits_info = {"seed_bits": config.seed_bits, "parent_bits": config.parent_bits}
    extra["lut_dtype"] = config.lut_dtype.value
  else:
    bits_info = {"bits": bits}
  section = checkpoint.anyprec_section(config.method.value, bits_info, modules,
                                       calib_info, extra)
  out = {k: v for k, v in hf_config.items() if k != "anyprec"}
  out["anyprec"] = section
  return out


def _write_outputs(output_dir, model_dir, hf_config, source, results, config, calibration,
                   layers, model_path, options) -> None:
  shard = dict(max_shard_bytes=options.max_shard_bytes, progress=options.progress)
  modules = [m for layer in layers for m, _ in layer.modules]
  if config.method is Method.ANYPREC:
    tensors = checkpoint.anyprec_tensors(source, results, modules)
    cfg_json = _output_config(hf_config, config, calibration, layers, model_path)
    checkpoint.write_model_dir(output_dir, tensors, cfg_json, model_dir, **shard)
    return
  for b in config.bit_widths:
    weights = {m: (lambda m=m, b=b: baselines.dequantize_codes(
        results.array(f"{m}.codes{b}"), results.array(f"{m}.lut{b}"))) for m in modules}
    tensors = checkpoint.dense_tensors(source, weights)
    cfg_json = _output_config(hf_config, config, calibration, layers, model_path, bits=b)
    checkpoint.write_model_dir(pathlib.Path(output_dir) / f"w{b}", tensors, cfg_json,
                               model_dir, desc=f"writing w{b}", **shard)


def quantize_model(model_path: str, output_dir: str, config: QuantConfig = QuantConfig(),
                   calibration: CalibrationConfig = CalibrationConfig(),
                   options: RunOptions = RunOptions()) -> pathlib.Path:
  """Quantizes a Hugging Face checkpoint (alias, local directory or hub id).

  Args:
    model_path: e.g. "mistral-7b", "/path/to/hf_dir", "facebook/opt-125m".
    output_dir: anyprec: the checkpoint directory; baselines: holds `w{b}/` per width.
    config: bit widths, method and algorithm options.
    calibration: calibration data of the Fisher pass (unused for RTN).
    options: cache directory, compute dtype, sharding, progress bars.

  Returns:
    The output directory.
  """
  output_dir = pathlib.Path(output_dir)
  model_dir, hf_config, cfg = resolve_model(model_path)
  source = tensor_io.TensorIndex(models.hf_loader.safetensors_files(model_dir))
  layers = plan_layers(cfg, source)
  dtype = _compute_dtype(options.dtype)
  cache = pathlib.Path(options.cache_dir or f"{output_dir}.cache")
  fisher_key, quant_key = _cache_keys(model_dir, hf_config, source, config, calibration,
                                      dtype)
  fisher_dir = None if fisher_key is None else cache / f"fisher-{fisher_key}"
  if fisher_dir is not None:
    ensure_fisher(model_dir, cfg, layers, calibration, dtype, fisher_dir, options)
  quant_dir = cache / f"{config.method.value}-{quant_key}"
  for layer in tqdm(layers, desc="Quantizing", unit="layer", disable=not options.progress):
    path = _layer_file(quant_dir, layer)
    if path.exists():
      continue
    fisher = (None if fisher_dir is None else
              tensor_io.TensorIndex([_layer_file(fisher_dir, layer)]))
    tensor_io.write_safetensors(path, quantize_layer(layer, source, fisher, config, options))
  results = tensor_io.TensorIndex([_layer_file(quant_dir, layer) for layer in layers])
  _write_outputs(output_dir, model_dir, hf_config, source, results, config, calibration,
                 layers, model_path, options)
  keep = options.keep_cache if options.keep_cache is not None else bool(options.cache_dir)
  if not keep:
    for d in (quant_dir, fisher_dir):
      if d is not None:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
      cache.rmdir()  # only when nothing else is cached there
  return output_dir
