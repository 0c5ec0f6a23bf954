"""Reading side of the any-precision checkpoint format (docs/ARCHITECTURE.md).

A quantized directory holds, for each quantized module M, `M.planes` uint32
[P, N, ceil(K/32)] (P = parent bits, plane 0 = MSB; Park et al., 2024, §3.2) and
`M.lut{b}` [N, 2**b] for b in seed..parent; every other tensor is unchanged under its
Hugging Face name. Loading a subset of precisions reads only `M.planes[:max(bits)]`
and the LUTs of those precisions, through `safetensors.safe_open(...).get_slice`, so
the unneeded planes and tables never leave the file.

Unquantized tensors are validated and placed by the foundation's per-architecture
tables (`models.hf_loader.plan_load`): each quantized module stands in the plan as its
`M.weight` of shape [N, K].
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
from typing import Iterable

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from anyprec_jax import allocation, errors, weight
from anyprec_jax import format as fmt
from anyprec_jax.weight import AnyPrecWeight, as_precision, as_precisions  # noqa: F401
from models import hf_loader, registry
from models.config import ModelConfig

FORMAT_VERSION = 1
_LUT = re.compile(r"^(.*)\.lut(\d+)$")
_PLANES = re.compile(r"^(.*)\.planes$")


class QuantizedCheckpointError(hf_loader.CheckpointError):
  """A directory that is not a readable any-precision checkpoint."""


@dataclasses.dataclass(frozen=True)
class AnyPrecMeta:
  """The `anyprec` section of config.json.

  Attributes:
    seed_bits, parent_bits: the precision range; every b in between is valid.
    lut_dtype: storage dtype of the LUTs ("float16", "bfloat16", "float32").
    modules: {hf_module_name: (in_features K, out_features N)}.
    calibration: provenance of the Fisher statistics (free-form).
    fisher_errors: {module: (E(seed), ..., E(parent))}, sum F (W - W_b)^2 per width
      (`allocation.fisher_errors`), or None when the checkpoint has none.
    allocations: the stored optimal allocations, {target: `allocation.Allocation`}.
  """
  seed_bits: int
  parent_bits: int
  lut_dtype: str
  modules: dict[str, tuple[int, int]]
  calibration: dict
  fisher_errors: dict[str, tuple[float, ...]] | None = None
  allocations: dict[float, allocation.Allocation] = dataclasses.field(default_factory=dict)

  @property
  def precisions(self) -> tuple[int, ...]:
    return tuple(range(self.seed_bits, self.parent_bits + 1))

  @property
  def lut_itemsize(self) -> int:
    return 4 if self.lut_dtype == "float32" else 2


def parse_meta(config: dict, model_dir=None) -> AnyPrecMeta:
  """Parses and checks the `anyprec` section of an HF config dict.

  Raises:
    QuantizedCheckpointError: no section, another method (a baseline directory), an
      unknown format version, or invalid fields ("invalid checkpoint: ...", e.g.
      seed_bits > parent_bits).
  """
  sec = config.get("anyprec")
  where = f" in {model_dir}" if model_dir else ""
  if not sec:
    raise QuantizedCheckpointError(
        f"no 'anyprec' section in config.json{where}: not a quantized checkpoint "
        "(load plain models with models.load_pretrained)")
  if not isinstance(sec, dict):
    raise QuantizedCheckpointError(
        f"invalid checkpoint: config.json{where}: 'anyprec' is a "
        f"{type(sec).__name__}, not an object")
  if sec.get("method", "anyprec") != "anyprec":
    raise QuantizedCheckpointError(
        f"config.json{where} is a {sec['method']!r} baseline (dense fake-quantized "
        "weights): load it with models.load_pretrained")
  if sec.get("format_version") != FORMAT_VERSION:
    raise QuantizedCheckpointError(
        f"format_version {sec.get('format_version')!r}{where}; this reader knows "
        f"{FORMAT_VERSION}")
  invalid = f"invalid checkpoint: config.json{where}: anyprec"
  seed, parent = sec.get("seed_bits"), sec.get("parent_bits")
  for key, value in (("seed_bits", seed), ("parent_bits", parent)):
    if not weight.is_int(value) or not fmt.MIN_BITS <= value <= fmt.MAX_BITS:
      raise QuantizedCheckpointError(
          f"{invalid}.{key} is {value!r}; expected an int in {fmt.MIN_BITS}..{fmt.MAX_BITS}")
  if seed > parent:
    raise QuantizedCheckpointError(
        f"{invalid}.seed_bits ({seed}) > parent_bits ({parent}): the range of "
        "precisions is empty; the file was damaged or written by another tool")
  try:
    modules = {str(name): (int(m["in_features"]), int(m["out_features"]))
               for name, m in sec["quantized_modules"].items()}
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise QuantizedCheckpointError(
        f"{invalid}.quantized_modules is malformed ({type(e).__name__}: {e}); expected "
        "{module: {in_features, out_features}}") from e
  meta = AnyPrecMeta(seed_bits=seed, parent_bits=parent,
                     lut_dtype=str(sec.get("lut_dtype", "float16")), modules=modules,
                     calibration=dict(sec.get("calibration") or {}))
  return dataclasses.replace(meta, fisher_errors=_parse_errors(sec, meta, invalid),
                             allocations=_parse_allocations(sec, meta, invalid))


def _parse_errors(sec: dict, meta: AnyPrecMeta, invalid: str):
  """`anyprec.fisher_errors` ({"widths": [seed..parent], "modules": {M: [E(b)]}})."""
  if sec.get("fisher_errors") is None:
    return None
  try:
    widths = tuple(int(b) for b in sec["fisher_errors"]["widths"])
    errs = {str(m): tuple(float(e) for e in v)
            for m, v in sec["fisher_errors"]["modules"].items()}
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise QuantizedCheckpointError(
        f"{invalid}.fisher_errors is malformed ({type(e).__name__}: {e}); expected "
        "{widths: [...], modules: {module: [E per width]}}") from e
  if widths != meta.precisions or set(errs) != set(meta.modules) or any(
      len(v) != len(widths) or not all(np.isfinite(v)) for v in errs.values()):
    raise QuantizedCheckpointError(
        f"{invalid}.fisher_errors does not hold one finite error per width "
        f"{meta.seed_bits}..{meta.parent_bits} for every quantized module")
  return errs


def _parse_allocations(sec: dict, meta: AnyPrecMeta, invalid: str):
  """`anyprec.allocations` (a list of `Allocation.to_json`), checked against the
  modules and the widths."""
  out = {}
  for i, entry in enumerate(sec.get("allocations") or ()):
    where = f"{invalid}.allocations[{i}]"
    try:
      a = allocation.Allocation.from_json(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise QuantizedCheckpointError(f"{where} is malformed ({type(e).__name__}: {e})") from e
    if set(a.bits) != set(meta.modules):
      raise QuantizedCheckpointError(f"{where} does not name every quantized module")
    if not (meta.seed_bits <= a.target <= meta.parent_bits
            and all(b in meta.precisions for b in a.bits.values())):
      raise QuantizedCheckpointError(
          f"{where} (target {a.target}) uses widths outside {meta.seed_bits}.."
          f"{meta.parent_bits}")
    if a.method == allocation.Method.OPTIMAL.value:
      out[a.target] = a
  return out


def allocation_for(meta: AnyPrecMeta, cfg: ModelConfig, target: float,
                   method: allocation.Method = allocation.Method.OPTIMAL,
                   model_dir=None) -> allocation.Allocation:
  """The per-module widths of a fractional precision.

  OPTIMAL: the stored allocation of `target` (`anyprec.allocations`), else one
  computed now from the stored `anyprec.fisher_errors` (the same exact knapsack, per
  fusion group). RANDOM: the equal-bytes baseline (no errors needed).

  Raises:
    errors.UsageError: target below the seed / above the parent, or no stored
      allocation and no stored errors to compute one (says how to add them).
  """
  allocation.check_target(target, meta.seed_bits, meta.parent_bits)
  if method is allocation.Method.OPTIMAL and target in meta.allocations:
    return meta.allocations[target]
  if method is allocation.Method.OPTIMAL and meta.fisher_errors is None:
    where = f" {model_dir}" if model_dir else ""
    raise errors.UsageError(
        f"precision {target}: the checkpoint{where} has no stored allocation for it and "
        "no anyprec.fisher_errors to compute one; add them with scripts/allocate.py "
        "--model=CHECKPOINT --fisher_dir=... (stored: "
        f"{sorted(meta.allocations) or 'none'})")
  problem = allocation.make_problem(
      meta.modules, meta.precisions, allocation.fusion_groups(cfg, list(meta.modules)),
      meta.fisher_errors, meta.lut_itemsize)
  return allocation.allocate(problem, [target], method)[0]


def check_precisions(meta: AnyPrecMeta, precisions: Iterable[int] | int | None
                     ) -> tuple[int | float, ...]:
  """Sorted requested precisions (all integer widths when None); error listing the
  supported ones. Fractional precisions must lie between the seed and the parent.

  Raises:
    errors.UsageError: not a number / list of numbers (`weight.as_precisions`), an
      unsupported width, or a fractional one below the seed / above the parent.
  """
  want = weight.as_precisions(precisions)
  if want is None:
    return meta.precisions
  for b in want:
    if weight.is_fractional(b):
      allocation.check_target(b, meta.seed_bits, meta.parent_bits)
  bad = [b for b in want if not weight.is_fractional(b) and b not in meta.precisions]
  if not want:
    raise errors.UsageError(f"no precision asked for; supported: {list(meta.precisions)}")
  if bad:
    raise errors.UsageError(f"precision(s) {bad} not supported by this checkpoint; "
                            f"supported: {list(meta.precisions)}")
  return want


def scan_tensors(files: list[pathlib.Path]) -> dict[str, tuple[pathlib.Path, tuple]]:
  """{tensor name: (file, shape)} from the safetensors headers (no data read)."""
  out = {}
  for file in files:
    with hf_loader.open_safetensors(file, safe_open) as f:
      for name in f.keys():
        if name in out:
          raise QuantizedCheckpointError(f"tensor {name!r} in {out[name][0]} and {file}")
        out[name] = (file, tuple(f.get_slice(name).get_shape()))
  return out


def _check_quantized(meta: AnyPrecMeta, tensors: dict, model_dir) -> None:
  bad = f"invalid checkpoint {model_dir}:"
  for name, (k, n) in meta.modules.items():
    want = {f"{name}.planes": (meta.parent_bits, n, fmt.num_words(k))}
    want.update({f"{name}.lut{b}": (n, 1 << b) for b in meta.precisions})
    for key, shape in want.items():
      if key not in tensors:
        raise QuantizedCheckpointError(f"{bad} missing tensor {key!r}")
      if tensors[key][1] != shape:
        raise QuantizedCheckpointError(
            f"{bad} tensor {key!r} in {tensors[key][0].name} has shape "
            f"{tensors[key][1]}, expected {shape}")
    if f"{name}.weight" in tensors:
      raise QuantizedCheckpointError(f"{bad} quantized module {name} also has a dense "
                                     "weight")
  for key in tensors:
    m = _PLANES.match(key) or _LUT.match(key)
    if m and m.group(1) not in meta.modules:
      raise QuantizedCheckpointError(f"{bad} tensor {key!r} of a module not listed in "
                                     "anyprec.quantized_modules")
    lut = _LUT.match(key)
    if lut and int(lut.group(2)) not in meta.precisions:
      raise QuantizedCheckpointError(f"{bad} tensor {key!r} outside seed..parent bits")


def read_weight(get_slice, name: str, in_features: int,
                precisions: tuple[int, ...]) -> AnyPrecWeight:
  """Reads one quantized module.

  Only `name.planes[:max(precisions)]` and `name.lut{b}` for b in `precisions` are read
  (slices of the memory-mapped file).

  Args:
    get_slice: tensor name -> safetensors slice (`safe_open(...).get_slice`).
    name: HF module name.
    in_features: K.
    precisions: sorted precisions to load.

  Returns:
    `AnyPrecWeight` active at max(precisions), planes [max(precisions), N, W].
  """
  top = max(precisions)
  planes = get_slice(f"{name}.planes")[:top]  # [b_max, N, W]
  luts = {b: jnp.asarray(get_slice(f"{name}.lut{b}")[:]) for b in precisions}
  return AnyPrecWeight(planes=jnp.asarray(np.ascontiguousarray(planes, np.uint32)),
                       luts=luts, in_features=in_features, bits=top)


def load_quantized_params(model_dir: pathlib.Path, cfg: ModelConfig, meta: AnyPrecMeta,
                          precisions, dtype=jnp.float32) -> dict:
  """Params tree with `AnyPrecWeight` leaves for the quantized modules.

  Args:
    model_dir: the checkpoint directory.
    cfg: model config.
    meta: its `anyprec` section.
    precisions: integer widths to load (validated), for every module; or
      {module: its widths} (an allocation's modules need only their own).
    dtype: floating dtype of the unquantized tensors (LUTs keep their stored dtype).

  Returns:
    Nested dict params tree, as `models.load_pretrained` builds it.

  Raises:
    QuantizedCheckpointError / models.CheckpointError on any inconsistency.
  """
  tensors = scan_tensors(hf_loader.safetensors_files(model_dir))
  _check_quantized(meta, tensors, model_dir)
  quantized = {f"{name}.weight": (tensors[f"{name}.planes"][0], (n, k))
               for name, (k, n) in meta.modules.items()}
  dense = {key: v for key, v in tensors.items()
           if not (_PLANES.match(key) or _LUT.match(key))}
  plan = hf_loader.plan_load(registry.SPECS[cfg.arch], cfg, {**dense, **quantized})
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(hf_loader.open_safetensors(file, safe_open))
               for file in sorted({file for file, _ in tensors.values()})}

    def get_slice(key: str):
      return handles[tensors[key][0]].get_slice(key)

    for path, (name, file) in plan.items():
      if name in quantized:
        module = name[:-len(".weight")]
        widths = precisions[module] if isinstance(precisions, dict) else precisions
        value = read_weight(get_slice, module, meta.modules[module][0], tuple(widths))
      else:
        value = jnp.asarray(handles[file].get_tensor(name))
        if jnp.issubdtype(value.dtype, jnp.floating):
          value = value.astype(dtype)
      hf_loader.insert_param(params, path, value)
  return params


def read_config(model_dir: pathlib.Path) -> dict:
  """The parsed config.json of a directory (errors name the file)."""
  return hf_loader.read_hf_config(model_dir)
