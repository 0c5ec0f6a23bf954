"""What `ops.py` calls: y = x @ W_b^T for any M through the Pallas kernels.

On Hopper (compute capability >= 9.0, `backend.mosaic_available`):
  planes in the TC order, 3..8 bits, M = 2..8 (M = 1 where `backend.tc_gemv_at_m1`, or
  always for TC_TILED planes): the tensor-core GEMV (`mosaic/gemv_tc.py`);
  M = 1 otherwise (TC order, or format order at 5..8 bits): the Mosaic GPU LUT GEMV
  (`mosaic/gemv.py`).
Everything else: the Pallas-Triton bitplane GEMV (`triton/gemv.py`) for M <= 8; TC planes
are read with activations gathered into the TC word order (`plane_layout.x_to_tc`);
TC_TILED planes are first transposed back to TC by XLA. M > 8 (prefill): the
dequantisation kernel (`triton/dequant.py`) writes W_b in kernel column order in the
activations' dtype and XLA's dot multiplies it with equally permuted activations (fp32
accumulation).

Tilings per bit width live in `gemv_config` / `dequant_config`, tuned on an H100
(benchmarks/notes_kernels.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from anyprec_jax import plane_layout
from anyprec_jax.pallas import backend, bitops
from anyprec_jax.pallas.triton import decode, dequant, gemv, lowering
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax.weight import AnyPrecWeight

# Enough programs to cover 132 SMs about twice; split K when rows alone do not.
TARGET_PROGRAMS = 264

# (block_n, block_w, num_warps) per bit width for the GEMV at M = 1: the winners of
# the tile sweep on an H100 (benchmarks/results/kernels.md; b4 and b8 had been left at
# (32, 64, 8), up to 2x slower at b8 on the 7B shapes, see notes_kernels.md).
_GEMV_TILES = {
    1: (64, 32, 8), 2: (64, 32, 8), 3: (64, 32, 8), 4: (16, 32, 4),
    5: (16, 32, 4), 6: (16, 32, 4), 7: (16, 32, 4), 8: (16, 32, 4),
}


def _pow2_floor(v: int) -> int:
  return 1 << (max(v, 1).bit_length() - 1)


def gemv_config(bits: int, n: int, k: int, m: int,
                tiles: tuple[int, int, int] | None = None,
                lookup: decode.Lookup | None = None,
                prefetch: bool | None = None,
                stages: int | None = None) -> gemv.GemvConfig:
  """The GEMV tiling for an [M, K] x [N, K]^T product at precision `bits`.

  Args:
    bits, n, k, m: precision and problem size.
    tiles: (block_n, block_w, num_warps) at M = 1 instead of the tuned table.
    lookup: value look-up path instead of `decode.default_lookup(bits)`.
    prefetch: software pipelining of the plane loads (default off: slower or equal at
      every width in the variant run of benchmarks/results/kernel_variants.md).
    stages: Triton `num_stages` instead of 1.
  """
  # Same tiles for every M <= 8: more rows per thread let one x load serve more
  # weights (halving BN for M = 8 doubled the x loads and was 2x slower, run 1).
  bn, bw, warps = tiles or _GEMV_TILES[bits]
  words = -(-k // bitops.WORD_BITS)
  bw = min(bw, _pow2_floor(words))
  programs = -(-n // bn)
  splits = 1
  while programs * splits < TARGET_PROGRAMS and 2 * splits * bw <= words:
    splits *= 2
  return gemv.GemvConfig(block_n=bn, block_w=bw, k_splits=splits,
                         lookup=lookup or decode.default_lookup(bits),
                         prefetch=bool(prefetch),
                         launch=lowering.LaunchParams(num_warps=warps,
                                                      num_stages=stages or 1))


def dequant_config(bits: int, n: int, k: int) -> dequant.DequantConfig:
  """The dequantisation tiling at precision `bits`."""
  words = -(-k // bitops.WORD_BITS)
  return dequant.DequantConfig(block_n=32, block_w=min(32, _pow2_floor(words)),
                               lookup=decode.default_lookup(bits),
                               launch=lowering.LaunchParams(num_warps=4))


def _runs_tc_gemv(w: AnyPrecWeight, m: int) -> bool:
  """Whether `anyprec_matmul` of m rows runs the tensor-core GEMV (Mosaic available)."""
  bits, n, k = w.bits, w.out_features, w.in_features
  tiled = w.layout is PlaneLayout.TC_TILED
  use_tc = 3 <= bits <= 8 and (m > 1 or tiled or backend.tc_gemv_at_m1(bits, n, k))
  return (w.layout is not PlaneLayout.FORMAT and use_tc and m <= gemv.MAX_ROWS
          and k % 2 == 0)


def folds_rms(w: AnyPrecWeight, m: int) -> bool:
  """Whether `anyprec_matmul(x2, w, rms=...)` of m rows can fold an RMSNorm: on the
  tensor-core GEMV (Hopper), K % 8 == 0."""
  return (backend.mosaic_available() and _runs_tc_gemv(w, m)
          and w.in_features % 8 == 0)


def runs_epilogue(w: AnyPrecWeight, m: int) -> bool:
  """Whether `anyprec_matmul(x2, w, residual=...)` of m rows can add the residual in
  the GEMV's epilogue: on the tensor-core GEMV (Hopper)."""
  return backend.mosaic_available() and _runs_tc_gemv(w, m)


