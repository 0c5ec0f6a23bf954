"""The one Hugging Face checkpoint loader, driven by the per-architecture tables.

`load_pretrained(path_or_hub_id, dtype)` reads `config.json`, validates every tensor
name and shape in the (single or sharded) safetensors files against the architecture's
`ParamRule` table *before* reading any data, then streams tensors one at a time
(`safe_open`, memory-mapped) into the params tree, so peak host memory stays about one
copy of the model.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from anyprec_jax import errors
from models import mapping, registry
from models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
_MAX_LISTED = 10


class CheckpointError(errors.BadInputError):
  """A checkpoint that is unreadable or does not match the architecture's table."""


def open_safetensors(file: pathlib.Path, opener=None):
  """`safe_open(file)` (or `opener`), a damaged file reported as a `CheckpointError`
  naming it (safetensors' own messages name no file)."""
  try:
    return (opener or safe_open)(str(file), framework="numpy")
  except FileNotFoundError as e:
    raise errors.MissingInputError(f"{file} not found") from e
  except SafetensorError as e:
    raise CheckpointError(
        f"{file}: not a readable safetensors file ({e})",
        hint="the file is damaged or truncated; copy or convert it again") from e


def resolve_model_dir(path_or_hub_id: str | pathlib.Path) -> pathlib.Path:
  """Local directory of a model: the path itself, or a hub snapshot.

  Args:
    path_or_hub_id: local directory, or a Hugging Face hub id (downloaded with
      `huggingface_hub.snapshot_download` only when no such local path exists).

  Returns:
    The directory holding `config.json`.

  Raises:
    errors.MissingInputError (a FileNotFoundError): not local and not downloadable
      (e.g. offline).
  """
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.exists():
    if not path.is_dir():
      raise errors.MissingInputError(f"{path} is not a directory")
    return path
  if path.is_absolute() or str(path_or_hub_id).startswith((".", "~")):
    raise errors.MissingInputError(f"{path} is not a local directory (no such path) "
                                   "and cannot be a hub id")
  try:
    from huggingface_hub import snapshot_download
    return pathlib.Path(snapshot_download(repo_id=str(path_or_hub_id),
                                          allow_patterns=HUB_PATTERNS))
  except Exception as e:  # noqa: BLE001 (hub errors have many types)
    raise errors.MissingInputError(
        f"{str(path_or_hub_id)!r} is not a local directory and could not be fetched "
        f"from the Hugging Face hub ({type(e).__name__}: {e}). Offline? Pass a local "
        f"directory, or pre-populate the hub cache and set HF_HUB_OFFLINE=1.") from e


def read_json(path: pathlib.Path) -> dict:
  """A JSON object from a file; errors name the file and the position.

  Raises:
    errors.MissingInputError: no such file.
    CheckpointError: not UTF-8 JSON, or not an object.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingInputError(f"{path} not found")
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})",
                          hint="fix or restore the file") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} holds a JSON {type(d).__name__}, not an object")
  return d


def read_hf_config(model_dir: pathlib.Path) -> dict:
  """The parsed `config.json` of a model directory (errors name the file)."""
  return read_json(pathlib.Path(model_dir) / "config.json")


def parse_config(d: dict, model_dir) -> ModelConfig:
  """`registry.config_from_hf(d)` with errors naming `model_dir`/config.json.

  Raises:
    CheckpointError: unknown model_type (listing the supported ones), missing or
      inconsistent fields.
    NotImplementedError: a known architecture with an unsupported option (e.g. yarn).
  """
  where = pathlib.Path(model_dir) / "config.json"
  try:
    return registry.config_from_hf(d)
  except NotImplementedError:
    raise
  except KeyError as e:
    raise CheckpointError(f"{where}: missing field {e}") from e
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{where}: {e}") from e


def _check_not_anyprec(d: dict, model_dir) -> None:
  method = (d.get("anyprec") or {}).get("method")
  if method == "anyprec":
    raise CheckpointError(
        f"{model_dir} is an any-precision checkpoint (bitplanes, no dense weights); "
        "load it with anyprec_jax.runtime.AnyPrecisionForCausalLM.from_quantized")


def safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors shards of a directory (index file first, else the single file)."""
  model_dir = pathlib.Path(model_dir)
  index = model_dir / INDEX_FILE
  if index.exists():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index} has no weight_map")
    files = [model_dir / f for f in sorted(set(map(str, weight_map.values())))]
    for f in files:
      if not f.is_file():
        raise errors.MissingInputError(f"{f} (listed in {index}) not found")
    return files
  if (model_dir / SINGLE_FILE).exists():
    return [model_dir / SINGLE_FILE]
  found = sorted(model_dir.glob("*.safetensors"))
  if not found:
    raise errors.MissingInputError(
        f"no safetensors weights in {model_dir} (only safetensors are read; convert "
        "*.bin checkpoints with transformers' save_pretrained(safe_serialization=True))")
  return found


