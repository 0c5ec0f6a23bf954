"""Generate text with a Hugging Face Llama / Mistral / OPT model, or an any-precision
checkpoint written by scripts/quantize.py, in JAX.

  python scripts/generate.py --model=smollm2-135m --prompt="The capital of France is"
  python scripts/generate.py --model=/tmp/model-anyprec --precision=4
  python scripts/generate.py --model=/tmp/model-anyprec --precision=3.5  # per-layer widths
  python scripts/generate.py --model=/tmp/model-anyprec --precision=8 --draft_precision=3 \
      --num_draft=4        # self-speculative: 3-bit drafts verified at 8 bits

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

from anyprec_jax import cli, errors, weight

import models
from models import hf_loader, speculative

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
_PRECISION = flags.DEFINE_float(
    "precision", None, "Bits (any-precision checkpoints only): an integer width, or an "
    "average between the seed and the parent (3.5: the checkpoint's per-layer "
    "allocation); default the highest integer width.")
_DRAFT = flags.DEFINE_float(
    "draft_precision", None, "Self-speculative decoding: bits of the draft (below "
    "--precision, integer or fractional; any-precision checkpoints only).")
_NUM_DRAFT = flags.DEFINE_integer(
    "num_draft", None, "Draft tokens per round, 1..7 (default "
    "models.speculative.DEFAULT_NUM_DRAFT); with --draft_precision.")
_BOS = flags.DEFINE_boolean("add_special_tokens", False, "Let the tokenizer add BOS.")


def _load(model_dir, dtype):
  """A generator `run(ids, **kwargs) -> (GenerationResult, Timing, stats or None)`:
  a dense HF model, or an any-precision one via the runtime (speculative with
  --draft_precision)."""
  if (hf_loader.read_hf_config(model_dir).get("anyprec") or {}).get("method") == "anyprec":
    from anyprec_jax.runtime import AnyPrecisionForCausalLM
    draft, target = (None if f.value is None else weight.as_precision(f.value, f"--{f.name}")
                     for f in (_DRAFT, _PRECISION))
    precisions = None if target is None else sorted({target} | ({draft} - {None}))
    try:
      model = AnyPrecisionForCausalLM.from_quantized(model_dir, precisions, dtype=dtype)
      if draft is None:
        return lambda ids, **kw: (*model.timed_generate(ids, target, **kw), None)
      target, draft, k = model.check_draft(target, draft, _NUM_DRAFT.value)
    except errors.AnyPrecError:  # Bad data keeps its own exit code (cli.run).
      raise
    except ValueError as e:  # Precisions and k as the user gave them.
      raise app.UsageError(str(e)) from None
    return lambda ids, **kw: model.timed_speculative_generate(
        ids, target, draft_precision=draft, num_draft=k, **kw)
  for flag in (_PRECISION, _DRAFT):
    if flag.value is not None:
      raise app.UsageError(f"--{flag.name} needs an any-precision checkpoint; "
                           f"{model_dir} is a dense model")
  cfg, params = models.load_pretrained(model_dir, dtype=dtype)
  return lambda ids, **kw: (*models.timed_generate(cfg, params, ids, **kw), None)


def main(argv):
  del argv
  from transformers import AutoTokenizer  # Tokenizer only.
  from anyprec_jax.runtime import default_dtype
  model_dir = models.resolve_model_dir(models.resolve_alias(_MODEL.value))
  dtype = _DTYPES[_DTYPE.value] if _DTYPE.value else default_dtype()
  run = _load(model_dir, dtype)
  tok = AutoTokenizer.from_pretrained(model_dir)
  ids = np.asarray([tok(_PROMPT.value, add_special_tokens=_BOS.value).input_ids])
  sampling = models.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  kwargs = dict(max_new_tokens=_MAX_NEW.value, sampling=sampling,
                rng=jax.random.key(_SEED.value))
  target, draft = (None if f.value is None else weight.as_precision(f.value)
                   for f in (_PRECISION, _DRAFT))
  what = "" if target is None else f" for precision {target}"
  if draft is not None:
    what += f" with {draft}-bit drafts"
  print(f"compiling{what} ...", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  jax.block_until_ready(run(ids, **kwargs)[0].tokens)
  compile_s = time.perf_counter() - t0
  result, timing, stats = run(ids, **kwargs)
  n = int(result.lengths[0])
  print(_PROMPT.value + tok.decode(np.asarray(result.tokens[0, :n]),
                                   skip_special_tokens=True))
  steps = max(n - 1, 1)  # The first new token comes from the prefill logits.
  print(f"\n[{jax.devices()[0].platform}, {jnp.dtype(dtype).name}] compile + first run "
        f"{compile_s:.1f} s; prompt {ids.shape[1]} tokens: "
        f"prefill {timing.prefill_s * 1e3:.1f} ms; {n} new tokens: decode "
        f"{timing.decode_s * 1e3 / steps:.2f} ms/token ({steps / timing.decode_s:.1f} "
        f"tokens/s), end to end {n / (timing.prefill_s + timing.decode_s):.1f} tokens/s")
  if stats is not None:
    rounds = int(stats.rounds[0])
    print(f"speculative: {draft}-bit drafts, {rounds} rounds, "
          f"{int(stats.accepted[0]) / max(rounds, 1):.2f} drafts accepted per round "
          f"(of {_NUM_DRAFT.value or speculative.DEFAULT_NUM_DRAFT}), "
          f"{steps / max(rounds, 1):.2f} tokens per round")


if __name__ == "__main__":
  cli.run(main)
