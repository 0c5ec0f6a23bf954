"""GPU benchmark of the any-precision kernels against XLA's fp16 dot (issue 4).

Method (METHOD.md of the device tool): correctness against the fp32 reference first;
each timed call applies the op to R distinct weight buffers (R * bytes >= `MIN_BYTES`,
so the 50 MB L2 cannot hold them) and R distinct activations inside one jitted
program; programs are compiled ahead (in threads), warmed up, then timed with
`time.perf_counter` around `PIPELINE` back-to-back dispatches per sample (so host
dispatch hides behind device work); median over >= 20 samples, divided by R. The fp16
baseline and the copy bandwidth use the same harness in the same run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax import ops
from anyprec_jax.pallas import kernels
from anyprec_jax.pallas.triton import gemv
from anyprec_jax.weight import AnyPrecWeight

MIN_BYTES = 256e6
MAX_BUFFERS = 64
PIPELINE = 8


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  n: int  # out features
  k: int  # in features


SHAPES = (
    Shape("llama2-7b q/k/v/o", 4096, 4096),
    Shape("llama2-7b gate/up", 11008, 4096),
    Shape("llama2-7b down", 4096, 11008),
    Shape("mistral-7b gate/up", 14336, 4096),
    Shape("mistral-7b down", 4096, 14336),
    Shape("llama2-70b gate/up", 28672, 8192),
    Shape("llama2-70b down", 8192, 28672),
)
PAPER_SPEEDUP = {3: 3.99, 4: 3.03, 5: 2.61, 6: 2.18, 7: 1.87, 8: 1.56}


@dataclasses.dataclass
class Case:
  """One timed program: `fn(*args)` applies the op to `buffers` weight buffers."""
  key: tuple
  fn: Callable
  make_args: Callable[[], tuple]
  bytes_per_op: float
  buffers: int
  check: Callable[[tuple, object], float] | None = None
  compiled: object = None


def _weights(key, shape: Shape, bits: int, count: int,
             words: int | None = None) -> list[AnyPrecWeight]:
  """`count` random weights holding exactly the b planes a b-bit kernel reads.

  words: words per row (default: the format's ceil(K/32)).
  """
  words = words or -(-shape.k // 32)
  out = []
  for i in range(count):
    kp, kl = jax.random.split(jax.random.fold_in(key, i))
    planes = jax.random.bits(kp, (bits, shape.n, words), jnp.uint32)
    lut = jax.random.normal(kl, (shape.n, 1 << bits), jnp.float16)
    out.append(AnyPrecWeight(planes, {bits: lut}, shape.k, bits))
  return out


def _activations(key, m: int, k: int, count: int, dtype) -> list[jax.Array]:
  return [jax.random.normal(jax.random.fold_in(key, 1000 + i), (m, k), dtype)
          for i in range(count)]


def _num_buffers(bytes_per_op: float) -> int:
  return int(min(MAX_BUFFERS, max(2, np.ceil(MIN_BYTES / bytes_per_op))))


def gemv_case(shape: Shape, bits: int, m: int, tiles=None, lookup=None, prefetch=None,
              stages=None) -> Case:
  """Case for the any-precision product (GEMV path for m <= 8) at `bits`.

  tiles, lookup, prefetch, stages: overrides of `kernels.gemv_config` (None: tuned).
  """
  words = -(-shape.k // 32)
  nbytes = (bits * shape.n * words * 4 + shape.n * (2 << bits) + m * shape.k * 2
            + m * shape.n * 4)
  r = _num_buffers(nbytes)
  cfg = kernels.gemv_config(bits, shape.n, shape.k, m, tiles=tiles, lookup=lookup,
                            prefetch=prefetch, stages=stages)

  def fn(xs, ws):
    return [gemv.gemv(x, w.planes, w.luts[bits], bits=bits, cfg=cfg)
            for x, w in zip(xs, ws)]

  def make_args():
    key = jax.random.PRNGKey(bits * 100 + m)
    return (_activations(key, m, shape.k, r, jnp.bfloat16),
            _weights(key, shape, bits, r))

  def check(args, out):
    x, w = args[0][0], args[1][0]
    want = np.asarray(ops.anyprec_matmul_reference(x, w), np.float64)
    got = np.asarray(out[0], np.float64)
    if not np.isfinite(got).all():
      return float("inf")
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))

  key = ("gemv", shape.name, bits, m, tiles, lookup and lookup.value, prefetch, stages)
  return Case(key, fn, make_args, nbytes, r, check)


def mosaic_gemv_case(shape: Shape, bits: int, cfg, label: str = "") -> Case:
  """Case for the Mosaic GPU GEMV (M = 1) at `bits` with launch config `cfg`."""
  from anyprec_jax.pallas.mosaic import gemv as mosaic_gemv
  words = -(-shape.k // 32)
  nbytes = bits * shape.n * words * 4 + shape.n * (2 << bits) + shape.k * 2 + shape.n * 4
  r = _num_buffers(nbytes)

  def fn(xs, ws):
    return [mosaic_gemv.gemv(x, w.planes, w.luts[bits], bits=bits, cfg=cfg)
            for x, w in zip(xs, ws)]

  def make_args():
    key = jax.random.PRNGKey(bits * 100 + 1)
    return (_activations(key, 1, shape.k, r, jnp.bfloat16),
            _weights(key, shape, bits, r))

  def check(args, out):
    x, w = args[0][0], args[1][0]
    want = np.asarray(ops.anyprec_matmul_reference(x, w), np.float64)
    got = np.asarray(out[0], np.float64)
    if not np.isfinite(got).all():
      return float("inf")
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))

  return Case(("mosaic", shape.name, bits, label or str(cfg)), fn, make_args, nbytes, r,
              check)


def tc_gemv_case(shape: Shape, bits: int, m: int, cfg, label: str = "",
                 tiled: bool = False) -> Case:
  """Case for the tensor-core GEMV (3..8 bits, M <= 8), planes in tensor-core order
  (random bits, so the same arrays stand for TC_TILED planes when `tiled`)."""
  from anyprec_jax import plane_layout as tc_layout
  from anyprec_jax.pallas.mosaic import gemv_tc
  words = tc_layout.num_words(shape.k)
  nbytes = (bits * shape.n * words * 4 + shape.n * (2 << bits) + m * shape.k * 2
            + m * shape.n * 4)
  r = _num_buffers(nbytes)

  def fn(xs, ws):
    return [gemv_tc.gemv_tc(x, w.planes, w.luts[bits], bits=bits, cfg=cfg, tiled=tiled)
            for x, w in zip(xs, ws)]

  def make_args():
    key = jax.random.PRNGKey(bits * 100 + m)
    return (_activations(key, m, shape.k, r, jnp.bfloat16),
            _weights(key, shape, bits, r, words=words))

  def check(args, out):
    x, w = args[0][0], args[1][0]
    planes = tc_layout.untile(w.planes) if tiled else w.planes
    want = np.asarray(gemv_tc.gemv_tc_reference(
        x, planes, w.luts[bits].astype(jnp.bfloat16), bits=bits,
        in_features=shape.k), np.float64)
    got = np.asarray(out[0], np.float64)
    if not np.isfinite(got).all():
      return float("inf")
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))

  return Case(("tc", shape.name, bits, m, label or str(cfg)), fn, make_args, nbytes, r,
              check)


def bf16_case(shape: Shape, m: int) -> Case:
  """Case for XLA's bf16 `jnp.dot` on the same shape."""
  nbytes = shape.n * shape.k * 2 + m * shape.k * 2 + m * shape.n * 2
  r = _num_buffers(nbytes)

  def fn(xs, ws):
    return [jnp.dot(x, w.T) for x, w in zip(xs, ws)]

  def make_args():
    key = jax.random.PRNGKey(11 + m)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (shape.n, shape.k), jnp.bfloat16)
          for i in range(r)]
    return _activations(key, m, shape.k, r, jnp.bfloat16), ws

  return Case(("bf16", shape.name, m), fn, make_args, nbytes, r)


