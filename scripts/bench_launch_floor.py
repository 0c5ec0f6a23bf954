"""The fixed GPU time of the shortest kernels (GPU).

  PYTHONPATH=. python3 scripts/bench_launch_floor.py

A decode step is a chain of ~14 dependent kernels per layer; each pays a fixed time
(start, first memory latency, drain) whatever its bytes. This times, in CUPTI GPU time,
a Mosaic GPU kernel that stores one word per CTA (132 and 344 CTAs, 1 and 4 warpgroups)
and an XLA fusion over 4096 bf16 values (`pallas.benchmark.floor_case`).
"""

from __future__ import annotations

from absl import flags

from anyprec_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 20, "timing samples per case")


def main(argv):
  del argv
  import jax
  from anyprec_jax.pallas import bench_report
  from anyprec_jax.pallas import benchmark as bm
  print("jax", jax.__version__, jax.devices(), flush=True)
  cases = [bm.floor_case("xla"), bm.floor_case("mosaic", 132, 1),
           bm.floor_case("mosaic", 344, 1), bm.floor_case("mosaic", 132, 4)]
  res = {}
  bench_report.run_cases(cases, res, lambda s: print(s, flush=True),
                         samples=FLAGS.samples, gpu_time=True, threads=4)
  print("| kernel | CTAs | warpgroups | GPU us | wall us per call |\n|---|---:|---:|---:|---:|")
  for key, r in res.items():
    print(f"| {key[1]} | {key[2] if key[1] == 'mosaic' else '-'} | "
          f"{key[3] if key[1] == 'mosaic' else '-'} | {r.get('gpu_us', float('nan')):.2f} | "
          f"{r['us']:.2f} |")


if __name__ == "__main__":
  cli.run(main)
