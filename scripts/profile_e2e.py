r"""Where one decode step's time goes: wall time per step, and per-kernel GPU time (ncu).

  PYTHONPATH=. python3 scripts/profile_e2e.py --precisions=bf16,3,8 --layers=8
  ncu --csv --page raw --metrics gpu__time_duration.sum --profile-from-start off \
      --log-file /tmp/p3.csv python3 scripts/profile_e2e.py --precisions=3 --ncu
  PYTHONPATH=. python3 scripts/profile_e2e.py --parse=/tmp/p3.csv
  PYTHONPATH=. python3 scripts/profile_e2e.py --precisions=bf16,3 --trace_dir=/tmp/tr

Random weights (as `bench_e2e.py`), one jitted `models.decode_step` with the cache
donated. `--ncu` brackets exactly one step with cuProfilerStart / cuProfilerStop, so
`ncu --profile-from-start off` records that step's kernels only. `--parse` groups an
ncu CSV by kernel family (`latency.kernel_family`) and prints the table.
"""

from __future__ import annotations

from absl import flags

from anyprec_jax import cli

_SHAPE = flags.DEFINE_string("shape", "llama-2-7b", "Model shape (latency.Shape).")
_LAYERS = flags.DEFINE_integer("layers", None, "Override the number of layers.")
_PRECISIONS = flags.DEFINE_list("precisions", ["bf16", "3", "8"],
                                "bf16 (the dense baseline) and/or bit widths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per step.")
_CONTEXT = flags.DEFINE_integer("context", 384, "KV-cache slots (>= 8 + 2 iters).")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed steps per model.")
_NCU = flags.DEFINE_bool("ncu", False, "Bracket one step for ncu (no timing).")
_FUSE = flags.DEFINE_bool("fuse", True, "Fuse q/k/v and gate/up, as loading does.")
_PARSE = flags.DEFINE_string("parse", None, "Print the kernel table of this ncu CSV.")
_TRACE = flags.DEFINE_string("trace_dir", None,
                             "After timing, trace one loop per model (jax.profiler, "
                             "CUPTI) here and print its per-kernel GPU table.")


def main(argv):
  del argv
  from anyprec_jax import latency
  if _PARSE.value:
    with open(_PARSE.value) as f:
      print(latency.ncu_kernel_table(f.read()))
    return
  rows = latency.profile_decode_step(
      latency.shape_config(latency.Shape(_SHAPE.value), _LAYERS.value),
      _PRECISIONS.value, batch=_BATCH.value, context=_CONTEXT.value,
      iters=_ITERS.value, ncu=_NCU.value, fuse=_FUSE.value, trace_dir=_TRACE.value)
  if not _NCU.value:
    print("\n| model | ms/step |\n|---|---:|")
    for label, ms in rows:
      print(f"| {label} | {ms:.3f} |")


if __name__ == "__main__":
  cli.run(main)