def _in(tensors: dict) -> str:
  dirs = sorted({str(pathlib.Path(file).parent) for file, _ in tensors.values()})
  return f" {dirs[0]}" if len(dirs) == 1 else ""


def _listed(names: Iterable[str]) -> str:
  names = list(names)
  more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def plan_load(spec: mapping.ArchSpec, cfg: ModelConfig,
              tensors: dict[str, tuple[pathlib.Path, tuple[int, ...]]]):
  """Validates checkpoint tensor names/shapes against the table.

  Args:
    spec: the architecture.
    cfg: the config.
    tensors: {hf_name: (file, shape)} of every tensor in the checkpoint.

  Returns:
    {path: (hf_name, file)} for every parameter to load.

  Raises:
    CheckpointError: naming unexpected, duplicated, wrongly shaped or missing keys.
  """
  plan, unexpected = {}, []
  for name, (file, shape) in tensors.items():
    found = mapping.match(spec, cfg, mapping.canonical_name(spec, name))
    if found == "ignore":
      continue
    if found is None:
      unexpected.append(name)
      continue
    path, want = found
    if path in plan:
      raise CheckpointError(f"keys {plan[path][0]!r} and {name!r} both map to {path}")
    if tuple(shape) != tuple(want):
      raise CheckpointError(
          f"key {name!r} in {file} has shape {tuple(shape)}, expected {tuple(want)} for "
          "this config")
    plan[path] = (name, file)
  expected = {path: hf for hf, path, _ in mapping.expected_keys(spec, cfg)}
  unexpected += [plan.pop(p)[0] for p in list(plan) if p not in expected]
  if unexpected:
    raise CheckpointError(f"unexpected keys in checkpoint{_in(tensors)}: "
                          f"{_listed(sorted(unexpected))}")
  missing = [hf for path, hf in expected.items() if path not in plan]
  if missing:
    raise CheckpointError(f"missing keys in checkpoint{_in(tensors)}: {_listed(missing)}")
  return plan


def _scan(files: list[pathlib.Path]) -> dict:
  tensors = {}
  for file in files:
    with open_safetensors(file) as f:
      for name in f.keys():
        tensors[name] = (file, tuple(f.get_slice(name).get_shape()))
  return tensors


def insert_param(tree: dict, path: str, value) -> None:
  """tree["a"]["b"]... = value for path "a/b/..." (creating the sub-dicts)."""
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def load_params(model_dir: pathlib.Path, cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """Streams the safetensors of `model_dir` into a params tree.

  Args:
    model_dir: local HF directory.
    cfg: its config (from `config_from_hf`).
    dtype: floating dtype of every parameter (bf16 / fp16 / fp32).

  Returns:
    Nested dict params tree (HF [out, in] layout for linears).
  """
  spec = registry.SPECS[cfg.arch]
  plan = plan_load(spec, cfg, _scan(safetensors_files(model_dir)))
  by_file: dict[pathlib.Path, list[tuple[str, str]]] = {}
  for path, (name, file) in plan.items():
    by_file.setdefault(file, []).append((path, name))
  params: dict = {}
  for file, items in by_file.items():
    with open_safetensors(file) as f:
      for path, name in items:
        host = f.get_tensor(name)  # One tensor at a time (memory-mapped file).
        arr = jnp.asarray(host)
        if jnp.issubdtype(arr.dtype, jnp.floating):
          arr = arr.astype(dtype)
        insert_param(params, path, arr)
        del host
  return params


def load_config(path_or_hub_id) -> tuple[ModelConfig, pathlib.Path]:
  """(cfg, local dir) of a model directory or hub id, without reading weights."""
  model_dir = resolve_model_dir(path_or_hub_id)
  d = read_hf_config(model_dir)
  _check_not_anyprec(d, model_dir)
  return parse_config(d, model_dir), model_dir


def load_pretrained(path_or_hub_id, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face Llama / Mistral / OPT checkpoint.

  Also loads the fake-quantized baseline directories (`anyprec.method` independent /
  rtn), which are plain HF directories.

  Args:
    path_or_hub_id: local directory or hub id.
    dtype: parameter dtype, e.g. jnp.bfloat16, jnp.float16, jnp.float32.

  Returns:
    (cfg, params).
  """
  cfg, model_dir = load_config(path_or_hub_id)
  return cfg, load_params(model_dir, cfg, dtype)


def param_shapes(params) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a params tree (for tests and debugging)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in kp): tuple(np.shape(v)) for kp, v in flat}
