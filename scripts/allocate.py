r"""Per-layer bit allocations of an any-precision checkpoint, recomputed from a Fisher pass.

  python scripts/allocate.py --model=/tmp/smol-anyprec \
      --fisher_dir=/tmp/smol-anyprec.cache/fisher-<key> [--source=/tmp/smollm2-135m-instruct-hf] \
      [--targets=3.25,3.5,3.75,4.5]

Computes, for every quantized module and every width, the Fisher-weighted error
E_M(b) = sum F (W - W_b)^2 (source weights W, the checkpoint's planes and LUTs, the
Fisher sums of `--fisher_dir`: the `fisher-*` folder of the quantizer's --cache_dir,
kept with --keep_cache or a named --cache_dir), solves the allocation of each target
average precision (exact knapsack per fusion group, `anyprec_jax/allocation.py`) and
rewrites the checkpoint's config.json (`anyprec.fisher_errors`, `anyprec.allocations`).
`scripts/quantize.py` already stores both; use this for checkpoints written before, or
with another Fisher pass or other targets. Prints the allocations.
"""

from __future__ import annotations

from absl import flags

from anyprec_jax import cli

_MODEL = flags.DEFINE_string("model", None, "Any-precision checkpoint directory.",
                             required=True)
_FISHER = flags.DEFINE_string("fisher_dir", None, "Fisher pass folder (fisher-*).",
                              required=True)
_SOURCE = flags.DEFINE_string("source", None, "Source model directory (default: the "
                              "checkpoint's anyprec.source_model).")
_TARGETS = flags.DEFINE_list("targets", None, "Average precisions to store (default: "
                             "every quarter bit between the seed and the parent).")


def main(argv):
  del argv
  from anyprec_jax.quantize import fractional  # noqa: PLC0415 (after cli start-up)
  targets = None if _TARGETS.value is None else cli.parse_precisions(_TARGETS.value,
                                                                     "--targets")
  section = fractional.recompute(_MODEL.value, _SOURCE.value, _FISHER.value, targets)
  print("| target | average bits | bytes | budget bytes | sum E |")
  print("|---:|---:|---:|---:|---:|")
  for a in section["allocations"]:
    print(f"| {a['target']} | {a['average_bits']:.3f} | {a['bytes']} | "
          f"{a['budget_bytes']} | {a['objective']:.4g} |")


if __name__ == "__main__":
  cli.run(main)
