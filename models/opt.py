"""OPT (Zhang et al., 2022): config parsing and the HF tensor-name table.

True differences from Llama, all expressed as `ModelConfig` fields the shared decoder
reads: LayerNorm with bias, learned absolute positions with an index offset of 2, ReLU
MLP without gate, biases on every linear, `project_in` / `project_out` when
`word_embed_proj_dim != hidden_size`, and post-norm layers without a final norm when
`do_layer_norm_before` is false (opt-350m).
"""

from __future__ import annotations

from models import llama
from models.config import Arch, ModelConfig, NormKind, PositionKind
from models.mapping import ArchSpec, IgnoreRule, ParamRule

POSITION_OFFSET = 2


def config_from_hf(d: dict) -> ModelConfig:
  """Parses an OPT HF config dict.

  Args:
    d: the `config.json` contents.

  Returns:
    The `ModelConfig`.
  """
  if not d.get("layer_norm_elementwise_affine", True):
    raise NotImplementedError("OPT with layer_norm_elementwise_affine=False")
  hidden = int(d["hidden_size"])
  heads = int(d["num_attention_heads"])
  pre_norm = bool(d.get("do_layer_norm_before", True))
  bias = bool(d.get("enable_bias", True))
  return ModelConfig(
      arch=Arch.OPT,
      vocab_size=int(d["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(d["ffn_dim"]),
      num_layers=int(d["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=hidden // heads,
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      norm=NormKind.LAYER,
      norm_eps=1e-5,  # torch.nn.LayerNorm default, as in HF OPT.
      activation=llama.parse_activation(d.get("activation_function", "relu")),
      gated_mlp=False,
      position=PositionKind.LEARNED,
      position_offset=POSITION_OFFSET,
      attention_bias=bias,
      mlp_bias=bias,
      pre_norm=pre_norm,
      final_norm=pre_norm and not d.get("_remove_final_layer_norm", False),
      embed_dim=int(d.get("word_embed_proj_dim") or hidden),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
      bos_token_id=d.get("bos_token_id"),
      eos_token_ids=llama.eos_ids(d),
      pad_token_id=d.get("pad_token_id"),
  )


def _hid(c):
  return (c.hidden_size,)


def _sq(c):
  return (c.hidden_size, c.hidden_size)


def _attn_bias(c):
  return c.attention_bias


def _mlp_bias(c):
  return c.mlp_bias


_D = "model.decoder."
_L = _D + "layers.{i}."
_P = "layers_{i}/"


def _layer_rules():
  rules = []
  for hf, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                   ("out_proj", "o_proj")):
    rules.append(ParamRule(_L + f"self_attn.{hf}.weight", _P + f"attn/{ours}/weight", _sq))
    rules.append(ParamRule(_L + f"self_attn.{hf}.bias", _P + f"attn/{ours}/bias", _hid,
                           _attn_bias))
  for hf, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
    rules.append(ParamRule(_L + f"{hf}.weight", _P + f"{ours}/weight", _hid))
    rules.append(ParamRule(_L + f"{hf}.bias", _P + f"{ours}/bias", _hid))
  rules += [
      ParamRule(_L + "fc1.weight", _P + "mlp/up_proj/weight",
                lambda c: (c.intermediate_size, c.hidden_size)),
      ParamRule(_L + "fc1.bias", _P + "mlp/up_proj/bias",
                lambda c: (c.intermediate_size,), _mlp_bias),
      ParamRule(_L + "fc2.weight", _P + "mlp/down_proj/weight",
                lambda c: (c.hidden_size, c.intermediate_size)),
      ParamRule(_L + "fc2.bias", _P + "mlp/down_proj/bias", _hid, _mlp_bias),
  ]
  return rules


RULES = (
    ParamRule(_D + "embed_tokens.weight", "embed_tokens/embedding",
              lambda c: (c.vocab_size, c.embed_dim)),
    ParamRule(_D + "embed_positions.weight", "embed_positions/embedding",
              lambda c: (c.max_position_embeddings + c.position_offset, c.hidden_size)),
    ParamRule(_D + "project_in.weight", "project_in/weight",
              lambda c: (c.hidden_size, c.embed_dim), lambda c: c.has_projection),
    *_layer_rules(),
    ParamRule(_D + "final_layer_norm.weight", "final_norm/weight", _hid,
              lambda c: c.final_norm),
    ParamRule(_D + "final_layer_norm.bias", "final_norm/bias", _hid,
              lambda c: c.final_norm),
    ParamRule(_D + "project_out.weight", "project_out/weight",
              lambda c: (c.embed_dim, c.hidden_size), lambda c: c.has_projection),
    ParamRule("lm_head.weight", "lm_head/weight",
              lambda c: (c.vocab_size, c.embed_dim), lambda c: not c.tie_word_embeddings),
)

IGNORED = (
    IgnoreRule(r"lm_head\.weight", "tied to model.decoder.embed_tokens.weight",
               lambda c: c.tie_word_embeddings),
)

SPEC = ArchSpec(
    model_types=("opt",),
    config_from_hf=config_from_hf,
    rules=RULES,
    ignored=IGNORED,
    # Old checkpoints (e.g. facebook/opt-*) store the base model without "model.".
    prefix_aliases=(("decoder.", "model.decoder."),),
    linear_modules=tuple(_L + m for m in ("self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj", "self_attn.out_proj",
                                          "fc1", "fc2")),
)
