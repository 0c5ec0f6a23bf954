r"""Gate run for the Mosaic GPU GEMV (issue 15): correctness, then M = 1 timings.

On the GPU machine:
  PYTHONPATH=. python3 scripts/bench_mosaic_gemv.py --out=$OUT

Checks every variant against the pure-jnp reference on odd shapes (fresh random
inputs), then times variants on the 7B gate/up and down shapes against XLA's bf16
`jnp.dot` and a device copy in the same run (weights rotated across >= 256 MB of
buffers). Prints one table; writes JSON under --out.
"""

from __future__ import annotations

import json
import os

from absl import flags

from anyprec_jax import cli

flags.DEFINE_string("out", "", "directory for the JSON results")
flags.DEFINE_string("bits", "8,5,3", "bit widths")
flags.DEFINE_string("variants", "", "comma list of variant names (default: all)")
flags.DEFINE_integer("samples", 25, "timing samples per case")
flags.DEFINE_bool("dump_only", False, "compile and run the default variant once per "
                  "width at 11008x4096 (for MOSAIC_GPU_DUMP_* runs) and exit")
FLAGS = flags.FLAGS


def variants():
  from anyprec_jax.pallas.mosaic.gemv import MosaicGemvConfig as C
  return {
      "r4t4": C(rows=4, warpgroups=4),
      "r4t4_c1": C(rows=4, warpgroups=4, chains=1),
      "r2t4_c1": C(rows=2, warpgroups=4, chains=1),
      "r4t4_nopf": C(rows=4, warpgroups=4, prefetch=False),
      "r2t4": C(rows=2, warpgroups=4),
      "r8t4": C(rows=8, warpgroups=4),
      "r4t2x2": C(rows=4, warpgroups=2, ctas_per_sm=2),
      "r4t4_f32": C(rows=4, warpgroups=4, lut_f32=True),
  }


# Which widths each variant is timed at (all are checked).
APPLIES = {"r4t4_f32": (3, 4, 5), "r8t4": (3, 4)}


def check_all(bits_list, chosen):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from anyprec_jax.pallas.mosaic import gemv as mg
  rows = []
  for bits in bits_list:
    for name, cfg in chosen.items():
      for (n, k) in ((1000, 4000), (257, 11008)):
        key = jax.random.PRNGKey(hash((bits, name, n, k)) % 2**31)
        kx, kp, kl = jax.random.split(key, 3)
        x = jax.random.normal(kx, (1, k), jnp.bfloat16)
        planes = jax.random.bits(kp, (8, n, -(-k // 32)), jnp.uint32)
        lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
        try:
          got = np.asarray(mg.gemv(x, planes, lut, bits=bits, cfg=cfg), np.float64)
          want = np.asarray(mg.gemv_reference(x, planes, lut, bits=bits, in_features=k),
                            np.float64)
          err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
          if not np.isfinite(got).all():
            err = float("inf")
        except Exception as e:  # pylint: disable=broad-except
          err = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(dict(bits=bits, variant=name, n=n, k=k, err=err))
        print(f"check b{bits} {name} {n}x{k}: {err}", flush=True)
  return rows


def main(argv):
  del argv
  import jax
  from anyprec_jax.pallas import benchmark as bm
  print("jax", jax.__version__, jax.devices(), flush=True)
  bits_list = [int(b) for b in FLAGS.bits.split(",")]
  allv = variants()
  chosen = {k: v for k, v in allv.items()
            if not FLAGS.variants or k in FLAGS.variants.split(",")}
  if FLAGS.dump_only:
    import jax.numpy as jnp
    from anyprec_jax.pallas.mosaic import gemv as mg
    for bits in bits_list:
      x = jnp.ones((1, 4096), jnp.bfloat16)
      planes = jnp.ones((bits, 11008, 128), jnp.uint32)
      lut = jnp.ones((11008, 1 << bits), jnp.float16)
      print(bits, mg.gemv(x, planes, lut, bits=bits).sum(), flush=True)
    return
  checks = check_all(bits_list, chosen)
  ok = {(r["bits"], r["variant"]) for r in checks
        if isinstance(r["err"], float) and r["err"] < 1e-3}
  shapes = [bm.Shape("7b gate/up", 11008, 4096), bm.Shape("7b down", 4096, 11008),
            bm.Shape("7b q/k/v/o", 4096, 4096)]
  cases = [bm.copy_case()]
  for s in shapes:
    cases.append(bm.bf16_case(s, 1))
    for bits in bits_list:
      for name, cfg in chosen.items():
        if bits not in APPLIES.get(name, range(1, 9)):
          continue
        if (bits, name) in ok:
          cases.append(bm.mosaic_gemv_case(s, bits, cfg, label=name))
  bm.compile_all(cases, threads=4)
  results = {}
  for c in cases:
    results[c.key] = bm.time_case(c, samples=FLAGS.samples)
    print(c.key, {k: (round(v, 3) if isinstance(v, float) else v)
                  for k, v in results[c.key].items()}, flush=True)
  copy_tbps = results[("copy",)]["tbps"]
  lines = [f"copy bandwidth {copy_tbps:.2f} TB/s",
           "| shape | bits | variant | us | eff TB/s | % copy | vs bf16 | err |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
  for s in shapes:
    ref = results[("bf16", s.name, 1)]
    lines.append(f"| {s.name} | bf16 | xla | {ref['us']:.1f} | {ref['tbps']:.2f} | "
                 f"{100 * ref['tbps'] / copy_tbps:.0f}% | 1.00 | |")
    for key, r in results.items():
      if key[0] == "mosaic" and key[1] == s.name:
        lines.append(
            f"| {s.name} | {key[2]} | {key[3]} | {r['us']:.1f} | {r['tbps']:.2f} | "
            f"{100 * r['tbps'] / copy_tbps:.0f}% | {ref['us'] / r['us']:.2f} | "
            f"{r['err']:.1e} |")
  table = "\n".join(lines)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "mosaic_gemv.json"), "w") as f:
      json.dump(dict(checks=checks, results={"|".join(map(str, k)): v
                                             for k, v in results.items()}), f, indent=1)
    with open(os.path.join(FLAGS.out, "mosaic_gemv_table.md"), "w") as f:
      f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  cli.run(main)
