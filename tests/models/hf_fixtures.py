"""Tiny random Hugging Face models (torch, fp32) saved as safetensors, for parity tests.

Each config is built from the real `transformers` config class; the checkpoint is
written with `save_pretrained(safe_serialization=True)`, so the loader reads exactly
what users' directories hold. Models are cached per process by name.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np

VOCAB = 96
_TMP = tempfile.TemporaryDirectory(prefix="anyprec_models_test_")
TMP_DIR = _TMP.name  # Removed when the process exits.

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)


def _configs():
  from transformers import LlamaConfig, MistralConfig, OPTConfig
  llama = dict(_COMMON, intermediate_size=96, initializer_range=0.1)
  opt = dict(_COMMON, ffn_dim=96, init_std=0.1)
  return {
      # GQA (4 query heads on 2 KV heads), Llama-3 rope scaling, untied head.
      "llama_gqa": LlamaConfig(
          **llama, num_key_value_heads=2, rope_theta=500000.0,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
      # Tied embeddings, attention and MLP biases, MQA.
      "llama_tied_bias": LlamaConfig(**llama, num_key_value_heads=1,
                                     tie_word_embeddings=True, attention_bias=True,
                                     mlp_bias=True),
      # Sliding window (4) shorter than the test sequences.
      "mistral_window": MistralConfig(**llama, num_key_value_heads=2, sliding_window=4),
      # opt-125m style: pre-norm, tied, no projection.
      "opt_125m": OPTConfig(**opt),
      # opt-350m style: projection (word_embed_proj_dim != hidden), post-norm.
      "opt_350m": OPTConfig(**opt, word_embed_proj_dim=32, do_layer_norm_before=False),
  }


NAMES = ("llama_gqa", "llama_tied_bias", "mistral_window", "opt_125m", "opt_350m")


def _perturb_norms(model, seed: int) -> None:
  """Randomizes norm weights/biases (HF inits them to 1/0, which would hide mix-ups)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


@functools.lru_cache(maxsize=None)
def hf_model(name: str, max_shard_size: str | None = None):
  """(torch model in eval mode, checkpoint dir) for one of `NAMES`.

  Args:
    name: a key of the config table.
    max_shard_size: e.g. "40KB" to write a sharded checkpoint with an index file.
  """
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(NAMES.index(name))
  model = AutoModelForCausalLM.from_config(_configs()[name], dtype=torch.float32)
  _perturb_norms(model, NAMES.index(name))
  model.eval()
  out = pathlib.Path(_TMP.name) / f"{name}-{max_shard_size or 'single'}"
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out, safe_serialization=True, **kwargs)
  return model, out


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
  """Reference logits [B, T, V] (float32 numpy) from the torch model."""
  import torch
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(input_ids), dtype=torch.long), **kwargs)
  return out.logits.float().numpy()


def random_ids(seed: int, shape, low: int = 3) -> np.ndarray:
  """Token ids in [low, VOCAB) (avoids pad/bos/eos)."""
  return np.random.RandomState(seed).randint(low, VOCAB, shape).astype(np.int32)


def left_padded(rows):
  """[B, T] ids and mask from a list of 1-D id arrays, left padded with 0."""
  t = max(len(r) for r in rows)
  ids = np.zeros((len(rows), t), np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask
