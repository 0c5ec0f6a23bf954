"""The allocation fields of an any-precision checkpoint: errors per width, allocations.

At quantization time (`pipeline.quantize_model`) and again later from a checkpoint, its
source weights and a Fisher pass (`scripts/allocate.py`), every quantized module M gets
its Fisher-weighted error at every width, E_M(b) = sum F (W - W_b)^2 with the LUTs as
stored, and the optimal allocation (`anyprec_jax.allocation`, per fusion group) of each
target average precision is computed from them. Both go into config.json:

    "anyprec": {...,
      "fisher_errors": {"widths": [3, ..., 8], "calibration": {...},
                        "modules": {M: [E(3), ..., E(8)], ...}},
      "allocations": [{"target": 3.5, "method": "optimal", "bits": {M: b, ...},
                       "bytes": ..., "budget_bytes": ..., "average_bits": ...,
                       "objective": ..., "exact": true}, ...]}

A module's bytes at b are not stored: they follow from its shape and the LUT dtype
(`allocation.module_bytes`). The runtime reads these fields (`checkpoint_reader`) and
computes targets that are not stored from `fisher_errors`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

from anyprec_jax import allocation, errors
from anyprec_jax import format as fmt
from anyprec_jax.quantize import tensor_io


def module_errors(w: np.ndarray, f: np.ndarray, planes: np.ndarray,
                  luts: Mapping[int, np.ndarray], parent_bits: int) -> list[float]:
  """[E(b) for b in sorted(luts)] of one module from its stored planes and LUTs.

  Args:
    w: source weight [N, K]; f: Fisher information [N, K].
    planes: uint32 [parent_bits, N, ceil(K/32)]; luts: {b: [N, 2^b]}.
  """
  codes = fmt.unpack_codes_np(planes, parent_bits, w.shape[1])  # [N, K]
  return list(allocation.fisher_errors(w, f, codes, luts, parent_bits).values())


def index_errors(source: tensor_io.TensorIndex, fisher: tensor_io.TensorIndex,
                 quantized: tensor_io.TensorIndex, modules: Sequence[str],
                 widths: Sequence[int], parent_bits: int) -> dict[str, list[float]]:
  """{module: [E(b) for b in widths]} (one module in memory at a time).

  Args:
    source: tensors holding `M.weight`; fisher: tensors named `M`; quantized: tensors
      holding `M.planes` and `M.lut{b}`.
  """
  out = {}
  for m in modules:
    w = source.array(f"{m}.weight").astype(np.float32)
    out[m] = module_errors(w, fisher.array(m), quantized.array(f"{m}.planes"),
                           {b: quantized.array(f"{m}.lut{b}") for b in widths},
                           parent_bits)
  return out


def section_fields(module_errors_: Mapping[str, Sequence[float]],
                   shapes: Mapping[str, tuple[int, int]], cfg, seed_bits: int,
                   parent_bits: int, lut_itemsize: int, calibration: dict | None,
                   targets: Sequence[float] | None = None) -> dict:
  """The `fisher_errors` and `allocations` fields of the anyprec section.

  Args:
    module_errors_: {module: [E(b) for b in seed..parent]}.
    shapes: {module: (in_features, out_features)}.
    cfg: the model config (fusion groups).
    seed_bits, parent_bits, lut_itemsize: of the checkpoint.
    calibration: provenance of the Fisher pass.
    targets: averages to store; None: `allocation.default_targets`.
  """
  widths = list(range(seed_bits, parent_bits + 1))
  targets = allocation.default_targets(seed_bits, parent_bits) if targets is None else targets
  problem = allocation.make_problem(shapes, widths, allocation.fusion_groups(cfg, list(shapes)),
                                    module_errors_, lut_itemsize)
  allocs = allocation.allocate(problem, sorted(float(t) for t in targets))
  return {"fisher_errors": {"widths": widths, "calibration": calibration,
                            "modules": {m: [float(e) for e in v]
                                        for m, v in module_errors_.items()}},
          "allocations": [a.to_json() for a in allocs]}


def recompute(checkpoint_dir, source_dir, fisher_dir,
              targets: Sequence[float] | None = None, calibration: dict | None = None
              ) -> dict:
  """Recomputes the errors and allocations of a checkpoint and rewrites its
  config.json (atomically) with them.

  Args:
    checkpoint_dir: an any-precision checkpoint.
    source_dir: the model it was quantized from (None: `anyprec.source_model`).
    fisher_dir: a Fisher pass (the `fisher-*` folder of the quantizer's cache: one
      safetensors file per layer, tensors named by module).
    targets: averages to store; None: the default quarter steps.
    calibration: provenance to record (None: the folder and its complete.json).

  Returns:
    The new anyprec section.

  Raises:
    errors.MissingInputError: a directory without the expected files.
  """
  import models  # noqa: PLC0415 (slow import)
  from anyprec_jax import checkpoint_reader as reader  # noqa: PLC0415
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  config = reader.read_config(checkpoint_dir)
  meta = reader.parse_meta(config, checkpoint_dir)
  cfg = models.hf_loader.parse_config(config, checkpoint_dir)
  source_dir = pathlib.Path(source_dir or config["anyprec"].get("source_model") or "")
  indexes = []
  for what, directory, pattern in (("source model", source_dir, "*.safetensors"),
                                   ("checkpoint", checkpoint_dir, "*.safetensors"),
                                   ("Fisher pass", pathlib.Path(fisher_dir), "*.safetensors")):
    files = sorted(directory.glob(pattern)) if directory.is_dir() else []
    if not files:
      raise errors.MissingInputError(f"no safetensors files in {directory} (the {what})")
    indexes.append(tensor_io.TensorIndex(files))
  source, quantized, fisher = indexes
  errs = index_errors(source, fisher, quantized, list(meta.modules), meta.precisions,
                      meta.parent_bits)
  if calibration is None:
    done = pathlib.Path(fisher_dir) / "complete.json"
    calibration = {"fisher_dir": str(fisher_dir),
                   **(json.loads(done.read_text()) if done.is_file() else {})}
  fields = section_fields(errs, meta.modules, cfg, meta.seed_bits, meta.parent_bits,
                          meta.lut_itemsize, calibration, targets)
  config["anyprec"].update(fields)
  tensor_io.write_bytes_atomic(checkpoint_dir / "config.json",
                               (json.dumps(config, indent=2) + "\n").encode())
  return config["anyprec"]
