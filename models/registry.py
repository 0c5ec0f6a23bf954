"""Architecture registry: HF `model_type` -> `ArchSpec`."""

from __future__ import annotations

from models import llama, mistral, opt
from models.config import Arch, ModelConfig
from models.mapping import ArchSpec

SPECS: dict[Arch, ArchSpec] = {
    Arch.LLAMA: llama.SPEC,
    Arch.MISTRAL: mistral.SPEC,
    Arch.OPT: opt.SPEC,
}

_BY_MODEL_TYPE = {t: spec for spec in SPECS.values() for t in spec.model_types}


def supported_model_types() -> list[str]:
  return sorted(_BY_MODEL_TYPE)


def spec_for(model_type: str) -> ArchSpec:
  """The `ArchSpec` for an HF `model_type`; clear error for unknown ones."""
  if model_type not in _BY_MODEL_TYPE:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                     f"{', '.join(supported_model_types())}")
  return _BY_MODEL_TYPE[model_type]


def config_from_hf(d: dict) -> ModelConfig:
  """HF `config.json` dict -> `ModelConfig`.

  Args:
    d: the parsed `config.json`.

  Returns:
    The frozen `ModelConfig` (`cfg.arch` says which architecture).

  Raises:
    ValueError: unknown `model_type` (the message lists the supported ones).
  """
  model_type = d.get("model_type")
  if model_type is None:
    raise ValueError(f"config has no model_type; supported: "
                     f"{', '.join(supported_model_types())}")
  return spec_for(model_type).config_from_hf(d)
