"""Tiny self-contained Llama checkpoints and calibration files for the quantizer tests.

The checkpoint is written with `safetensors.torch` (an independent writer) and gets a
word-level tokenizer built with `tokenizers`, so no network and no ../shared is needed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

VOCAB = 512
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "vocab_size": VOCAB, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
  h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
  per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
               "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
               "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
  out = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
         "lm_head.weight": (c["vocab_size"], h)}
  for layer in range(c["num_hidden_layers"]):
    pre = f"model.layers.{layer}"
    out[f"{pre}.input_layernorm.weight"] = (h,)
    out[f"{pre}.post_attention_layernorm.weight"] = (h,)
    out.update({f"{pre}.{m}.weight": s for m, s in per_layer.items()})
  return out


def write_tokenizer(out: pathlib.Path) -> None:
  """Word-level tokenizer over "w0".."w{VOCAB-4}" with <unk>, <s>, </s>, <pad>."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
      "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))


def tiny_llama(out: pathlib.Path, dtype: str = "bfloat16", seed: int = 0,
               config: dict | None = None) -> pathlib.Path:
  """Writes a random tiny Llama checkpoint (config, safetensors, tokenizer) to `out`."""
  import torch
  from safetensors.torch import save_file
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cfg = dict(CONFIG if config is None else config, torch_dtype=dtype)
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in _shapes(cfg).items():
    value = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
             else 0.08 * rng.standard_normal(shape))
    tensors[name] = torch.tensor(value, dtype=getattr(torch, dtype))
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(cfg, indent=2))
  write_tokenizer(out)
  return out


def random_text(rng: np.random.Generator, words: int) -> str:
  return " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 4, words))


def calibration_files(out: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
  """A running text (.txt) and a documents file (.jsonl: 20 docs of 10..200 words)."""
  rng = np.random.default_rng(seed)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  txt = out / "calib.txt"
  txt.write_text(random_text(rng, 3000))
  jsonl = out / "calib.jsonl"
  docs = [random_text(rng, int(n)) for n in rng.integers(10, 200, 20)]
  jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
  return {"txt": txt, "jsonl": jsonl}