def runs_glu(w: AnyPrecWeight, m: int) -> bool:
  """Whether `anyprec_matmul(x2, w, glu=True)` of m rows can form silu(gate) * up in
  the GEMV's epilogue (w = gate rows over up rows, 2F rows with F % 16 == 0)."""
  return runs_epilogue(w, m) and w.out_features % 32 == 0


def _model_tc_config(w: AnyPrecWeight, m: int, two_tiles: bool = False):
  """The model path's tensor-core GEMV launch for w at m rows: `config_for`, with the
  PDL and shared-table switches; `two_tiles` (the gated and q/k/v epilogues: a CTA
  takes two partner tiles) forces 2 row tiles and no plane ring or bulk copies."""
  from anyprec_jax.pallas.mosaic import gemv_tc  # Hopper only.
  cfg = dataclasses.replace(
      gemv_tc.config_for(w.bits, m, w.out_features, w.in_features,
                         tiled=w.layout is PlaneLayout.TC_TILED),
      pdl=backend.pdl(), smem_tables=w.bits >= backend.smem_table_bits())
  return dataclasses.replace(cfg, row_tiles=2, stages=0, bulk=0) if two_tiles else cfg


def runs_rope_kv(w: AnyPrecWeight, m: int, head_dim: int) -> bool:
  """Whether `rope_kv` of m rows runs: the tensor-core GEMV (Hopper) of a fused q/k/v
  weight with head_dim % 32 == 0."""
  return (runs_epilogue(w, m) and head_dim % 32 == 0
          and w.out_features % head_dim == 0)


def rope_kv(x2: jax.Array, w: AnyPrecWeight, rms: tuple[jax.Array, float] | None,
            cos: jax.Array, sin: jax.Array, slots: jax.Array, k_cache: jax.Array,
            v_cache: jax.Array, spec):
  """A decode step's fused q/k/v projection with RoPE and the KV-cache write in the
  tensor-core GEMV's epilogue (`mosaic.gemv_tc.gemv_tc_rope_kv`; only where
  `runs_rope_kv`). x2 [M, K] (with `rms`: the folded norm's x * w and (x, eps));
  cos, sin [M, Dh / 2] f32; slots [M] int32; caches [M, S, KVH, Dh] bf16; spec a
  `gemv_tc.RopeSpec`. Returns (q [M, q_rows] bf16, k_cache, v_cache)."""
  from anyprec_jax.pallas.mosaic import gemv_tc  # Hopper only.
  bits = w.bits
  tiled = w.layout is PlaneLayout.TC_TILED
  cfg = _model_tc_config(w, x2.shape[0], two_tiles=True)
  return gemv_tc.gemv_tc_rope_kv(  # all planes: the kernel reads 0..b-1 (no slice copy)
      x2, w.planes, w.luts[bits], cos, sin, slots, k_cache, v_cache, bits=bits, spec=spec,
      cfg=cfg, tiled=tiled, norm_x=None if rms is None else rms[0],
      rms_eps=None if rms is None else rms[1])


