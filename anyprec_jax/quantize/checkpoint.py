"""Writing quantized checkpoints (format: docs/ARCHITECTURE.md, "Quantized checkpoint").

An any-precision checkpoint is a Hugging Face-like directory: the source `config.json`
plus an "anyprec" section, the source tokenizer files, and safetensors shards in which
every quantized module M has `M.planes` (uint32 [P, N, ceil(K/32)]) and `M.lut{b}`
([N, 2^b]) instead of `M.weight`; every other tensor is copied byte for byte. Baselines
are written as plain HF directories with dense dequantized weights in the source dtype.
Shards are split above `max_shard_bytes` with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from anyprec_jax import checkpoint_reader, faults
from anyprec_jax.quantize import tensor_io
from anyprec_jax.quantize.tensor_io import OutTensor

FORMAT_VERSION = checkpoint_reader.FORMAT_VERSION  # the reader owns the format
DEFAULT_MAX_SHARD_BYTES = 4 * 1024 ** 3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                    ".gguf", ".npz")
_SKIPPED = ("config.json", INDEX_FILE, "pytorch_model.bin.index.json")


def side_files(src_dir: pathlib.Path) -> list[pathlib.Path]:
  """Files of a model directory to copy as they are (tokenizer, generation config...)."""
  out = []
  for p in sorted(pathlib.Path(src_dir).iterdir()):
    if (p.is_file() and not p.name.startswith(".") and p.name not in _SKIPPED
        and not p.name.endswith(_WEIGHT_SUFFIXES)):
      out.append(p)
  return out


def _copy_atomic(src: pathlib.Path, dst: pathlib.Path) -> None:
  with tensor_io.atomic_path(dst) as tmp, tensor_io.writing(dst):
    shutil.copyfile(src, tmp)


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
  """Splits tensors (in name order) into shards of at most `max_shard_bytes`.

  A single tensor larger than the limit gets a shard of its own.
  """
  shards: list[list[OutTensor]] = [[]]
  size = 0
  for t in sorted(tensors, key=lambda t: t.name):
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def _shard_name(i: int, n: int) -> str:
  return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_model_dir(out_dir: pathlib.Path, tensors: list[OutTensor], config: dict,
                    src_dir: pathlib.Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    progress: bool = True, desc: str = "writing") -> None:
  """Writes an HF-like model directory (shards, index, side files, config.json).

  Every file is written atomically; config.json comes last. Stale shards of an earlier
  run with another shard count are removed.

  Args:
    out_dir: output directory (created).
    tensors: every tensor of the checkpoint.
    config: the config.json content.
    src_dir: source model directory (tokenizer and other side files are copied).
    max_shard_bytes: shard size limit.
    progress: show a progress bar.
    desc: progress bar label.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  shards = plan_shards(tensors, max_shard_bytes)
  names = [_shard_name(i, len(shards)) for i in range(len(shards))]
  for stale in out_dir.glob("*.safetensors"):
    if stale.name not in names:
      stale.unlink()
  total = sum(t.nbytes for t in tensors)
  with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
    for name, shard in zip(names, shards):
      tensor_io.write_safetensors(out_dir / name, shard)
      bar.update(sum(t.nbytes for t in shard))
      faults.point("write")
  index = out_dir / INDEX_FILE
  if len(shards) > 1:
    weight_map = {t.name: n for n, shard in zip(names, shards) for t in shard}
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tensor_io.write_bytes_atomic(index, (json.dumps(body, indent=2) + "\n").encode())
  elif index.exists():
    index.unlink()
  for f in side_files(src_dir):
    _copy_atomic(f, out_dir / f.name)
  tensor_io.write_bytes_atomic(out_dir / "config.json",
                               (json.dumps(config, indent=2) + "\n").encode())


def anyprec_tensors(source: tensor_io.TensorIndex, results: tensor_io.TensorIndex,
                    modules: Iterable[str]) -> list[OutTensor]:
  """Tensors of an any-precision checkpoint.

  Args:
    source: the source checkpoint's tensors.
    results: the quantized modules' `M.planes` / `M.lut{b}` tensors.
    modules: names M of the quantized modules (their `M.weight` is dropped).

  Returns:
    every source tensor except the quantized weights, plus every result tensor.
  """
  dropped = {f"{m}.weight" for m in modules}
  missing = dropped - set(source.entries)
  if missing:
    raise ValueError(f"quantized modules without a weight in the source: {sorted(missing)}")
  out = [OutTensor.copy_of(source, n) for n in source.names() if n not in dropped]
  out += [OutTensor.copy_of(results, n) for n in results.names()]
  return out


def dense_tensors(source: tensor_io.TensorIndex,
                  weights: dict[str, Callable[[], np.ndarray]]) -> list[OutTensor]:
  """Tensors of a fake-quantized (dense) checkpoint.

  Args:
    source: the source checkpoint's tensors.
    weights: {module name M: function returning the dequantized float32 [N, K]}; the
      result is cast to the dtype of the source `M.weight`.

  Returns:
    every source tensor, with `M.weight` replaced for the given modules.
  """
  out = []
  for name in source.names():
    module = name[:-len(".weight")] if name.endswith(".weight") else None
    if module not in weights:
      out.append(OutTensor.copy_of(source, name))
      continue
    e = source.entries[name]
    dtype = tensor_io.DTYPES[e.dtype]

    def data(fn=weights[module], dtype=dtype, shape=e.shape):
      w = np.asarray(fn(), np.float32)
      if w.shape != shape:
        raise ValueError(f"dequantized {module} has shape {w.shape}, expected {shape}")
      return np.ascontiguousarray(w.astype(dtype)).tobytes()

    out.append(OutTensor(name, e.dtype, e.shape, e.nbytes, data))
  return out


def anyprec_section(method: str, bits: dict, modules: dict[str, tuple[int, int]],
                    calibration: dict | None, extra: dict) -> dict:
  """The "anyprec" section of config.json.

  Args:
    method: "anyprec", "independent" or "rtn".
    bits: {"seed_bits": s, "parent_bits": p} or {"bits": b}.
    modules: {M: (out_features, in_features)}.
    calibration: provenance of the Fisher pass (None for rtn).
    extra: further fields (lut dtype, quantizer options, source model).
  """
  return {
      "format_version": FORMAT_VERSION, "method": method, **bits, **extra,
      "quantized_modules": {m: {"in_features": k, "out_features": n}
                            for m, (n, k) in modules.items()},
      "calibration": calibration,
  }
