"""Frozen model configuration shared by every architecture.

`ModelConfig` describes one decoder-only transformer; the per-architecture modules
(`llama.py`, `mistral.py`, `opt.py`) only translate a Hugging Face `config.json` into it.
It is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np


class Arch(enum.Enum):
  LLAMA = "llama"
  MISTRAL = "mistral"
  OPT = "opt"


class NormKind(enum.Enum):
  RMS = "rms"      # RMSNorm, weight only (Llama, Mistral).
  LAYER = "layer"  # LayerNorm with weight and bias (OPT).


class Activation(enum.Enum):
  SILU = "silu"
  RELU = "relu"
  GELU = "gelu"


class PositionKind(enum.Enum):
  ROPE = "rope"        # Rotary embeddings, HF "rotate_half" layout.
  LEARNED = "learned"  # Learned absolute positions (OPT, with an index offset).


class RopeType(enum.Enum):
  DEFAULT = "default"
  LINEAR = "linear"
  LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`)."""
  rope_type: RopeType = RopeType.DEFAULT
  factor: float = 1.0
  low_freq_factor: float = 1.0             # llama3 only.
  high_freq_factor: float = 4.0            # llama3 only.
  original_max_position_embeddings: int = 8192  # llama3 only.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One decoder-only transformer.

  Linear weights are [out, in] (HF layout). `embed_dim` is the width of the token
  embedding and lm_head (OPT's `word_embed_proj_dim`); when it differs from
  `hidden_size` the decoder has `project_in` / `project_out`.
  """
  arch: Arch
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm: NormKind = NormKind.RMS
  norm_eps: float = 1e-6
  activation: Activation = Activation.SILU
  gated_mlp: bool = True
  position: PositionKind = PositionKind.ROPE
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  position_offset: int = 0         # OPT: 2.
  sliding_window: int | None = None  # Mistral: keys with q - k < window.
  attention_bias: bool = False     # Biases on q/k/v/o.
  mlp_bias: bool = False           # Biases on the MLP linears.
  pre_norm: bool = True            # False: post-norm layers (OPT-350m).
  final_norm: bool = True
  embed_dim: int | None = None     # None: hidden_size.
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.embed_dim is None:
      object.__setattr__(self, "embed_dim", self.hidden_size)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  @property
  def has_projection(self) -> bool:
    """True when embeddings are projected in/out of the hidden width (OPT-350m)."""
    return self.embed_dim != self.hidden_size

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head (GQA)."""
    return self.num_heads // self.num_kv_heads


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [head_dim // 2] (float32), with HF's scalings.

  Args:
    cfg: a config with `position == PositionKind.ROPE`.

  Returns:
    float32 array, as `transformers.modeling_rope_utils` computes it.
  """
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
  sc = cfg.rope_scaling
  if sc.rope_type is RopeType.LINEAR:
    return (inv_freq / np.float32(sc.factor)).astype(np.float32)
  if sc.rope_type is RopeType.LLAMA3:
    old_len = sc.original_max_position_embeddings
    low_wavelen = old_len / sc.low_freq_factor
    high_wavelen = old_len / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (old_len / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


# Projections that read the same input, stored as one weight by `params.fuse_projections`
# (rows concatenated in this order): (fused name, parts) inside a layer's `attn` / `mlp`.
FUSED_ATTN = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
FUSED_MLP = ("gate_up_proj", ("gate_proj", "up_proj"))
