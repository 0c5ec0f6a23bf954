"""Speed of the any-precision quantizer on random data.

  python scripts/bench_quantize.py --shapes=4096x4096,4096x11008
  python scripts/bench_quantize.py --preset=llama2-7b --fisher --budget_s=240
  python scripts/bench_quantize.py --preset=llama2-7b --nesting=optimal --shapes=4096x4096

Prints one JSON object per measurement and writes them all to --out (JSON lines).
--preset=llama2-7b times seed + upscale of every linear of a Llama-2-7B-shaped model
(layer by layer, as the pipeline groups them); --fisher times the Fisher pass of a
random bf16 Llama-2-7B-shaped model (a few samples, extrapolated to 100 and labelled so).
"""

from __future__ import annotations

import datetime
import glob
import json
import platform

import jax
import numpy as np
from absl import flags

from anyprec_jax import cli
from safetensors.numpy import load_file

from anyprec_jax.quantize import bench
from anyprec_jax.quantize.config import Nesting, QuantConfig, SplitMethod

_SHAPES = flags.DEFINE_list("shapes", ["4096x4096"], "N x K shapes for rows/s.")
_PRESET = flags.DEFINE_enum("preset", None, ["llama2-7b"], "Whole-model seed + upscale.")
_FISHER = flags.DEFINE_boolean("fisher", False, "Time the 7B Fisher pass.")
_FISHER_SAMPLES = flags.DEFINE_integer("fisher_samples", 3, "Samples timed.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per Fisher sample.")
_SEED_BITS = flags.DEFINE_integer("seed_bits", 3, "Seed width.")
_PARENT_BITS = flags.DEFINE_integer("parent_bits", 8, "Parent width.")
_DP_BINS = flags.DEFINE_integer("dp_bins", 128, "DP start bins (0: k-means++ only).")
_SPLIT = flags.DEFINE_enum("split", SplitMethod.OPTIMAL.value, [m.value for m in SplitMethod],
                           "Upscaling split rule.")
_NESTING = flags.DEFINE_enum("nesting", Nesting.GREEDY.value, [m.value for m in Nesting],
                             "Upscaling tree: greedy (the paper) or optimal (nested DP).")
_NESTING_BINS = flags.DEFINE_integer("nesting_bins", 64, "Bins of the optimal nesting.")
_CHUNK = flags.DEFINE_list("chunk_elements", [], "Chunk sizes to compare (default: auto).")
_BUDGET = flags.DEFINE_float("budget_s", 240.0, "Time budget of the 7B seed + upscale.")
_COMPARE = flags.DEFINE_string(
    "compare", None, "Weighted error of upscaled vs independent codes on 'random' rows "
    "(Gaussian weights, random Fisher) or on the first layer's linears of a local HF dir "
    "(uniform Fisher).")
_COMPARE_ROWS = flags.DEFINE_integer("compare_rows", 64, "Rows per matrix compared.")
_OUT = flags.DEFINE_string("out", None, "JSON lines output file.")


def _compare_matrices(source: str, rows: int):
  """(name, (w, f)) pairs: random rows, or the first layer's linears of a local model."""
  if source == "random":
    w, f = bench.random_matrix(jax.random.key(0), rows, 4096)
    yield "random", (np.asarray(w), np.asarray(f))
    return
  for path in sorted(glob.glob(f"{source}/*.safetensors")):
    for name, t in sorted(load_file(path).items()):
      if ".layers.0." in name and t.ndim == 2:
        w = t[:rows].astype(np.float32)
        yield name, (w, np.ones_like(w))


def main(argv):
  del argv
  records = []

  def log(obj):
    print(json.dumps(obj), flush=True)
    records.append(obj)

  log({"date": datetime.date.today().isoformat(), "jax": jax.__version__,
       "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
       "python": platform.python_version()})
  log({"precision": bench.precision_check()})
  config = QuantConfig(seed_bits=_SEED_BITS.value, parent_bits=_PARENT_BITS.value,
                       dp_bins=_DP_BINS.value, split=SplitMethod(_SPLIT.value),
                       nesting=Nesting(_NESTING.value), nesting_bins=_NESTING_BINS.value)
  shapes = [tuple(int(v) for v in s.split("x")) for s in _SHAPES.value]
  for chunk in [int(c) for c in _CHUNK.value] or [None]:
    bench.throughput(shapes, config, chunk_elements=chunk, log=log)
  if _PRESET.value == "llama2-7b":
    log({"llama2_7b_seed_upscale": bench.llama2_7b_seed_upscale(config, _BUDGET.value,
                                                                 log=log)})
  if _FISHER.value:
    log({"fisher_7b": bench.fisher_7b(_FISHER_SAMPLES.value, _SEQ_LEN.value, log=log)})
  if _COMPARE.value:
    for name, (w, f) in _compare_matrices(_COMPARE.value, _COMPARE_ROWS.value):
      res = bench.upscale_vs_independent(w, f, _SEED_BITS.value, _PARENT_BITS.value)
      log({"compare": name, "rows": int(w.shape[0]), "k": int(w.shape[1]),
           "ratio_upscaled_over_independent": {b: round(r["ratio"], 4)
                                                for b, r in res.items()},
           "relative_error_upscaled": {b: float(f"{r['upscaled']:.3g}")
                                       for b, r in res.items()},
           "relative_error_independent": {b: float(f"{r['independent']:.3g}")
                                          for b, r in res.items()}})
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
  cli.run(main)
