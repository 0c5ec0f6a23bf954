"""Acceptance of self-speculative decoding on a real any-precision checkpoint.

  PYTHONPATH=. python3 scripts/speculative_acceptance.py --model=/tmp/smol-anyprec \
      --data_dir=../shared/data --drafts=3,4,5 --num_draft=2,4,6

Prompts are cut from the evaluation text (evenly spread; WikiText-2 by default); every
prompt generates --new_tokens tokens (EOS ignored) with drafts at each --drafts
precision and each k in --num_draft, verified at --target. Prints and writes a markdown
table (device, date, jax version, command) of accepted drafts and tokens per round, and
how many rows equal plain greedy decoding at the target. --output_json feeds
scripts/bench_speculative.py --acceptance_json.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import flags

from anyprec_jax import cli

import models
from anyprec_jax import evaluation, speculative_bench
from anyprec_jax.runtime import AnyPrecisionForCausalLM, default_dtype

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_MODEL = flags.DEFINE_string("model", None, "Any-precision checkpoint directory.",
                             required=True)
_TARGET = flags.DEFINE_integer("target", 8, "Verifying precision.")
_DRAFTS = flags.DEFINE_list("drafts", ["3", "4", "5"], "Draft precisions.")
_NUM_DRAFT = flags.DEFINE_list("num_draft", ["2", "4", "6"], "Draft tokens per round (k).")
_DATASET = flags.DEFINE_string("dataset", "wikitext2", "Prompt text (evaluate.py names).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Local data directory (../shared/data).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts (one batch).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of sampling.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(_DTYPES),
                           "Activation dtype (default: bfloat16 on GPU, float32 on CPU).")
_OUTPUT = flags.DEFINE_string("output_md", "benchmarks/results/speculative_acceptance.md",
                              "Markdown output ('' to skip).")
_JSON = flags.DEFINE_string("output_json", "", "JSON rows output ('' to skip).")


def main(argv):
  del argv
  drafts, ks = [int(b) for b in _DRAFTS.value], [int(k) for k in _NUM_DRAFT.value]
  dtype = _DTYPES[_DTYPE.value] if _DTYPE.value else default_dtype()
  model = AnyPrecisionForCausalLM.from_quantized(
      _MODEL.value, sorted(set(drafts) | {_TARGET.value}), dtype=dtype)
  text = evaluation.load_eval_text(_DATASET.value, _DATA_DIR.value)
  ids, mask = speculative_bench.text_prompts(
      evaluation.tokenize(model.tokenizer, text.text), num_prompts=_NUM_PROMPTS.value,
      prompt_len=_PROMPT_LEN.value)
  sampling = models.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  rows = speculative_bench.acceptance_rows(
      model, ids, mask, target=_TARGET.value, drafts=drafts, num_drafts=ks,
      new_tokens=_NEW.value, sampling=sampling, seed=_SEED.value)
  device = jax.devices()[0]
  header = (f"device: {getattr(device, 'device_kind', device.platform)} "
            f"({device.platform}); date: {datetime.date.today().isoformat()}; jax "
            f"{jax.__version__}; dtype {jnp.dtype(dtype).name}\n"
            f"model: {_MODEL.value}; prompts: {_NUM_PROMPTS.value} x {_PROMPT_LEN.value} "
            f"tokens of {text.source}; {_NEW.value} new tokens each (EOS ignored); "
            f"sampling: {sampling}\n"
            f"command: `{' '.join(['python3'] + sys.argv)}`")
  table = speculative_bench.acceptance_table(rows)
  print("\n" + header + "\n\n" + table)
  if _OUTPUT.value:
    speculative_bench.write_report(_OUTPUT.value, "Self-speculative decoding: acceptance",
                                   header, table)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  cli.run(main)
