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

from anyprec_jax import errors, weight
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
  """
  seed_bits: int
  parent_bits: int
  lut_dtype: str
  modules: dict[str, tuple[int, int]]
  calibration: dict

  @property
  def precisions(self) -> tuple[int, ...]:
    return tuple(range(self.seed_bits, self.parent_bits + 1))


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
  return AnyPrecMeta(seed_bits=seed, parent_bits=parent,
                     lut_dtype=str(sec.get("lut_dtype", "float16")), modules=modules,
                     calibration=dict(sec.get("calibration") or {}))


def check_precisions(meta: AnyPrecMeta, precisions: Iterable[int] | int | None
                     ) -> tuple[int, ...]:
  """Sorted requested precisions (all when None); error listing the supported ones.

  Raises:
    errors.UsageError: not an int / list of ints (`weight.as_precisions`), or
      unsupported.
  """
  want = weight.as_precisions(precisions)
  if want is None:
    return meta.precisions
  bad = [b for b in want if b not in meta.precisions]
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
                          precisions: tuple[int, ...], dtype=jnp.float32) -> dict:
  """Params tree with `AnyPrecWeight` leaves for the quantized modules.

  Args:
    model_dir: the checkpoint directory.
    cfg: model config.
    meta: its `anyprec` section.
    precisions: precisions to load (validated).
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
        value = read_weight(get_slice, module, meta.modules[module][0], precisions)
      else:
        value = jnp.asarray(handles[file].get_tensor(name))
        if jnp.issubdtype(value.dtype, jnp.floating):
          value = value.astype(dtype)
      hf_loader.insert_param(params, path, value)
  return params


def read_config(model_dir: pathlib.Path) -> dict:
  """The parsed config.json of a directory (errors name the file)."""
  return hf_loader.read_hf_config(model_dir)
