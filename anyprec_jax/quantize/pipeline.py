"""Model-walking quantization pipeline (Park et al., ICML 2024, Any-Precision LLM).

`quantize_model` runs, for a Hugging Face checkpoint:
  1. the Fisher pass (sensitivity.py) on calibration data (calibration.py), unless the
     method is RTN;
  2. layer by layer, streaming each weight from the source safetensors: seed k-means +
     incremental upscaling (anyprec), or the baselines (baselines.py);
  3. writing the output directory (checkpoint.py).

Every step's result goes to a cache directory (cache.py), each file written atomically
(temporary name + rename) and keyed by the content it depends on: the source tensors'
bytes, the calibration tokens and every result-changing option. A run killed at any
point (even SIGKILL) resumes from the finished steps; since every step is
deterministic for a fixed seed, the output is byte-identical to an uninterrupted run.

Inputs are checked before the work: the source headers and tensor shapes, NaN / inf
in the weights (while hashing), the calibration data, and that `output_dir` and the
cache directory are writable. Such errors are `errors.AnyPrecError`s naming the file,
tensor or option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from anyprec_jax import errors, faults
from anyprec_jax import format as fmt
from anyprec_jax.quantize import baselines, cache, calibration as calib, checkpoint, kmeans
from anyprec_jax.quantize import fractional, sensitivity, tensor_io, upscaling
from models import hf_loader, registry
from anyprec_jax.quantize.config import (CalibrationConfig, LutDtype, Method, Nesting,
                                         QuantConfig)
from anyprec_jax.quantize.tensor_io import OutTensor

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


def resolve_model(model_path: str):
  """(local dir, HF config dict, ModelConfig) of an alias, local dir or hub id.

  Raises:
    errors.MissingInputError: no such directory / hub id, or no config.json.
    errors.BadInputError: invalid config.json, unknown architecture (model_type,
      with the supported ones), or an any-precision checkpoint as the source.
  """
  model_dir = models.resolve_model_dir(models.resolve_alias(str(model_path)))
  hf_config = hf_loader.read_hf_config(model_dir)
  try:
    cfg, _ = models.load_config(model_dir)
  except (hf_loader.CheckpointError, NotImplementedError) as e:
    raise errors.BadInputError(f"cannot quantize {model_path}: {e}") from e
  return model_dir, hf_config, cfg


def plan_layers(cfg, source: tensor_io.TensorIndex) -> list[Layer]:
  """Groups `models.linear_names(cfg)` by decoder layer, with shapes from the source.

  Every source tensor is checked first against the architecture's table (names and
  shapes; `models.hf_loader.plan_load`), so a bad checkpoint fails before any work.

  Raises:
    models.CheckpointError: a missing, unexpected or wrongly shaped tensor (named).
  """
  hf_loader.plan_load(registry.SPECS[cfg.arch], cfg,
                      {n: (e.file, e.shape) for n, e in source.entries.items()})
  layers: dict[int, list] = {}
  for name in models.linear_names(cfg):
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match is None:
      raise ValueError(f"cannot find the layer index of module {name!r}")
    key = f"{name}.weight"
    if key not in source:
      raise hf_loader.CheckpointError(f"source checkpoint has no tensor {key!r}")
    shape = source.entries[key].shape
    if len(shape) != 2:
      raise hf_loader.CheckpointError(f"{key} in {source.entries[key].file} has shape "
                                      f"{shape}, expected [out, in]")
    layers.setdefault(int(match.group(1)), []).append((name, tuple(shape)))
  return [Layer(i, tuple(m)) for i, m in sorted(layers.items())]


def _compute_dtype(dtype: str | None):
  if dtype is None:
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if dtype not in _COMPUTE_DTYPES:
    raise errors.UsageError(f"dtype must be one of {sorted(_COMPUTE_DTYPES)}, got "
                            f"{dtype!r} (--dtype)")
  return _COMPUTE_DTYPES[dtype]


def check_output_dirs(output_dir: pathlib.Path, cache_dir: pathlib.Path,
                      model_dir: pathlib.Path) -> None:
  """Checks, before any work, that both directories can be created and written.

  Raises:
    errors.UsageError: naming the option (--output_dir / --cache_dir) and the reason.
  """
  for path, flag in ((output_dir, "--output_dir"), (cache_dir, "--cache_dir")):
    if path.resolve() == pathlib.Path(model_dir).resolve():
      raise errors.UsageError(f"{flag}={path} is the source model's directory; "
                              "choose another one")
    try:
      tensor_io.check_writable_dir(path)
    except OSError as e:
      raise errors.UsageError(f"{flag}={path} is not a writable directory: "
                              f"{e.strerror or e}; choose another one") from e


def calibration_tokens(model_dir: pathlib.Path, calibration: CalibrationConfig):
  """Token ids [num_samples, seq_len] int32 of the calibration set, with the model's
  tokenizer."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (slow import)
  try:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError) as e:
    raise errors.BadInputError(f"cannot load the tokenizer of {model_dir} "
                               f"({type(e).__name__}: {e})") from e
  return calib.calibration_tokens(calibration, tokenizer)