def fp16_case(shape: Shape, m: int) -> Case:
  """Case for XLA's fp16 `jnp.dot` on the same shape."""
  nbytes = shape.n * shape.k * 2 + m * shape.k * 2 + m * shape.n * 2
  r = _num_buffers(nbytes)

  def fn(xs, ws):
    return [jnp.dot(x, w.T) for x, w in zip(xs, ws)]

  def make_args():
    key = jax.random.PRNGKey(7 + m)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (shape.n, shape.k), jnp.float16)
          for i in range(r)]
    return _activations(key, m, shape.k, r, jnp.float16), ws

  return Case(("fp16", shape.name, m), fn, make_args, nbytes, r)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  name: str
  batch: int
  slots: int  # S, KV-cache slots
  kv_heads: int
  g: int  # query heads per KV head
  dh: int = 128


ATTENTION_SHAPES = (
    AttentionShape("7b b1 s384", 1, 384, 32, 1),
    AttentionShape("7b b1 s4096", 1, 4096, 32, 1),
    AttentionShape("7b b8 s384", 8, 384, 32, 1),
    AttentionShape("8b-gqa b1 s4096", 1, 4096, 8, 4),
)
# Further shapes a bench may name (`bench_attention.py --shapes`): short caches (where
# "auto" switches from XLA's attention to the kernel), batch 8 at 4096 slots, GQA at 384.
EXTRA_ATTENTION_SHAPES = (
    AttentionShape("7b b1 s128", 1, 128, 32, 1),
    AttentionShape("7b b1 s256", 1, 256, 32, 1),
    AttentionShape("7b b8 s4096", 8, 4096, 32, 1),
    AttentionShape("8b-gqa b1 s384", 1, 384, 8, 4),
)


