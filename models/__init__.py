"""Flax ports of Llama, Mistral and OPT sharing one decoder.

Public API (see docs/ARCHITECTURE.md, "Models"):
  load_pretrained(path_or_hub_id, dtype) -> (cfg, params)
  config_from_hf(dict) -> ModelConfig
  forward(cfg, params, input_ids, attention_mask=None) -> logits [B, T, V] float32
  linear_names(cfg), get_param(params, name), replace_params(params, {name: w})
  generate(cfg, params, input_ids, attention_mask, max_new_tokens=..., ...)
  timed_generate / prefill / decode / decode_step: the pieces, for timing and reuse.

Note: `models.generate` is the function; import the module's other names from here
or with `from models.generate import ...`.
"""

from models.aliases import ALIASES, resolve_alias
from models.config import Arch, ModelConfig, RopeScaling, RopeType
from models.decoder import Decoder, KVCache, forward
from models.generate import (GenerationResult, SamplingConfig, Timing, decode,
                             decode_step, generate, prefill, timed_generate)
from models.hf_loader import (CheckpointError, load_config, load_pretrained,
                              resolve_model_dir)
from models.params import get_param, linear_names, replace_params
from models.registry import config_from_hf, supported_model_types
