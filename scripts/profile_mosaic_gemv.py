r"""One launch of a Mosaic GPU GEMV per width, for `ncu` or `MOSAIC_GPU_DUMP_*` (issue 15).

--kernel=lut: the LUT GEMV (M = 1, format planes); --kernel=tc: the tensor-core GEMV
(M = --m, tensor-core-order planes).

  ncu --clock-control none -k regex:mosaic --launch-skip 1 --section SpeedOfLight \
      --section WarpStateStats python3 scripts/profile_mosaic_gemv.py --bits=3,8
"""

import dataclasses

from absl import flags

from anyprec_jax import cli

flags.DEFINE_string("bits", "3,8", "bit widths")
flags.DEFINE_integer("n", 11008, "rows")
flags.DEFINE_integer("k", 4096, "columns")
flags.DEFINE_enum("kernel", "lut", ["lut", "tc"], "which GEMV")
flags.DEFINE_integer("m", 1, "activation rows (tc only)")
flags.DEFINE_integer("stages", None, "tc: cp.async ring stages (default: config_for)")
flags.DEFINE_integer("warpgroups", None, "tc: warpgroups per CTA (default: config_for)")
flags.DEFINE_bool("tiled", False, "tc: planes in the TC_TILED layout")
flags.DEFINE_bool("x_smem", None, "tc: activations staged in shared memory")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from anyprec_jax import plane_layout
  from anyprec_jax.pallas.mosaic import gemv as mg
  from anyprec_jax.pallas.mosaic import gemv_tc as gt
  n, k = FLAGS.n, FLAGS.k
  for bits in (int(b) for b in FLAGS.bits.split(",")):
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits), 3)
    m = FLAGS.m if FLAGS.kernel == "tc" else 1
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    words = plane_layout.num_words(k) if FLAGS.kernel == "tc" else -(-k // 32)
    planes = jax.random.bits(kp, (bits, n, words), jnp.uint32)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    if FLAGS.kernel == "tc":
      cfg = gt.config_for(bits, m, n, k, tiled=FLAGS.tiled)
      over = {k_: v for k_, v in (("stages", FLAGS.stages),
                                   ("warpgroups", FLAGS.warpgroups),
                                   ("x_smem", FLAGS.x_smem)) if v is not None}
      cfg = dataclasses.replace(cfg, **over)
      run = lambda: gt.gemv_tc(x, planes, lut, bits=bits, cfg=cfg, tiled=FLAGS.tiled)
    else:
      cfg = mg.config_for(bits, n, k)
      run = lambda: mg.gemv(x, planes, lut, bits=bits, cfg=cfg)
    for _ in range(2):  # the first launch is skipped by --launch-skip
      y = run().block_until_ready()
    print(bits, float(y.sum()))


if __name__ == "__main__":
  cli.run(main)