def ensure_fisher(model_dir: pathlib.Path, cfg, layers: list[Layer],
                  calibration: CalibrationConfig, dtype, fisher_dir: pathlib.Path,
                  options: RunOptions) -> None:
  """Runs the Fisher pass unless `fisher_dir` already holds its complete result."""
  if cache.is_complete(fisher_dir):
    return
  tokens = calibration_tokens(model_dir, calibration)
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
    tensor_io.write_safetensors(cache.layer_file(fisher_dir, layer.index), arrays)
    faults.point("fisher")
  meta = {"num_samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
          "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
  tensor_io.write_bytes_atomic(fisher_dir / cache.DONE, json.dumps(meta, indent=2).encode())


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
  if f is not None and config.fisher_damping:
    f = damped_fisher(f, config.fisher_damping)
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


def damped_fisher(f: np.ndarray, alpha: float) -> np.ndarray:
  """F [N, K] + alpha * its row means (`QuantConfig.fisher_damping`)."""
  f = np.asarray(f, np.float32)
  return f + np.float32(alpha) * f.mean(axis=1, keepdims=True)


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
        try:
          kmeans.check_inputs(w, f, name)
        except ValueError as e:  # the weights were checked while hashing
          raise errors.BadInputError(
              f"{e} ({fisher.entries[name].file})",
              hint="did the Fisher pass overflow? rerun with --dtype=float32") from e
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


def _output_config(hf_config: dict, config: QuantConfig, calibration: CalibrationConfig,
                   layers: list[Layer], model_path: str, bits=None) -> dict:
  modules = {m: shape for layer in layers for m, shape in layer.modules}
  calib_info = (None if config.method is Method.RTN else
                dataclasses.asdict(calibration))
  extra = {"source_model": str(model_path),
           "quantizer": {"seed": config.seed, "max_iter": config.max_iter,
                         "n_init": config.n_init, "dp_bins": config.dp_bins,
                         "fisher_damping": config.fisher_damping}}
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


def _allocation_fields(cfg, source, fisher_dir, results, config: QuantConfig,
                       calibration: CalibrationConfig, layers: list[Layer]) -> dict:
  """`fisher_errors` and `allocations` of the anyprec section (quantize/fractional.py)."""
  shapes = {m: (k, n) for layer in layers for m, (n, k) in layer.modules}
  fisher = tensor_io.TensorIndex([cache.layer_file(fisher_dir, layer.index)
                                  for layer in layers])
  errs = fractional.index_errors(source, fisher, results, list(shapes), config.bit_widths,
                                 config.parent_bits)
  itemsize = np.dtype(_LUT_DTYPES[config.lut_dtype]).itemsize
  return fractional.section_fields(errs, shapes, cfg, config.seed_bits, config.parent_bits,
                                   itemsize, dataclasses.asdict(calibration))


def _write_outputs(output_dir, model_dir, hf_config, source, results, config, calibration,
                   layers, model_path, options, cfg=None, fisher_dir=None) -> None:
  shard = dict(max_shard_bytes=options.max_shard_bytes, progress=options.progress)
  modules = [m for layer in layers for m, _ in layer.modules]
  if config.method is Method.ANYPREC:
    tensors = checkpoint.anyprec_tensors(source, results, modules)
    cfg_json = _output_config(hf_config, config, calibration, layers, model_path)
    cfg_json["anyprec"].update(_allocation_fields(cfg, source, fisher_dir, results, config,
                                                  calibration, layers))
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

  Raises:
    errors.BadInputError / MissingInputError: a damaged, inconsistent or missing
      input (model files, tensors, NaN weights, calibration data), found before the
      Fisher pass.
    errors.UsageError: a bad option, or an output / cache directory that cannot be
      written (checked before any work).
    errors.OutputError: a write failed during the run (e.g. disk full); rerun to resume.
  """
  output_dir = pathlib.Path(output_dir)
  model_dir, hf_config, cfg = resolve_model(model_path)
  source = tensor_io.TensorIndex(models.hf_loader.safetensors_files(model_dir))
  layers = plan_layers(cfg, source)
  dtype = _compute_dtype(options.dtype)
  cache_dir = pathlib.Path(options.cache_dir or f"{output_dir}.cache")
  needs_fisher = config.method is not Method.RTN
  identity = (cache.calibration_identity(calibration, checkpoint.side_files(model_dir))
              if needs_fisher else None)
  check_output_dirs(output_dir, cache_dir, model_dir)
  quiet = not options.progress
  weights = {f"{m}.weight" for layer in layers for m, _ in layer.modules}
  content = cache.hash_source(source, hf_config, weights, options.progress)
  fisher_dir = None
  if needs_fisher:
    fisher_dir = cache.fisher_dir(cache_dir, content, identity, jnp.dtype(dtype).name)
    cache.report_fisher(fisher_dir, quiet)
    ensure_fisher(model_dir, cfg, layers, calibration, dtype, fisher_dir, options)
  quant_dir = cache.quant_dir(cache_dir, config)
  files = [cache.layer_file(quant_dir, layer.index, content, [m for m, _ in layer.modules],
                            fisher_dir) for layer in layers]
  cache.report_layers(files, quiet)
  for layer, path in tqdm(list(zip(layers, files)), desc="Quantizing", unit="layer",
                          disable=quiet):
    if path.exists():
      continue
    fisher = (None if fisher_dir is None else
              tensor_io.TensorIndex([cache.layer_file(fisher_dir, layer.index)]))
    tensor_io.write_safetensors(path, quantize_layer(layer, source, fisher, config, options))
    faults.point("layer")
  results = tensor_io.TensorIndex(files)
  _write_outputs(output_dir, model_dir, hf_config, source, results, config, calibration,
                 layers, model_path, options, cfg, fisher_dir)
  keep = options.keep_cache if options.keep_cache is not None else bool(options.cache_dir)
  if not keep:
    cache.remove(cache_dir, fisher_dir, quant_dir)
  return output_dir