def attention_shapes(names=()) -> tuple:
  """ATTENTION_SHAPES, or the named ones of it and EXTRA_ATTENTION_SHAPES, in order."""
  if not names:
    return ATTENTION_SHAPES
  known = {s.name: s for s in ATTENTION_SHAPES + EXTRA_ATTENTION_SHAPES}
  bad = [n for n in names if n not in known]
  if bad:
    raise ValueError(f"unknown attention shape(s) {bad}; known: {sorted(known)}")
  return tuple(known[n] for n in names)


def attention_case(shape: AttentionShape, impl: str, cfg=None) -> Case:
  """Case for one decode step's attention (one query per sequence over a full cache):
  impl "mosaic" (`mosaic/decode_attention.py`, bf16 output as the decoder asks),
  "mosaic_kernel" (its kernel alone, writing per-warp partials, no merge) or "xla" (the
  decoder's `attend` with the kernel switched off, jitted, bf16 output)."""
  from anyprec_jax.pallas.mosaic import decode_attention as da
  b, s, kvh, g, d = shape.batch, shape.slots, shape.kv_heads, shape.g, shape.dh
  nbytes = da.bytes_moved(b, s, kvh, kvh * g, d)
  r = _num_buffers(nbytes)

  if impl == "mosaic":
    cfg = cfg or da.DecodeAttentionConfig()
    op = lambda q, k, v, ok: da.decode_attention(q, k, v, ok, cfg=cfg,
                                                 out_dtype=jnp.bfloat16)
  elif impl == "mosaic_kernel":  # the kernel without the XLA merge of its partials
    cfg = cfg or da.DecodeAttentionConfig()
    op = lambda q, k, v, ok: da.decode_attention_partials(q, k, v, ok, cfg=cfg)
  elif impl == "xla":
    import os
    from unittest import mock
    from anyprec_jax.pallas import backend
    from models import decoder  # the model's own attention, as a decode step runs it

    def op(q, k, v, ok):  # [B, H, Dh] -> [B, H, Dh] bf16
      with mock.patch.dict(os.environ, {backend.DECODE_ATTENTION_ENV: "xla"}):  # traced
        o = decoder.attend(q[:, None], k, v, ok[:, None, :])
      return o.reshape(q.shape)
  else:
    raise ValueError(f"impl must be 'mosaic', 'mosaic_kernel' or 'xla', got {impl!r}")

  def fn(qs, kvs):
    return [op(q, k, v, ok) for q, (k, v, ok) in zip(qs, kvs)]

  def make_args():
    key = jax.random.PRNGKey(s + 7 * b + kvh)
    qs, kvs = [], []
    for i in range(r):
      kq, kk, kv, km = jax.random.split(jax.random.fold_in(key, i), 4)
      qs.append(jax.random.normal(kq, (b, kvh * g, d), jnp.bfloat16) * d ** -0.5)
      ok = (jax.random.uniform(km, (b, s)) < 0.95).at[:, -1].set(True)
      if impl != "xla":  # the kernel reads int32; in a decoder the cast joins the mask's
        ok = ok.astype(jnp.int32)  # own fusion, once per step, so it is not timed here
      kvs.append((jax.random.normal(kk, (b, s, kvh, d), jnp.bfloat16),
                  jax.random.normal(kv, (b, s, kvh, d), jnp.bfloat16), ok))
    return qs, kvs

  def check(args, out):
    q, (k, v, ok) = args[0][0], args[1][0]
    if impl == "mosaic_kernel":
      out = [da.combine_partials(out[0])]
    want = np.asarray(da.decode_attention_reference(q, k, v, ok), np.float64)
    got = np.asarray(out[0], np.float64)
    if not np.isfinite(got).all():
      return float("inf")
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))

  return Case(("attention", shape.name, impl, str(cfg) if cfg else ""), fn, make_args,
              nbytes, r, check)


