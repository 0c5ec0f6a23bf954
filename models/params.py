"""Params tree access by Hugging Face module name.

The params tree is a nested dict (`layers_0/attn/q_proj/weight`, ...); HF module
names (`model.layers.0.self_attn.q_proj`) are translated through the architecture
tables in `models/llama.py`, `mistral.py`, `opt.py`, so quantizer and runtime can
address weights by the names they store in checkpoints.
"""

from __future__ import annotations

from typing import Any, Mapping

from models import mapping, registry
from models.config import FUSED_ATTN, FUSED_MLP, ModelConfig


def linear_names(cfg: ModelConfig) -> list[str]:
  """HF module names of every quantizable linear, in layer order.

  All linears inside decoder layers; not embeddings, lm_head or OPT's projections.

  Args:
    cfg: the model config.

  Returns:
    e.g. ["model.layers.0.self_attn.q_proj", ..., "model.layers.{L-1}.mlp.down_proj"].
  """
  spec = registry.SPECS[cfg.arch]
  return [t.format(i=i) for i in range(cfg.num_layers) for t in spec.linear_modules]


def _lookup(tree, path: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(path)
    node = node[part]
  return node


def param_path(params, hf_module_name: str, leaf: str = "weight") -> str:
  """Path in `params` of `<hf_module_name>.<leaf>`; KeyError if absent."""
  for spec in registry.SPECS.values():
    name = mapping.canonical_name(spec, f"{hf_module_name}.{leaf}")
    found = mapping.match(spec, None, name)
    if isinstance(found, tuple):
      try:
        _lookup(params, found[0])
        return found[0]
      except KeyError:
        continue
  raise KeyError(f"no parameter for HF name {hf_module_name}.{leaf!r} in params")


def get_param(params, hf_module_name: str):
  """The `weight` of an HF module: dense [N, K] array or `AnyPrecWeight`.

  Args:
    params: params tree.
    hf_module_name: e.g. "model.layers.0.self_attn.q_proj".

  Returns:
    The stored leaf (not copied).
  """
  return _lookup(params, param_path(params, hf_module_name))


def _set(tree: Mapping, parts: list[str], value) -> dict:
  new = dict(tree)
  new[parts[0]] = value if len(parts) == 1 else _set(tree[parts[0]], parts[1:], value)
  return new


def replace_params(params, new_weights: Mapping[str, Any]):
  """Returns params with some module weights replaced (pure; `params` is unchanged).

  Args:
    params: params tree.
    new_weights: {hf_module_name: dense [N, K] array or `AnyPrecWeight`}.

  Returns:
    A new tree sharing every untouched leaf with `params`.
  """
  out = params
  for name, value in new_weights.items():
    out = _set(out, param_path(out, name).split("/"), value)
  return out


def fused_path(path: str) -> str:
  """Path of the weight that holds `path` once `fuse_projections` fused its layer,
  e.g. "layers_0/attn/q_proj/weight" -> "layers_0/attn/qkv_proj/weight"; paths
  outside q/k/v and gate/up are returned as they are."""
  parts = path.split("/")
  for block, (fused, names) in (("attn", FUSED_ATTN), ("mlp", FUSED_MLP)):
    if len(parts) >= 3 and parts[-3] == block and parts[-2] in names:
      return "/".join(parts[:-2] + [fused, parts[-1]])
  return path


def fuse_projections(params, concat_rows, mlp: bool = False):
  """Returns params with each layer's q/k/v (and gate/up) weights stored as one.

  The decoder runs a fused weight as one product and splits its output
  (`config.FUSED_ATTN`, `FUSED_MLP`): one kernel launch instead of three (two), for
  the same bytes. Layers whose parts `concat_rows` refuses (returns None) stay as
  they are.

  Args:
    params: params tree (not modified).
    concat_rows: parts' weights -> their row concatenation or None (e.g.
      `weight.concat_rows`, which fuses any-precision weights only).
    mlp: also fuse gate/up (`runtime.fuse_projections` does: in GPU time one
      22016-row GEMV beats two 11008-row ones by 8-16 % on the H200, kernels_tc.md
      step 10; step 5 had judged it slower on the wall clock).

  Returns:
    A new tree; untouched leaves are shared.
  """
  def visit(node):
    if not isinstance(node, Mapping):
      return node
    node = {k: visit(v) for k, v in node.items()}
    for block, (fused, parts) in (("attn", FUSED_ATTN), ("mlp", FUSED_MLP))[:1 + mlp]:
      sub = node.get(block)
      if not isinstance(sub, Mapping) or not all(p in sub for p in parts):
        continue
      w = concat_rows([sub[p]["weight"] for p in parts])
      biases = [sub[p].get("bias") for p in parts]
      if w is None or (any(b is not None for b in biases)
                       and any(b is None for b in biases)):
        continue
      new = {"weight": w}
      if biases[0] is not None:
        import jax.numpy as jnp  # Local: this module is otherwise array-free.
        new["bias"] = jnp.concatenate(biases)
      node[block] = {k: v for k, v in sub.items() if k not in parts} | {fused: new}
    return node

  return visit(params)
