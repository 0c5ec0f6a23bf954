r"""Tensor-core GEMV (b = 3..8; M = 1 and 8) against XLA bf16, the Mosaic LUT GEMV (M = 1)
and the Triton GEMV.

On the GPU machine: PYTHONPATH=. python3 scripts/bench_tc_gemv.py --out=$OUT
Checks each case against the pure-jnp reference (LUT rounded to bf16, the kernel's
operand precision), times it in the same run as bf16 `jnp.dot` and a device copy.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags

from anyprec_jax import cli

flags.DEFINE_string("out", "", "directory for the JSON results")
flags.DEFINE_bool("gpu_time", False, "also report each case's GPU kernel time from a "
                  "CUPTI trace (the 'GPU us' columns; wall time has a ~11-20 us "
                  "per-call floor)")
flags.DEFINE_string("bits", "3,4", "bit widths")
flags.DEFINE_string("m", "1,8", "activation rows")
flags.DEFINE_bool("triton", True, "also time the Triton GEMV")
flags.DEFINE_string("triton_m", "", "rows M at which to time Triton (default: all of --m)")
flags.DEFINE_bool("lut_gemv", False, "also time the Mosaic LUT GEMV (M = 1, b >= 5)")
flags.DEFINE_integer("samples", 20, "timing samples per case")
flags.DEFINE_string("variants", "", "comma list of variant names, each optionally "
                    "@layout (default: all, on every layout of --layouts)")
flags.DEFINE_string("layouts", "tc", "comma list of plane layouts: tc, tc_tiled")
flags.DEFINE_string("shapes", "", "comma list of gate/up, down, q/k/v/o, tiny (16x256: "
                    "the per-call floor), qkv and gate_up (fused, 12288 and 22016 rows) "
                    "(default: the three 7B shapes)")
FLAGS = flags.FLAGS


def _parse_variant(name: str):
  """rt<R>_t<T>[_s<S>][_xs][_k<K>][_d<D>][_b<C>]: row tiles, warpgroups, ring stages,
  shared activations, K split over CTAs, prefetch depth, bulk-copy chunks (tables loaded
  first, as the model path does); "model[_k<K>][_d<D>][_b<C>][_early][_nosplit4]
  [_p<probe>][_smem][_t<T>]": `config_for` with those changes, early loads, without the
  split 4-bit decode (on by default since step 7), a probe (`TcGemvConfig.probe`:
  loads, decode), shared-memory tables at any width and/or T warpgroups."""
  import re
  from anyprec_jax.pallas.mosaic.gemv_tc import TcGemvConfig
  m = re.fullmatch(r"model(?:_k(\d+))?(?:_d(\d+))?(?:_b(\d+))?(_early)?(_nosplit4)?"
                   r"(?:_p(loads|decode))?(_smem)?(?:_t(\d))?", name)
  if m:
    extra = dict(smem_tables=True) if m.group(7) else {}
    if m.group(8):
      extra["warpgroups"] = int(m.group(8))
    return ("model", dict(ksplit=int(m.group(1) or 1), depth=int(m.group(2) or 1),
                          bulk=int(m.group(3) or 0), early_loads=bool(m.group(4)),
                          split4=not m.group(5), probe=m.group(6) or "", **extra))
  m = re.fullmatch(r"rt(\d+)_t(\d+)(?:_s(\d+))?(_xs)?(?:_k(\d+))?(?:_d(\d+))?"
                   r"(?:_b(\d+))?", name)
  if not m:
    raise ValueError(f"unknown variant {name!r}")
  return TcGemvConfig(row_tiles=int(m.group(1)), warpgroups=int(m.group(2)),
                      stages=int(m.group(3) or 0), x_smem=bool(m.group(4)),
                      ksplit=int(m.group(5) or 1), depth=int(m.group(6) or 1),
                      bulk=int(m.group(7) or 0))


def main(argv):
  del argv
  import jax
  from anyprec_jax.pallas import bench_report
  from anyprec_jax.pallas import benchmark as bm
  from anyprec_jax.pallas.mosaic.gemv_tc import TcGemvConfig as C
  print("jax", jax.__version__, jax.devices(), flush=True)
  variants = {"rt2": C(), "rt1": C(row_tiles=1), "rt2_t1": C(warpgroups=1),
              "rt2_t2": C(warpgroups=2), "rt4_t1": C(row_tiles=4, warpgroups=1),
              "rt4_t2": C(row_tiles=4, warpgroups=2),
              "rt2_t1_s3": C(warpgroups=1, stages=3), "rt2_t1_s4": C(warpgroups=1, stages=4),
              "rt2_t2_s3": C(warpgroups=2, stages=3), "rt2_t2_s4": C(warpgroups=2, stages=4),
              "rt2_t4_s2": C(warpgroups=4, stages=2),
              # Shared-memory activations (B fragments by 16-byte loads).
              "rt2_t1_xs": C(warpgroups=1, x_smem=True),
              "rt2_t2_xs": C(warpgroups=2, x_smem=True),
              "rt2_t1_s3_xs": C(warpgroups=1, stages=3, x_smem=True),
              "rt2_t2_s3_xs": C(warpgroups=2, stages=3, x_smem=True),
              "rt2_t1_s2_xs": C(warpgroups=1, stages=2, x_smem=True),
              "rt4_t1_s2_xs": C(row_tiles=4, warpgroups=1, stages=2, x_smem=True),
              "rt1_t1": C(row_tiles=1, warpgroups=1), "rt1_t2": C(row_tiles=1, warpgroups=2),
              "rt1_t4": C(row_tiles=1, warpgroups=4), "rt2_t4": C(warpgroups=4)}
  # "<name>_late": the same with the LUTs loaded before the first block (before step 5).
  variants |= {f"{k}_late": dataclasses.replace(v, early_loads=False)
               for k, v in list(variants.items())}
  # "model" (old name "model_late"): what `config_for` picks for the shape, bits and M;
  # "model_early" etc. are parsed by `_parse_variant`.
  variants["model"] = variants["model_late"] = "model"
  # A variant "name@tc_tiled" runs `name` on TC_TILED planes; plain names run on each
  # layout of --layouts.
  wanted = (FLAGS.variants.split(",") if FLAGS.variants
            else [f"{v}@{lay}" for v in variants for lay in FLAGS.layouts.split(",")])
  wanted = [w if "@" in w else f"{w}@{lay}" for w in wanted
            for lay in ([None] if "@" in w else FLAGS.layouts.split(","))]
  runs = [(w, variants.get(w.split("@")[0]) or _parse_variant(w.split("@")[0]),
           w.split("@")[1] == "tc_tiled") for w in wanted]
  shapes = [bm.Shape("7b gate/up", 11008, 4096), bm.Shape("7b down", 4096, 11008),
            bm.Shape("7b q/k/v/o", 4096, 4096), bm.Shape("probe tiny", 16, 256),
            bm.Shape("7b qkv", 12288, 4096), bm.Shape("7b gate_up", 22016, 4096)]
  wanted_shapes = (FLAGS.shapes or "gate/up,down,q/k/v/o").split(",")  # tiny: the floor
  shapes = [s for s in shapes if s.name.split()[1] in wanted_shapes]
  cases = [bm.copy_case()]
  for s in shapes:
    for m in (int(v) for v in FLAGS.m.split(",")):
      cases.append(bm.bf16_case(s, m))
      for bits in (int(b) for b in FLAGS.bits.split(",")):
        for label, cfg, tiled in runs:
          if cfg == "model" or isinstance(cfg, tuple):
            from anyprec_jax.pallas.mosaic import gemv_tc as gt
            base = gt.config_for(bits, m, s.n, s.k, tiled=tiled)
            cfg = dataclasses.replace(base, **cfg[1]) if isinstance(cfg, tuple) else base
          if bits >= 5 and cfg.row_tiles % 2 and cfg.row_tiles != 1:
            continue  # two tiles share a shared-memory table
          cases.append(bm.tc_gemv_case(s, bits, m, cfg, tiled=tiled, label=label))
        if FLAGS.lut_gemv and m == 1 and bits >= 5:
          from anyprec_jax.pallas.mosaic import gemv as mg
          cases.append(bm.mosaic_gemv_case(s, bits, mg.config_for(bits, s.n, s.k),
                                           label="lut"))
        triton_m = FLAGS.triton_m or FLAGS.m
        if FLAGS.triton and str(m) in triton_m.split(","):
          cases.append(bm.gemv_case(s, bits, m))
  res = {}
  bench_report.run_cases(cases, res, lambda s: print(s, flush=True), samples=FLAGS.samples,
                         gpu_time=FLAGS.gpu_time, threads=4)
  copy = res[("copy",)]["tbps"]
  gt_ = FLAGS.gpu_time
  lines = [f"copy bandwidth {copy:.2f} TB/s",
           "| shape | M | bits | kernel | us | eff TB/s | % copy | vs bf16 | err |"
           + (" GPU us | GPU % copy | GPU vs bf16 |" if gt_ else ""),
           "|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if gt_ else "")]
  gpu_cols = lambda r, ref: (f" {r['gpu_us']:.1f} | {100 * r['gpu_tbps'] / copy:.0f}% | "
                             f"{ref['gpu_us'] / r['gpu_us']:.2f} |" if gt_ else "")
  for key, r in res.items():
    if key[0] not in ("tc", "gemv", "mosaic") or "error" in r:
      if "error" in r:
        lines.append(f"| {key} | error: {r['error'][:80]} |")
      continue
    shape = key[1]
    m = 1 if key[0] == "mosaic" else key[3]
    ref = res[("bf16", shape, m)]
    kern = {"tc": f"tc {key[-1]}", "mosaic": "lut gemv"}.get(key[0], "triton")
    lines.append(f"| {shape} | {m} | {key[2]} | {kern} | {r['us']:.1f} | {r['tbps']:.2f} | "
                 f"{100 * r['tbps'] / copy:.0f}% | {ref['us'] / r['us']:.2f} | "
                 f"{r['err']:.1e} |" + gpu_cols(r, ref))
  for s in shapes:
    for m in (int(v) for v in FLAGS.m.split(",")):
      r = res[("bf16", s.name, m)]
      lines.append(f"| {s.name} | {m} | bf16 | xla | {r['us']:.1f} | {r['tbps']:.2f} | "
                   f"{100 * r['tbps'] / copy:.0f}% | 1.00 | |" + gpu_cols(r, r))
  table = "\n".join(lines)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "tc_gemv.json"), "w") as f:
      json.dump({"|".join(map(str, k)): v for k, v in res.items()}, f, indent=1,
                default=str)
    with open(os.path.join(FLAGS.out, "tc_gemv_table.md"), "w") as f:
      f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  cli.run(main)
