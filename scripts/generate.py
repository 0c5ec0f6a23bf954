"""Generate text with a Hugging Face Llama / Mistral / OPT model, or an any-precision
checkpoint written by scripts/quantize.py, in JAX.

  python scripts/generate.py --model=smollm2-135m --prompt="The capital of France is"
  python scripts/generate.py --model=/tmp/model-anyprec --precision=4

Prints the continuation (special tokens skipped; generation stops at EOS), then the
compile time of the first run, and prefill time, decode ms/token and tokens/s of a second,
compiled run.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from anyprec_jax import cli

import models
from models import hf_loader

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Directory, hub id or alias.")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(_DTYPES),
                           "Parameter / activation dtype (default: bfloat16 on GPU, "
                           "float32 on CPU, as AnyPrecisionForCausalLM.from_quantized).")
_PRECISION = flags.DEFINE_integer(
    "precision", None, "Bits (any-precision checkpoints only); default the highest.")
_BOS = flags.DEFINE_boolean("add_special_tokens", False, "Let the tokenizer add BOS.")


def _load(model_dir, dtype):
  """(cfg, params): dense HF model, or an any-precision one via the runtime."""
  if (hf_loader.read_hf_config(model_dir).get("anyprec") or {}).get("method") == "anyprec":
    from anyprec_jax.runtime import AnyPrecisionForCausalLM
    precisions = None if _PRECISION.value is None else [_PRECISION.value]
    model = AnyPrecisionForCausalLM.from_quantized(model_dir, precisions, dtype=dtype)
    return model.cfg, model.params_at(_PRECISION.value)
  if _PRECISION.value is not None:
    raise app.UsageError(f"--precision needs an any-precision checkpoint; {model_dir} "
                         "is a dense model")
  return models.load_pretrained(model_dir, dtype=dtype)


def main(argv):
  del argv
  from transformers import AutoTokenizer  # Tokenizer only.
  from anyprec_jax.runtime import default_dtype
  model_dir = models.resolve_model_dir(models.resolve_alias(_MODEL.value))
  dtype = _DTYPES[_DTYPE.value] if _DTYPE.value else default_dtype()
  cfg, params = _load(model_dir, dtype)
  tok = AutoTokenizer.from_pretrained(model_dir)
  ids = np.asarray([tok(_PROMPT.value, add_special_tokens=_BOS.value).input_ids])
  sampling = models.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  kwargs = dict(max_new_tokens=_MAX_NEW.value, sampling=sampling,
                rng=jax.random.key(_SEED.value))
  what = "" if _PRECISION.value is None else f" for precision {_PRECISION.value}"
  print(f"compiling{what} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  jax.block_until_ready(models.timed_generate(cfg, params, ids, **kwargs)[0].tokens)
  compile_s = time.perf_counter() - t0
  result, timing = models.timed_generate(cfg, params, ids, **kwargs)
  n = int(result.lengths[0])
  print(_PROMPT.value + tok.decode(np.asarray(result.tokens[0, :n]),
                                   skip_special_tokens=True))
  steps = max(n - 1, 1)  # The first new token comes from the prefill logits.
  print(f"\n[{jax.devices()[0].platform}, {jnp.dtype(dtype).name}] compile + first run "
        f"{compile_s:.1f} s; prompt {ids.shape[1]} tokens: "
        f"prefill {timing.prefill_s * 1e3:.1f} ms; {n} new tokens: decode "
        f"{timing.decode_s * 1e3 / steps:.2f} ms/token ({steps / timing.decode_s:.1f} "
        f"tokens/s), end to end {n / (timing.prefill_s + timing.decode_s):.1f} tokens/s")


if __name__ == "__main__":
  cli.run(main)
