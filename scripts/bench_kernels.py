"""Benchmarks the any-precision Pallas kernels against XLA's fp16 dot on a GPU.

  PYTHONPATH=. python3 scripts/bench_kernels.py --out=$OUT [--sweep] [--quick]

Prints, per shape, µs, effective TB/s, % of the measured copy bandwidth and the
speed-up over fp16 `jnp.dot` for M in {1, 4, 8} and b in 3..8 (logic in
`anyprec_jax.pallas.bench_report`).
"""

import sys

from absl import flags

from anyprec_jax import cli

from anyprec_jax.pallas import bench_report as br
from anyprec_jax.pallas import benchmark as bm

_SWEEP = flags.DEFINE_bool("sweep", True, "Tile sweep on 4096x4096 at M=1 first; the "
                          "table then uses the fastest tiles per width.")
_OUT = flags.DEFINE_string("out", "", "Directory for the markdown table and raw JSON.")
_QUICK = flags.DEFINE_bool("quick", False, "Only the Llama-2-7B shapes.")
_SHAPE_IDS = flags.DEFINE_list("shape_ids", [], "Indices into benchmark.SHAPES "
                               "(default: all, or the 7B ones with --quick).")
_BITS = flags.DEFINE_list("bits", ["3", "4", "5", "6", "7", "8"], "Bit widths.")
_MS = flags.DEFINE_list("m", ["1", "4", "8"], "Activation rows.")
_VARIANTS = flags.DEFINE_bool("variants", False, "Instead of the table: time each "
                              "(prefetch, num_stages) variant of bench_report.VARIANTS.")


def main(argv):
  del argv
  bits_list = [int(b) for b in _BITS.value]
  ms = [int(m) for m in _MS.value]
  shapes = bm.SHAPES[:3] if _QUICK.value else bm.SHAPES
  if _SHAPE_IDS.value:
    shapes = tuple(bm.SHAPES[int(i)] for i in _SHAPE_IDS.value)
  results = {}
  log = lambda s: print(s, flush=True)
  br.run_cases([bm.copy_case()], results, log)
  copy_tbps = results[("copy",)]["tbps"]
  if _VARIANTS.value:
    br.run_cases(br.variant_cases(shapes, bits_list, ms), results, log)
    text = br.header(" ".join(["python3"] + sys.argv), copy_tbps)
    text += "\n" + br.format_variants(results, shapes, bits_list, ms) + "\n"
    br.save(_OUT.value, "kernel_variants", text, results)
    print(text)
    return
  tiles = {}
  if _SWEEP.value:
    br.run_cases(br.sweep_cases(bits_list), results, log)
    tiles = {b: br.best_tiles(results, b) for b in bits_list}
    log(f"best tiles: {tiles}")
  br.run_cases(br.table_cases(shapes, bits_list, ms, tiles), results, log)
  text = br.header(" ".join(["python3"] + sys.argv), copy_tbps)
  text += br.format_table(results, shapes, bits_list, ms, copy_tbps, tiles)
  br.save(_OUT.value, "kernels", text, results)
  print(text)


if __name__ == "__main__":
  cli.run(main)
