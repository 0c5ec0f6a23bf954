r"""One launch of the Mosaic GPU GEMV per width, for `ncu` (issue 15 profiling).

  ncu --clock-control none -k regex:mosaic --launch-skip 1 --section SpeedOfLight \
      --section WarpStateStats python3 scripts/profile_mosaic_gemv.py --bits=3,8
"""

from absl import app, flags

flags.DEFINE_string("bits", "3,8", "bit widths")
flags.DEFINE_integer("n", 11008, "rows")
flags.DEFINE_integer("k", 4096, "columns")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from anyprec_jax.pallas.mosaic import gemv as mg
  n, k = FLAGS.n, FLAGS.k
  for bits in (int(b) for b in FLAGS.bits.split(",")):
    kx, kp, kl = jax.random.split(jax.random.PRNGKey(bits), 3)
    x = jax.random.normal(kx, (1, k), jnp.bfloat16)
    planes = jax.random.bits(kp, (bits, n, -(-k // 32)), jnp.uint32)
    lut = jax.random.normal(kl, (n, 1 << bits), jnp.float16)
    cfg = mg.config_for(bits, n, k)
    for _ in range(2):  # the first launch is skipped by --launch-skip
      y = mg.gemv(x, planes, lut, bits=bits, cfg=cfg).block_until_ready()
    print(bits, float(y.sum()))


if __name__ == "__main__":
  app.run(main)
