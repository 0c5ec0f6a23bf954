r"""Perplexity (GPTQ style) of an original model, an any-precision model and baselines.

  python scripts/evaluate.py --model=/tmp/smollm2-135m-instruct-hf \
      --quantized=out/smollm2-anyprec --baselines=out/smollm2-independent,out/smollm2-rtn \
      --datasets=wikitext2 --data_dir=../shared/data --seq_len=2048 --output_json=ppl.json

With --paired (default: original), every model is also compared with a reference on
the same chunks: the change of perplexity and the mean per-chunk NLL difference +-
its standard error. A reference other than `original` is a method or model label
matched at the same bits (e.g. --paired=original,squeezellm,independent).
--inputs_json merges the rows of earlier --output_json files (evaluate models in
separate runs, report them together; with no model flags it only reports).

Every integer precision of `--quantized` is evaluated, or those of --precisions, which
may be fractional (3.5: the checkpoint's per-layer allocation; --allocation=random: the
equal-bytes random baseline, rows labelled anyprec-random). --interpolate adds, at
each fractional precision, the straight line between the neighbouring integer widths
(per-chunk NLL interpolated; rows labelled "interpolated", so --paired=interpolated
compares with it). `--baselines` are directories written by
`scripts/quantize.py --method=independent|rtn` (their `w{b}/` subdirectories). Without
`--data_dir` the corpora come from the Hugging Face hub (needs `datasets`).
"""

from __future__ import annotations

import itertools
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from anyprec_jax import cli

from anyprec_jax import allocation, eval_runner

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_MODEL = flags.DEFINE_string("model", None, "Original model: HF dir, hub id or alias.")
_QUANTIZED = flags.DEFINE_string("quantized", None, "Any-precision checkpoint dir.")
_PRECISIONS = flags.DEFINE_list("precisions", None, "Precisions, e.g. 3,3.5,4 (default: "
                                "every integer width).")
_ALLOCATION = flags.DEFINE_enum("allocation", "optimal", ["optimal", "random"],
                                "How fractional precisions choose widths.")
_INTERPOLATE = flags.DEFINE_bool("interpolate", False, "Add straight-line rows at "
                                 "fractional precisions.")
_BASELINES = flags.DEFINE_list("baselines", [], "Baseline dirs (independent / rtn).")
_DATASETS = flags.DEFINE_list("datasets", ["wikitext2", "c4", "ptb"],
                              "Corpora (wikitext2, c4, ptb, tinystories) or file paths.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Local corpus files (else the hub).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per chunk.")
_MAX_CHUNKS = flags.DEFINE_integer("max_chunks", None, "First N chunks only.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Chunks per forward pass.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(_DTYPES), "Activation dtype.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Write the results here.")
_PAIRED = flags.DEFINE_list("paired", ["original"],
                            "References of the paired reports: original, or a method / "
                            "model label matched at the same bits.")
_INPUTS = flags.DEFINE_list("inputs_json", [], "Earlier --output_json files to merge in.")


def main(argv):
  del argv
  dtype = _DTYPES[_DTYPE.value]
  sources = []
  if _MODEL.value:
    sources.append(eval_runner.original_entries(_MODEL.value, dtype))
  if _QUANTIZED.value:
    precisions = (cli.parse_precisions(_PRECISIONS.value, "--precisions")
                  if _PRECISIONS.value else None)
    sources.append(eval_runner.anyprec_entries(_QUANTIZED.value, precisions, dtype,
                                               allocation.Method(_ALLOCATION.value)))
  sources += [eval_runner.baseline_entries(b, dtype) for b in _BASELINES.value]
  if not sources and not _INPUTS.value:
    raise app.UsageError("give --model, --quantized, --baselines and/or --inputs_json")
  rows = []
  for path in _INPUTS.value:
    rows += json.loads(pathlib.Path(path).read_text())["rows"]
  if sources:
    rows += eval_runner.evaluate_entries(
        itertools.chain(*sources), _DATASETS.value, data_dir=_DATA_DIR.value,
        seq_len=_SEQ_LEN.value, max_chunks=_MAX_CHUNKS.value, batch_size=_BATCH.value)
  if _INTERPOLATE.value:
    rows += eval_runner.interpolated_rows(rows, _DATASETS.value)
  print("\nperplexity (lower is better)\n")
  print(eval_runner.format_table(rows, _DATASETS.value))
  for ref in _PAIRED.value:
    print(f"\npaired vs {ref} (same chunks; ppl change, mean NLL difference +- s.e.)\n")
    print(eval_runner.format_paired_table(rows, _DATASETS.value, ref))
  if _OUTPUT.value:
    record = {"command": " ".join(sys.argv), "device": str(jax.devices()[0]),
              "jax": jax.__version__, "python": platform.python_version(),
              "dtype": _DTYPE.value, "seq_len": _SEQ_LEN.value,
              "max_chunks": _MAX_CHUNKS.value, "rows": rows}
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
  cli.run(main)
