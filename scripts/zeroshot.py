r"""Zero-shot accuracy (lm-evaluation-harness) of an original model and every width.

  python scripts/zeroshot.py --model=/tmp/smollm2-135m-instruct-hf \
      --quantized=/tmp/smol-anyprec --precisions=3,4,8 \
      --tasks=arc_easy,arc_challenge,hellaswag,piqa,winogrande --output_json=zs.json

Each model runs through the lm_eval model `anyprec` (anyprec_jax/lm_eval_adapter.py);
the any-precision checkpoint is loaded once and shared by its precisions. lm_eval
fetches its tasks' data from the Hugging Face hub (or its cache); offline, give local
task YAMLs with --include_path (and --noinclude_defaults to skip indexing lm_eval's
own tasks), e.g. --include_path=tests/data/lm_eval_tasks --tasks=anyprec_tiny_mc.
Needs `pip install -e .[eval]`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from anyprec_jax import cli

from anyprec_jax import zeroshot

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_MODEL = flags.DEFINE_string("model", None, "Original (dense) model: HF dir, hub id or alias.")
_QUANTIZED = flags.DEFINE_string("quantized", None, "Any-precision checkpoint dir.")
_PRECISIONS = flags.DEFINE_list("precisions", None, "Subset of precisions (default all).")
_TASKS = flags.DEFINE_list("tasks", ["arc_easy", "arc_challenge", "hellaswag", "piqa",
                                     "winogrande"], "lm_eval tasks or groups.")
_INCLUDE = flags.DEFINE_string("include_path", None, "Directory of extra task YAMLs.")
_DEFAULTS = flags.DEFINE_boolean("include_defaults", True, "Index lm_eval's own tasks.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: 0).")
_LIMIT = flags.DEFINE_float("limit", None, "First N documents per task (< 1: fraction).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward / generate call.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context limit (default: model's).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(_DTYPES),
                           "Activation dtype (default: bfloat16 on GPU, float32 on CPU).")
_OUTPUT = flags.DEFINE_string("output_json", None, "Write the results here.")


def main(argv):
  del argv
  if not (_MODEL.value or _QUANTIZED.value):
    raise app.UsageError("give --model and/or --quantized")
  try:
    precisions = [int(b) for b in _PRECISIONS.value] if _PRECISIONS.value else None
  except ValueError as e:
    raise app.UsageError(f"--precisions must be a comma-separated list of ints (bits), "
                         f"got {','.join(_PRECISIONS.value)!r}") from e
  limit = _LIMIT.value
  if limit is not None and limit >= 1:
    limit = int(limit)
  config = zeroshot.ZeroShotConfig(
      tasks=tuple(_TASKS.value), include_path=_INCLUDE.value,
      include_defaults=_DEFAULTS.value, num_fewshot=_FEWSHOT.value, limit=limit,
      batch_size=_BATCH.value, max_length=_MAX_LENGTH.value)
  dtype = _DTYPES[_DTYPE.value] if _DTYPE.value else None
  rows = zeroshot.evaluate(
      zeroshot.model_entries(_QUANTIZED.value, precisions, _MODEL.value, dtype), config)
  print("\nzero-shot accuracy, % +- standard error\n")
  print(zeroshot.format_table(rows, config.tasks))
  if _OUTPUT.value:
    import lm_eval  # Only for its version.
    record = {"command": " ".join(sys.argv), "device": str(jax.devices()[0]),
              "jax": jax.__version__, "lm_eval": lm_eval.__version__,
              "python": platform.python_version(), "dtype": _DTYPE.value,
              "config": dataclasses.asdict(config), "rows": rows}
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
  cli.run(main)
