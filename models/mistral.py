"""Mistral (Jiang et al., 2023): Llama plus sliding-window attention.

The only true difference from Llama is `sliding_window` (a query at slot q attends to
keys k with q - window < k <= q), which the shared decoder applies in the mask of both
prefill and cached decode. Tensor names are Llama's.
"""

from __future__ import annotations

import dataclasses

from models import llama
from models.config import Arch, ModelConfig
from models.mapping import ArchSpec


def config_from_hf(d: dict) -> ModelConfig:
  """Parses a Mistral HF config dict (`sliding_window` may be null: no window).

  Args:
    d: the `config.json` contents.

  Returns:
    The `ModelConfig`.
  """
  cfg = llama.config_from_hf(d, arch=Arch.MISTRAL)
  window = d.get("sliding_window")
  if d.get("use_sliding_window") is False:
    window = None
  return dataclasses.replace(cfg, sliding_window=None if window is None else int(window))


SPEC = ArchSpec(
    model_types=("mistral",),
    config_from_hf=config_from_hf,
    rules=llama.RULES,
    ignored=llama.IGNORED,
    linear_modules=llama.SPEC.linear_modules,
)