def floor_case(kind: str, ctas: int = 132, warpgroups: int = 1) -> Case:
  """The shortest kernels, to measure a launch's fixed GPU time (the floor every
  kernel of a decode step pays): "mosaic" (a Mosaic GPU kernel of `ctas` CTAs whose
  thread 0 stores one word) or "xla" (y = 2 x + 1 over 4096 bf16)."""
  from anyprec_jax.pallas.mosaic import ptx
  r = 16

  if kind == "mosaic":
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def emit(x_ref, o_ref):
      with ptx.If(ptx.eq(ptx.thread_id(), ptx.const(0))):
        ptx.st_global_b32(ptx.gaddr(ptx.gmem_address(o_ref), ptx.block_id(), 4),
                          ptx.ld_global_u32(ptx.gmem_address(x_ref)))

    kernel = plgpu.kernel(ptx.thread_body(emit),
                          out_type=jax.ShapeDtypeStruct((ctas,), jnp.int32),
                          grid=(ctas,), grid_names=("cta",), num_threads=warpgroups,
                          thread_name="wg")
    op = kernel
    make = lambda i: jnp.full((4,), i, jnp.int32)
  elif kind == "xla":
    op = lambda x: x * 2 + 1
    make = lambda i: jnp.full((4096,), i, jnp.bfloat16)
  else:
    raise ValueError(f"kind must be 'mosaic' or 'xla', got {kind!r}")

  def fn(xs, _):
    return [op(x) for x in xs]

  def make_args():
    return [make(i) for i in range(r)], None

  return Case(("floor", kind, ctas, warpgroups), fn, make_args, 0.0, r)


def copy_case(nbytes: float = 2**30) -> Case:
  """Device-to-device copy bandwidth: y = x + 1 over uint32, read + write counted."""
  n = int(nbytes // 4)

  def fn(xs, _):
    return [x + jnp.uint32(1) for x in xs]

  def make_args():
    return [jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(3) for _ in range(2)], None

  return Case(("copy",), fn, make_args, 2 * n * 4, 2)


def compile_all(cases: list[Case], threads: int = 8) -> None:
  """AOT-compiles every case (threads overlap Triton and XLA compilation)."""
  def build(case):
    args = jax.eval_shape(case.make_args)
    case.compiled = jax.jit(case.fn).lower(*args).compile()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(build, cases))


def time_case(case: Case, samples: int = 25, gpu_time: bool = False) -> dict:
  """Checks and times one case; returns µs per op, bytes and the check's error; with
  `gpu_time` also `gpu_us`: the summed GPU duration of its kernels per op, from a
  CUPTI trace (`gpu_trace`), free of the host launch path."""
  args = case.make_args()
  fn = case.compiled or jax.jit(case.fn)
  out = jax.block_until_ready(fn(*args))
  err = case.check(args, out) if case.check else None
  for _ in range(3):
    out = fn(*args)
  jax.block_until_ready(out)
  per_op = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(PIPELINE):
      out = fn(*args)
    jax.block_until_ready(out)
    per_op.append((time.perf_counter() - t0) / (PIPELINE * case.buffers))
  us = statistics.median(per_op) * 1e6
  spread = (np.percentile(per_op, 90) - np.percentile(per_op, 10)) * 1e6
  res = dict(us=us, spread_us=spread, bytes=case.bytes_per_op,
             tbps=case.bytes_per_op / (us * 1e-6) / 1e12, err=err, buffers=case.buffers)
  if gpu_time:
    from anyprec_jax import gpu_trace
    res["gpu_us"] = gpu_trace.gpu_us_per_call(lambda: fn(*args), PIPELINE) / case.buffers
    res["gpu_tbps"] = case.bytes_per_op / (res["gpu_us"] * 1e-6) / 1e12
  del args, out
  return res
