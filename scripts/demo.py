r"""Generate from one prompt at every precision (and with the original model), timed.

  python scripts/demo.py --quantized=out/smollm2-anyprec \
      --model=/tmp/smollm2-135m-instruct-hf --prompt="The capital of France is" \
      --new_tokens=32 --plot=latency.png --eval_json=ppl.json

Reports decode ms/token and tokens/s (compile / warm-up excluded; prefill timed
separately). `--plot` writes a PNG of latency, and perplexity from an
`scripts/evaluate.py --output_json` file, against bits (needs matplotlib).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from anyprec_jax import cli

import models
from anyprec_jax import evaluation, latency
from anyprec_jax.runtime import AnyPrecisionForCausalLM

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_QUANTIZED = flags.DEFINE_string("quantized", None, "Any-precision checkpoint dir.")
_MODEL = flags.DEFINE_string("model", None, "Original model (HF dir, hub id, alias).")
_PRECISIONS = flags.DEFINE_list("precisions", None, "Precisions (default all).")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Prompt text.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens to generate per precision.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(_DTYPES), "Activation dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
_PLOT = flags.DEFINE_string("plot", None, "Write a latency / perplexity PNG here.")
_EVAL_JSON = flags.DEFINE_string("eval_json", None, "evaluate.py JSON for the plot.")


def main(argv):
  del argv
  if not (_QUANTIZED.value or _MODEL.value):
    raise app.UsageError("give --quantized and/or --model")
  if _PLOT.value:
    latency.require_matplotlib()  # Fail before the long part.
  dtype = _DTYPES[_DTYPE.value]
  anyprec = original = None
  if _QUANTIZED.value:
    precisions = (cli.parse_precisions(_PRECISIONS.value, "--precisions")
                  if _PRECISIONS.value else None)
    anyprec = AnyPrecisionForCausalLM.from_quantized(_QUANTIZED.value, precisions, dtype)
  if _MODEL.value:
    original = models.load_pretrained(models.resolve_alias(_MODEL.value), dtype)
  tok_dir = (anyprec.model_dir if anyprec else
             models.resolve_model_dir(models.resolve_alias(_MODEL.value)))
  tok = evaluation.load_tokenizer(tok_dir)
  ids = np.asarray([tok(_PROMPT.value).input_ids], np.int32)
  rows = latency.demo_rows(ids, new_tokens=_NEW.value, original=original,
                           anyprec=anyprec, repeats=_REPEATS.value)
  print(f"\nprompt: {_PROMPT.value!r} ({ids.shape[1]} tokens), {_NEW.value} new tokens, "
        f"{_DTYPE.value}, device {jax.devices()[0]}\n")
  for r in rows:
    print(f"[{r['model']} {r['bits']}b] {_PROMPT.value}{tok.decode(r['tokens'])}")
  print("\n" + latency.latency_table(rows))
  if _PLOT.value:
    record = json.loads(open(_EVAL_JSON.value).read()) if _EVAL_JSON.value else None
    latency.plot_latency_and_ppl(rows, record, _PLOT.value)
    print(f"wrote {_PLOT.value}")


if __name__ == "__main__":
  cli.run(main)