def anyprec_matmul(x2: jax.Array, w: AnyPrecWeight, interpret: bool = False,
                   rms: tuple[jax.Array, float] | None = None,
                   residual: jax.Array | None = None,
                   epi_weight: jax.Array | None = None, glu: bool = False):
  """y = x2 @ W_b^T with b = w.bits, through the Pallas kernels.

  Args:
    x2: [M, K] activations (bf16/fp16/fp32).
    w: the weight; only planes 0..b-1 and the b-bit LUT are read.
    interpret: run the kernels in the Pallas interpreter (CPU).
    rms: (norm_x [M, K], eps): an RMSNorm folded into the tensor-core GEMV (x2 is
      norm_x times the norm's weight; row m of y is scaled by 1 / rms(norm_x[m])).
      Only where `folds_rms(w, M)`.
    residual, epi_weight: [M, N] bf16 and [N] (or None): the residual epilogue of the
      tensor-core GEMV (`gemv_tc.gemv_tc`); only where `runs_epilogue(w, M)`.
    glu: w is gate rows over up rows: return bf16(silu(gate) * up) [M, N / 2] from
      the GEMV's epilogue; only where `runs_glu(w, M)`.

  Returns:
    [M, N] float32; with residual, h = residual + y [M, N] bf16, or (h, h * epi_weight).
  """
  bits = w.bits
  planes, lut = w.planes, w.luts[bits]
  if bits <= 4 and lut.dtype not in (jnp.float16, jnp.bfloat16):
    lut = lut.astype(jnp.float16)  # register byte tables hold 16-bit values only
  m, k = x2.shape
  n = w.out_features
  if k != w.in_features:
    raise ValueError(f"x has {k} features, weight expects {w.in_features}")
  tiled = w.layout is PlaneLayout.TC_TILED
  tc = w.layout is not PlaneLayout.FORMAT
  if rms is not None and (interpret or not folds_rms(w, m)):
    raise ValueError(f"an RMSNorm folds only into the tensor-core GEMV (M={m}, "
                     f"{bits} bits, layout {w.layout.value}, K={k})")
  if glu and (interpret or not runs_glu(w, m)):
    raise ValueError(f"silu(gate) * up forms in the epilogue of the tensor-core GEMV "
                     f"only (M={m}, {bits} bits, N={n}, layout {w.layout.value})")
  if residual is not None and (interpret or not runs_epilogue(w, m)):
    raise ValueError(f"a residual adds in the epilogue of the tensor-core GEMV only "
                     f"(M={m}, {bits} bits, layout {w.layout.value})")
  if not interpret and backend.mosaic_available():
    if _runs_tc_gemv(w, m):
      from anyprec_jax.pallas.mosaic import gemv_tc  # Hopper only.
      cfg = _model_tc_config(w, m, two_tiles=glu)
      return gemv_tc.gemv_tc(x2, planes, lut, bits=bits, tiled=tiled, cfg=cfg, glu=glu,
                             norm_x=None if rms is None else rms[0],
                             rms_eps=None if rms is None else rms[1],
                             residual=residual, epi_weight=epi_weight)
    if (tiled and m > gemv.MAX_ROWS and 3 <= bits <= 8
        and backend.tiled_prefill() == "mosaic"):
      from anyprec_jax.pallas.mosaic import gemv_tc  # Hopper only.
      dtype = x2.dtype if x2.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
      wd = gemv_tc.dequantize_tc(planes, lut, bits=bits, in_features=k, dtype=dtype,
                                 tiled=True)  # [N, K]
      return jnp.dot(x2.astype(dtype), wd.T, preferred_element_type=jnp.float32)
  if tiled:  # Every other kernel reads TC planes row by row: an XLA transpose first.
    planes = plane_layout.untile(planes[:bits])
  if (m == 1 and not interpret and backend.mosaic_available()
      and (tc or backend.gemv_backend(bits) is backend.GpuBackend.MOSAIC)):
    from anyprec_jax.pallas.mosaic import gemv as mosaic_gemv  # Hopper only.
    return mosaic_gemv.gemv(x2, planes, lut, bits=bits, tc_order=tc,
                            cfg=mosaic_gemv.config_for(bits, n, k))
  if tc:  # The Triton kernels read TC planes with activations in TC word order.
    x2 = plane_layout.x_to_tc(x2, k)  # [M, 32 W_tc]
    k = x2.shape[1]
  if m <= gemv.MAX_ROWS:
    return gemv.gemv(x2, planes, lut, bits=bits, cfg=gemv_config(bits, n, k, m),
                     interpret=interpret)
  dtype = x2.dtype if x2.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  cfg = dequant_config(bits, n, k)
  wd = dequant.dequantize_permuted(planes, lut, bits=bits, dtype=dtype, cfg=cfg,
                                   interpret=interpret)  # [N, 32 Wp]
  wp = wd.shape[1] // bitops.WORD_BITS
  xp = bitops.permute_columns(x2.astype(dtype), bits, wp).reshape(m, -1)  # [M, 32 Wp]
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.dot(xp, wd.T, precision=precision, preferred_element_type=jnp.float32)
