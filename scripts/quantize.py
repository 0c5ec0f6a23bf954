r"""Quantize a Hugging Face Llama / Mistral / OPT model into an any-precision checkpoint.

  python scripts/quantize.py --model=mistral-7b          # writes out/mistral-7b-anyprec
  python scripts/quantize.py --model=/tmp/smollm2-135m-instruct-hf \
      --calibration=../shared/data/c4/c4_train_sample1000.jsonl --output_dir=/tmp/smol-ap
  python scripts/quantize.py --model=opt-125m --method=rtn --output_dir=/tmp/opt-rtn

--method=anyprec writes one checkpoint holding every precision seed_bits..parent_bits;
--method=independent|squeezellm|rtn write one dense (fake-quantized) HF directory per width,
<output_dir>/w{b}/. A killed run resumes from --cache_dir (default <output_dir>.cache,
removed once the run succeeds unless --keep_cache).

The any-precision default is the nested DP (`--nesting=optimal`, lambda_b = 2^(b - seed))
with damped Fisher weights (`--fisher_damping=0.1`); `--nesting=greedy --fisher_damping=0`
is the paper's quantizer (benchmarks/results/quality.md compares them).
"""

from __future__ import annotations

from absl import app, flags

from anyprec_jax import cli

from anyprec_jax.quantize import (CalibrationConfig, LutDtype, Method, Nesting,
                                  QuantConfig, RunOptions, SplitMethod, quantize_model)
from anyprec_jax.quantize.config import DEFAULT_DAMPING

_MODEL = flags.DEFINE_string("model", None, "Alias (e.g. llama-2-7b), directory or hub id.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output_dir", None,
                              "Output directory (default out/<model name>-<method>).")
_SEED_BITS = flags.DEFINE_integer("seed_bits", 3, "Width of the seed k-means (>= 2).")
_PARENT_BITS = flags.DEFINE_integer("parent_bits", 8, "Width of the parent (<= 8).")
_METHOD = flags.DEFINE_enum("method", Method.ANYPREC.value, [m.value for m in Method],
                            "anyprec, or a baseline: independent (our k-means) / "
                            "squeezellm (the paper's: one k-means++ start, no DP) / rtn.")
_CALIBRATION = flags.DEFINE_string(
    "calibration", "c4", "c4, wikitext2 (hub) or a local .jsonl/.json/.parquet/.txt file.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 100, "Calibration sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per calibration sequence.")
_CALIB_SEED = flags.DEFINE_integer("calibration_seed", 0, "Seed of the sample choice.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the k-means++ starts.")
_N_INIT = flags.DEFINE_integer("n_init", 1, "k-means++ starts per row.")
_DP_BINS = flags.DEFINE_integer("dp_bins", 128, "Bins of the DP start (0: original).")
_SPLIT = flags.DEFINE_enum("split", SplitMethod.OPTIMAL.value, [m.value for m in SplitMethod],
                           "Upscaling split: exact 2-means, or the original's bisection.")
_NESTING = flags.DEFINE_enum(
    "nesting", QuantConfig.nesting.value, [m.value for m in Nesting],
    "anyprec: optimal (nested DP for sum_b lambda_b E_b, quantize/nesting.py) or greedy "
    "(the paper's upscaling).")
_NESTING_BINS = flags.DEFINE_integer("nesting_bins", QuantConfig.nesting_bins,
                                     "Bins of the optimal nesting's DP.")
_NESTING_WEIGHTS = flags.DEFINE_list(
    "nesting_weights", [], "lambda_b per width seed..parent (default: 2^(b - seed)).")
_DAMPING = flags.DEFINE_float(
    "fisher_damping", None, "Weight errors by F + alpha * (row mean of F); 0: plain F "
    f"(the paper). Default: {DEFAULT_DAMPING} for --method=anyprec, 0 for the baselines.")
_LUT_DTYPE = flags.DEFINE_enum("lut_dtype", LutDtype.FLOAT16.value,
                               [d.value for d in LutDtype], "LUT storage dtype.")
_CACHE = flags.DEFINE_string(
    "cache_dir", None, "Resumable cache (default <output>.cache, removed after a "
    "successful run unless --keep_cache; a cache_dir you name is kept).")
_KEEP_CACHE = flags.DEFINE_boolean("keep_cache", None,
                                   "Keep the cache after success (default: only when "
                                   "--cache_dir is given).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"],
                           "Fisher pass dtype (default: bf16 on GPU, fp32 on CPU).")
_BLOCK = flags.DEFINE_integer("fisher_block_size", 1, "Samples per jitted Fisher call.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 4.0, "Shard size limit in GiB.")


def default_output_dir(model: str, method: Method) -> str:
  """out/<last path component of the alias, directory or hub id>-<method>."""
  name = model.rstrip("/").split("/")[-1] or "model"
  return f"out/{name}-{method.value}"


def main(argv):
  del argv
  try:
    config = QuantConfig(seed_bits=_SEED_BITS.value, parent_bits=_PARENT_BITS.value,
                         method=Method(_METHOD.value), seed=_SEED.value,
                         n_init=_N_INIT.value, dp_bins=_DP_BINS.value,
                         split=SplitMethod(_SPLIT.value), nesting=Nesting(_NESTING.value),
                         nesting_bins=_NESTING_BINS.value,
                         nesting_weights=tuple(float(v) for v in _NESTING_WEIGHTS.value),
                         lut_dtype=LutDtype(_LUT_DTYPE.value),
                         fisher_damping=_DAMPING.value)
    calibration = CalibrationConfig(dataset=_CALIBRATION.value,
                                    num_samples=_NUM_SAMPLES.value,
                                    seq_len=_SEQ_LEN.value, seed=_CALIB_SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  options = RunOptions(cache_dir=_CACHE.value, dtype=_DTYPE.value,
                       max_shard_bytes=int(_SHARD_GB.value * 1024 ** 3),
                       fisher_block_size=_BLOCK.value, keep_cache=_KEEP_CACHE.value)
  output_dir = _OUTPUT.value or default_output_dir(_MODEL.value, config.method)
  out = quantize_model(_MODEL.value, output_dir, config, calibration, options)
  print(f"wrote {out} ({cli.human_bytes(cli.dir_size(out))})")


if __name__ == "__main__":
  cli.run(main)
