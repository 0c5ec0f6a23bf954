"""Llama (Touvron et al., 2023): config parsing and the HF tensor-name table.

Everything else (RMSNorm, RoPE with GQA, gated SiLU MLP) is the shared decoder.
Covers Llama 1/2/3 (incl. Llama-3 RoPE scaling) and Llama-architecture models such as
SmolLM2.
"""

from __future__ import annotations

from models.config import (Activation, Arch, ModelConfig, NormKind, PositionKind,
                           RopeScaling, RopeType)
from models.mapping import ArchSpec, IgnoreRule, ParamRule

_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU,
                "relu": Activation.RELU, "gelu": Activation.GELU}


def parse_activation(name: str) -> Activation:
  """HF activation name -> `Activation`; clear error for unsupported ones."""
  if name not in _ACTIVATIONS:
    raise NotImplementedError(
        f"activation {name!r} not supported; supported: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def eos_ids(d: dict) -> tuple[int, ...]:
  """`eos_token_id` (int, list or absent) as a tuple."""
  eos = d.get("eos_token_id")
  if eos is None:
    return ()
  return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def parse_rope(d: dict) -> tuple[float, RopeScaling]:
  """(rope_theta, RopeScaling) from transformers v5 `rope_parameters` or v4 keys."""
  params = dict(d.get("rope_parameters") or {})
  legacy = d.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  src = params if params.get("rope_type", "default") != "default" or not legacy else legacy
  rope_type = src.get("rope_type", src.get("type", "default"))
  supported = [t.value for t in RopeType]
  if rope_type not in supported:
    raise NotImplementedError(
        f"rope type {rope_type!r} not supported; supported: {supported}")
  kind = RopeType(rope_type)
  if kind is RopeType.DEFAULT:
    return theta, RopeScaling()
  defaults = RopeScaling()
  return theta, RopeScaling(
      rope_type=kind,
      factor=float(src["factor"]),
      low_freq_factor=float(src.get("low_freq_factor", defaults.low_freq_factor)),
      high_freq_factor=float(src.get("high_freq_factor", defaults.high_freq_factor)),
      original_max_position_embeddings=int(src.get(
          "original_max_position_embeddings",
          defaults.original_max_position_embeddings)))


def config_from_hf(d: dict, arch: Arch = Arch.LLAMA) -> ModelConfig:
  """Parses a Llama-family HF config dict.

  Args:
    d: the `config.json` contents.
    arch: LLAMA, or MISTRAL when called from `mistral.py`.

  Returns:
    The `ModelConfig`.
  """
  heads = int(d["num_attention_heads"])
  theta, scaling = parse_rope(d)
  return ModelConfig(
      arch=arch,
      vocab_size=int(d["vocab_size"]),
      hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_layers=int(d["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(d.get("num_key_value_heads") or heads),
      head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      norm=NormKind.RMS,
      norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      activation=parse_activation(d.get("hidden_act", "silu")),
      gated_mlp=True,
      position=PositionKind.ROPE,
      rope_theta=theta,
      rope_scaling=scaling,
      attention_bias=bool(d.get("attention_bias", False)),
      mlp_bias=bool(d.get("mlp_bias", False)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      bos_token_id=d.get("bos_token_id"),
      eos_token_ids=eos_ids(d),
      pad_token_id=d.get("pad_token_id"),
  )


def _q(c):
  return (c.num_heads * c.head_dim, c.hidden_size)


def _kv(c):
  return (c.num_kv_heads * c.head_dim, c.hidden_size)


def _o(c):
  return (c.hidden_size, c.num_heads * c.head_dim)


def _attn_bias(c):
  return c.attention_bias


def _mlp_bias(c):
  return c.mlp_bias


def _untied(c):
  return not c.tie_word_embeddings


def _tied(c):
  return c.tie_word_embeddings


_L = "model.layers.{i}."
_P = "layers_{i}/"

RULES = (
    ParamRule("model.embed_tokens.weight", "embed_tokens/embedding",
              lambda c: (c.vocab_size, c.hidden_size)),
    ParamRule(_L + "input_layernorm.weight", _P + "attn_norm/weight",
              lambda c: (c.hidden_size,)),
    ParamRule(_L + "self_attn.q_proj.weight", _P + "attn/q_proj/weight", _q),
    ParamRule(_L + "self_attn.k_proj.weight", _P + "attn/k_proj/weight", _kv),
    ParamRule(_L + "self_attn.v_proj.weight", _P + "attn/v_proj/weight", _kv),
    ParamRule(_L + "self_attn.o_proj.weight", _P + "attn/o_proj/weight", _o),
    ParamRule(_L + "self_attn.q_proj.bias", _P + "attn/q_proj/bias",
              lambda c: _q(c)[:1], _attn_bias),
    ParamRule(_L + "self_attn.k_proj.bias", _P + "attn/k_proj/bias",
              lambda c: _kv(c)[:1], _attn_bias),
    ParamRule(_L + "self_attn.v_proj.bias", _P + "attn/v_proj/bias",
              lambda c: _kv(c)[:1], _attn_bias),
    ParamRule(_L + "self_attn.o_proj.bias", _P + "attn/o_proj/bias",
              lambda c: _o(c)[:1], _attn_bias),
    ParamRule(_L + "post_attention_layernorm.weight", _P + "mlp_norm/weight",
              lambda c: (c.hidden_size,)),
    ParamRule(_L + "mlp.gate_proj.weight", _P + "mlp/gate_proj/weight",
              lambda c: (c.intermediate_size, c.hidden_size)),
    ParamRule(_L + "mlp.up_proj.weight", _P + "mlp/up_proj/weight",
              lambda c: (c.intermediate_size, c.hidden_size)),
    ParamRule(_L + "mlp.down_proj.weight", _P + "mlp/down_proj/weight",
              lambda c: (c.hidden_size, c.intermediate_size)),
    ParamRule(_L + "mlp.gate_proj.bias", _P + "mlp/gate_proj/bias",
              lambda c: (c.intermediate_size,), _mlp_bias),
    ParamRule(_L + "mlp.up_proj.bias", _P + "mlp/up_proj/bias",
              lambda c: (c.intermediate_size,), _mlp_bias),
    ParamRule(_L + "mlp.down_proj.bias", _P + "mlp/down_proj/bias",
              lambda c: (c.hidden_size,), _mlp_bias),
    ParamRule("model.norm.weight", "final_norm/weight", lambda c: (c.hidden_size,)),
    ParamRule("lm_head.weight", "lm_head/weight",
              lambda c: (c.vocab_size, c.hidden_size), _untied),
)

IGNORED = (
    IgnoreRule(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
               "RoPE buffer, recomputed from the config"),
    IgnoreRule(r"model\.rotary_emb\.inv_freq", "RoPE buffer, recomputed from the config"),
    IgnoreRule(r"lm_head\.weight", "tied to model.embed_tokens.weight", _tied),
)

LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

SPEC = ArchSpec(
    model_types=("llama",),
    config_from_hf=config_from_hf,
    rules=RULES,
    ignored=IGNORED,
    linear_modules=tuple("model.layers.{i}." + m for m in LINEAR_MODULES),
)
