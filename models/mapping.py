"""Hugging Face tensor name <-> parameter path tables (one per architecture).

A `ParamRule` maps one family of HF tensor names, e.g.
`model.layers.{i}.self_attn.q_proj.weight`, to a path in the Flax params tree,
e.g. `layers_{i}/attn/q_proj/weight`, with the expected shape as a function of the
config. The same table drives loading (HF name -> path, shape assertion), the
missing-key check (every path the config needs) and `get_param` (module name -> path).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator

from models.config import ModelConfig

Shape = tuple[int, ...]


def _always(_: ModelConfig) -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """One HF tensor name template and its parameter path.

  `{i}` in both templates stands for the layer index.
  """
  hf: str
  path: str
  shape: Callable[[ModelConfig], Shape]
  when: Callable[[ModelConfig], bool] = _always

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def regex(self) -> re.Pattern:
    return re.compile(re.escape(self.hf).replace(re.escape("{i}"), r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class IgnoreRule:
  """HF tensor names that are legitimately present but not parameters."""
  pattern: str
  reason: str
  when: Callable[[ModelConfig], bool] = _always


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """What the shared loader and decoder need to know about one architecture.

  Attributes:
    model_types: HF `model_type` values handled.
    config_from_hf: parses an HF config dict.
    rules: HF name -> param path table.
    ignored: names to skip (buffers, duplicated tied weights).
    prefix_aliases: (old, new) HF name prefixes rewritten before matching.
    linear_modules: per-layer HF module names of the quantizable linears, in order.
  """
  model_types: tuple[str, ...]
  config_from_hf: Callable[[dict], ModelConfig]
  rules: tuple[ParamRule, ...]
  ignored: tuple[IgnoreRule, ...] = ()
  prefix_aliases: tuple[tuple[str, str], ...] = ()
  linear_modules: tuple[str, ...] = ()


def expected_keys(spec: ArchSpec, cfg: ModelConfig) -> Iterator[tuple[str, str, Shape]]:
  """Every (hf_name, path, shape) the config needs, in table order."""
  for rule in spec.rules:
    if not rule.when(cfg):
      continue
    layers = range(cfg.num_layers) if rule.per_layer else [None]
    for i in layers:
      fmt = {} if i is None else {"i": i}
      yield rule.hf.format(**fmt), rule.path.format(**fmt), rule.shape(cfg)


def canonical_name(spec: ArchSpec, name: str) -> str:
  """Applies the architecture's prefix aliases (e.g. OPT's bare `decoder.`)."""
  for old, new in spec.prefix_aliases:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def match(spec: ArchSpec, cfg: ModelConfig | None, name: str):
  """Maps one HF tensor name.

  Args:
    spec: the architecture.
    cfg: the config (rules whose `when` is false do not match); None: all rules.
    name: HF tensor name (already canonical).

  Returns:
    (path, shape or None) for a parameter, "ignore" for an ignorable name, or None.
  """
  for rule in spec.rules:
    m = rule.regex().match(name)
    if m and (cfg is None or rule.when(cfg)):
      fmt = {"i": int(m.group(1))} if rule.per_layer else {}
      return rule.path.format(**fmt), (None if cfg is None else rule.shape(cfg))
  for ign in spec.ignored:
    if re.fullmatch(ign.pattern, name) and (cfg is None or ign.when(cfg)):
      return "ignore"
  return None
