"""Decode attention: the Mosaic GPU kernel against the decoder's XLA attention (GPU).

  PYTHONPATH=. python3 scripts/bench_attention.py --gpu_time --out=$OUT
  PYTHONPATH=. python3 scripts/bench_attention.py --gpu_time --variants=c4t1d6k,c1t4k

One query per sequence over a full KV cache (`pallas.benchmark.ATTENTION_SHAPES`:
Llama-2-7B MHA at 384 and 4096 slots, batch 1 and 8, Llama-3-8B GQA), correctness first
(err = max |kernel - jnp twin| / max |twin|), then the harness of `pallas/benchmark.py`
(buffers rotated past the L2, median of samples; `--gpu_time`: CUPTI kernel time).
"% copy" = the fewest bytes (K and V once) per time over the measured copy bandwidth.
"""

from __future__ import annotations

from absl import flags

from anyprec_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "directory for the JSON results and the table")
flags.DEFINE_bool("gpu_time", False, "also report each case's GPU kernel time (CUPTI)")
flags.DEFINE_integer("samples", 20, "timing samples per case")
flags.DEFINE_list("variants", [], "extra kernel launches, as specs of "
                  "`decode_attention.config_from_spec` (e.g. c4t1d6k, c12x); the default "
                  "launch always runs")
flags.DEFINE_list("ctas_per_head", [], "extra launches with C CTAs per head (= c<C>)")
flags.DEFINE_list("groups", [], "extra launches with U slots per warp step (= u<U>)")
flags.DEFINE_list("shapes", [], "shape names (default: pallas.benchmark.ATTENTION_SHAPES; "
                  "also EXTRA_ATTENTION_SHAPES, e.g. '7b b1 s128')")


def main(argv):
  del argv
  import jax
  from anyprec_jax.pallas import bench_report
  from anyprec_jax.pallas import benchmark as bm
  from anyprec_jax.pallas.mosaic import decode_attention as da
  print("jax", jax.__version__, jax.devices(), flush=True)
  cfgs = [da.DecodeAttentionConfig()]
  specs = (FLAGS.variants + [f"c{c}" for c in FLAGS.ctas_per_head]
           + [f"u{u}" for u in FLAGS.groups])
  cfgs += [da.config_from_spec(v) for v in specs]
  cases = [bm.copy_case()]
  for shape in bm.attention_shapes(FLAGS.shapes):
    cases.append(bm.attention_case(shape, "xla"))
    cases += [bm.attention_case(shape, "mosaic", cfg) for cfg in cfgs]
    cases.append(bm.attention_case(shape, "mosaic_kernel"))  # the XLA merge's share
  res = {}
  bench_report.run_cases(cases, res, lambda s: print(s, flush=True), samples=FLAGS.samples,
                         gpu_time=FLAGS.gpu_time, threads=4)
  copy = res[("copy",)]["tbps"]
  t = "gpu_us" if FLAGS.gpu_time else "us"
  lines = [f"copy bandwidth {copy:.2f} TB/s; time column: {t}",
           "| shape | impl | config | us | % copy | vs xla | err |", "|---|---|---|---:|---:|---:|---:|"]
  for key, r in res.items():
    if key[0] != "attention":
      continue
    if "error" in r:
      lines.append(f"| {key[1]} | {key[2]} | {key[3]} | error: {r['error'][:80]} | | | |")
      continue
    ref = res.get(("attention", key[1], "xla", ""), {})
    us = r.get(t, r["us"])
    vs = f"{ref.get(t, ref.get('us', float('nan'))) / us:.2f}" if "us" in ref else "-"
    lines.append(f"| {key[1]} | {key[2]} | {key[3] or 'xla'} | {us:.1f} | "
                 f"{100 * r['bytes'] / (us * 1e-6) / 1e12 / copy:.0f}% | {vs} | "
                 f"{r['err']:.1e} |")
  table = "\n".join(lines)
  bench_report.save(FLAGS.out, "attention", table + "\n", res)
  print(table)


if __name__ == "__main__":
  cli.run(main)
