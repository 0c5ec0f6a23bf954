"""The one dispatch point between models and kernels.

Models call `linear(x, w, bias)` with `w` either a dense [N, K] array (Hugging Face
layout) or an `AnyPrecWeight`, and `one_query_attention` for a decode step's attention;
nothing else in the code base chooses a kernel.

Backends (`Backend`):
  REFERENCE: pure jnp (dequantize + dot); runs anywhere; the source of truth.
  PALLAS:    Pallas GPU kernels (GEMV for M <= GEMV_MAX_M rows, dequantize + dot above).
  INTERPRET: the Pallas kernels in interpret mode (CPU tests of the kernel code).
  AUTO:      PALLAS on GPU, REFERENCE elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax.weight import AnyPrecWeight, dequantize

GEMV_MAX_M = 8


class Backend(enum.Enum):
  AUTO = "auto"
  REFERENCE = "reference"
  PALLAS = "pallas"
  INTERPRET = "interpret"


_state = threading.local()


def get_backend() -> Backend:
  """The backend in force (AUTO resolved to PALLAS on GPU, else REFERENCE)."""
  backend = getattr(_state, "backend", Backend.AUTO)
  if backend is Backend.AUTO:
    return Backend.PALLAS if jax.default_backend() == "gpu" else Backend.REFERENCE
  return backend


@contextlib.contextmanager
def use_backend(backend: Backend | str):
  """Context manager selecting the kernel backend while tracing.

  The choice is read at trace time, so wrap the *first* call of a jitted function
  (or pass the backend into the function that you jit).
  """
  previous = getattr(_state, "backend", Backend.AUTO)
  _state.backend = Backend(backend)
  try:
    yield
  finally:
    _state.backend = previous


def anyprec_matmul_reference(x: jax.Array, w: AnyPrecWeight) -> jax.Array:
  """y = x @ W_b^T in fp32 from the dequantized weight. x [M, K] -> [M, N] fp32."""
  wd = dequantize(w, w.bits, jnp.float32)  # [N, K]
  return jnp.dot(x.astype(jnp.float32), wd.T, precision=jax.lax.Precision.HIGHEST)


def _anyprec_matmul(x2: jax.Array, w: AnyPrecWeight, backend: Backend) -> jax.Array:
  """x2 [M, K] -> [M, N] fp32."""
  if backend is Backend.REFERENCE:
    return anyprec_matmul_reference(x2, w)
  from anyprec_jax.pallas import kernels  # Local import: Pallas only when used.
  return kernels.anyprec_matmul(x2, w, interpret=backend is Backend.INTERPRET)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32, in x's dtype (the decoder's)."""
  dtype = x.dtype
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return weight.astype(dtype) * h.astype(dtype)


@dataclasses.dataclass(frozen=True)
class RmsNormed:
  """rms_norm(x, weight, eps) not yet formed, for `linear` to fold into a kernel.

  The decoder's norms return this where `folds_norms()`; `linear` on a quantized
  weight whose product runs on the tensor-core GEMV passes x * weight and x to the
  kernel, which scales each output row by 1 / rms(x) itself (two XLA kernels fewer
  per norm); anywhere else `value()` forms the norm exactly as `rms_norm`.
  """
  x: jax.Array  # [..., D]
  weight: jax.Array  # [D]
  eps: float
  xw: jax.Array | None = None  # [..., D] x * weight in x's dtype, where a kernel formed it

  @property
  def shape(self):
    return self.x.shape

  @property
  def dtype(self):
    return self.x.dtype

  def value(self) -> jax.Array:
    return rms_norm(self.x, self.weight, self.eps)


def folds_norms() -> bool:
  """Whether the decoder should hand its RMSNorms to `linear` unformed (`RmsNormed`):
  the PALLAS backend on Hopper with `ANYPREC_FOLD_NORM` on."""
  if get_backend() is not Backend.PALLAS:
    return False
  from anyprec_jax.pallas import backend  # Local import: Pallas only when used.
  return backend.fold_norm() and backend.mosaic_available()


def _norm_operands(x: RmsNormed, m: int):
  """(x * weight, x) as [M, K] for a GEMV that folds the norm (x * weight as the
  residual epilogue of the linear before formed it, where it did)."""
  x2 = x.x.reshape(m, x.shape[-1])  # [M, K]
  if x.xw is not None:
    return x.xw.reshape(m, x.shape[-1]), x2
  return (x2.astype(jnp.float32) * x.weight.astype(jnp.float32)).astype(x.dtype), x2


def _folded_linear(x: RmsNormed, w: AnyPrecWeight) -> jax.Array | None:
  """y = rms_norm(x) @ W^T with the norm folded into the GEMV, or None where it can't."""
  if get_backend() is not Backend.PALLAS:
    return None
  from anyprec_jax.pallas import kernels  # Local import: Pallas only when used.
  lead = x.shape[:-1]
  m = math.prod(lead)
  if not kernels.folds_rms(w, m):
    return None
  xg, x2 = _norm_operands(x, m)
  y = kernels.anyprec_matmul(xg, w, rms=(x2, x.eps))  # [M, N] f32
  return y.astype(x.dtype).reshape(*lead, w.out_features)


def fuses_residual() -> bool:
  """Whether the decoder should hand its residual adds to the linears before them
  (`linear_residual`): folded norms (`folds_norms`) with `ANYPREC_FUSE_RESIDUAL` on."""
  if not folds_norms():
    return False
  from anyprec_jax.pallas import backend  # Local import: Pallas only when used.
  return backend.fuse_residual()


def linear_residual(x, w, residual: jax.Array, norm: tuple[jax.Array, float] | None = None,
                    bias: jax.Array | None = None):
  """h = residual + linear(x, w, bias), and the RMSNorm (weight, eps) = `norm` of h.

  On the tensor-core GEMV (a quantized w, M <= 8, bf16, no bias) the add runs in the
  kernel's epilogue, which also forms h * weight for the folded norm of the next
  linear (`RmsNormed.xw`): the XLA kernel of each residual add goes. Anywhere else
  both are formed as the decoder forms them (`x + a`, then the norm).

  Args:
    x: [..., K] activations; w: dense [N, K] or `AnyPrecWeight`; bias: optional [N].
    residual: [..., N], the residual stream.
    norm: (weight [N], eps) of the RMSNorm that follows, or None.

  Returns:
    (h [..., N] in residual's dtype, `RmsNormed` of h or None).
  """
  if (isinstance(w, AnyPrecWeight) and bias is None and not isinstance(x, RmsNormed)
      and get_backend() is Backend.PALLAS and residual.dtype == jnp.bfloat16
      and x.dtype == jnp.bfloat16):
    from anyprec_jax.pallas import kernels  # Local import: Pallas only when used.
    lead = x.shape[:-1]
    m = math.prod(lead)
    if kernels.runs_epilogue(w, m):
      out = kernels.anyprec_matmul(
          x.reshape(m, x.shape[-1]), w, residual=residual.reshape(m, w.out_features),
          epi_weight=None if norm is None else norm[0])
      h, xw = (out, None) if norm is None else out
      h = h.reshape(residual.shape)
      if norm is None:
        return h, None
      return h, RmsNormed(h, norm[0], norm[1], xw=xw.reshape(residual.shape))
  h = residual + linear(x, w, bias)
  return h, (None if norm is None else RmsNormed(h, norm[0], norm[1]))


def fuses_glu() -> bool:
  """Whether the decoder should hand a fused gate/up linear its activation
  (`linear_glu`): the PALLAS backend on Hopper with `ANYPREC_FUSE_GLU` on."""
  if get_backend() is not Backend.PALLAS:
    return False
  from anyprec_jax.pallas import backend  # Local import: Pallas only when used.
  return backend.fuse_glu() and backend.mosaic_available()


def linear_glu(x, w, act, bias: jax.Array | None = None) -> jax.Array:
  """act(gate) * up, where linear(x, w, bias) = [gate | up] (a fused gate/up weight).

  With act = jax.nn.silu on the tensor-core GEMV (`fuses_glu`; a quantized w, M <= 8,
  bf16, no bias; x may be an `RmsNormed`, folded as in `linear`) the product forms in
  the kernel's epilogue: one launch instead of the GEMV and an XLA kernel. Anywhere
  else from the linear's two halves.

  Args:
    x: [..., K] activations or an `RmsNormed`; w: [2F, K] dense or `AnyPrecWeight`.
    act: the activation (jax.nn.silu for the kernel path); bias: optional [2F].

  Returns:
    [..., F] in x's dtype.
  """
  if (act is jax.nn.silu and isinstance(w, AnyPrecWeight) and bias is None
      and x.dtype == jnp.bfloat16 and fuses_glu()):
    from anyprec_jax.pallas import kernels  # Local import: Pallas only when used.
    lead = x.shape[:-1]
    m = math.prod(lead)
    normed = isinstance(x, RmsNormed)
    if kernels.runs_glu(w, m) and (not normed or kernels.folds_rms(w, m)):
      if normed:
        xg, x2 = _norm_operands(x, m)
        h = kernels.anyprec_matmul(xg, w, rms=(x2, x.eps), glu=True)
      else:
        h = kernels.anyprec_matmul(x.reshape(m, x.shape[-1]), w, glu=True)
      return h.reshape(*lead, w.out_features // 2)
  y = linear(x, w, bias)
  f = y.shape[-1] // 2
  return act(y[..., :f]) * y[..., f:]


def linear_rope_kv(x, w, bias, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, index, *, num_heads: int, num_kv_heads: int,
                   head_dim: int):
  """A decode step's fused q/k/v linear with RoPE, q's 1 / sqrt(Dh) scale and the KV
  cache write in the tensor-core GEMV's epilogue, or None where that does not run
  (the caller then takes the plain path: `linear`, `apply_rope`, `write_cache`).

  Runs with the PALLAS backend on Hopper and `ANYPREC_FUSE_ROPE_KV` on, for a quantized
  w without bias, bf16 x (an `RmsNormed` folds as in `linear`) and bf16 caches, one
  token per sequence.

  Args:
    x: [B, 1, K] activations or an `RmsNormed`; w: [(H + 2 KVH) Dh, K].
    bias: must be None for the kernel path.
    cos, sin: [B, 1, Dh] f32 (`models.decoder.rope_cos_sin`, rotate-half layout).
    k_cache, v_cache: [B, S, KVH, Dh] bf16; index: scalar or [B] slot to write.
    num_heads, num_kv_heads, head_dim: the attention's shape.

  Returns:
    (q [B, 1, H, Dh] bf16 rotated and scaled, k_cache, v_cache), or None.
  """
  if (get_backend() is not Backend.PALLAS or not isinstance(w, AnyPrecWeight)
      or bias is not None or x.dtype != jnp.bfloat16 or len(x.shape) != 3
      or x.shape[1] != 1
      or k_cache.dtype != jnp.bfloat16 or v_cache.dtype != jnp.bfloat16):
    return None
  from anyprec_jax.pallas import backend  # Local import: Pallas only when used.
  if not backend.fuse_rope_kv() or not backend.mosaic_available():
    return None
  from anyprec_jax.pallas import kernels
  from anyprec_jax.pallas.mosaic import gemv_tc
  b = x.shape[0]
  normed = isinstance(x, RmsNormed)
  if (not kernels.runs_rope_kv(w, b, head_dim) or (normed and not kernels.folds_rms(w, b))
      or w.out_features != (num_heads + 2 * num_kv_heads) * head_dim
      or k_cache.shape[0] != b):
    return None
  spec = gemv_tc.RopeSpec(head_dim=head_dim, q_rows=num_heads * head_dim,
                          kv_rows=num_kv_heads * head_dim, slots=k_cache.shape[1],
                          q_scale=float(np.asarray(head_dim ** -0.5, jnp.bfloat16)))
  if normed:
    xg, x2 = _norm_operands(x, b)
    rms = (x2, x.eps)
  else:
    xg, rms = x.reshape(b, x.shape[-1]), None
  half = head_dim // 2
  slots = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (b,))
  q, k2, v2 = kernels.rope_kv(xg, w, rms, cos[:, 0, :half], sin[:, 0, :half], slots,
                              k_cache, v_cache, spec)
  return q.reshape(b, 1, num_heads, head_dim), k2, v2


def linear(x, w, bias: jax.Array | None = None) -> jax.Array:
  """y = x @ w^T + bias for a dense or any-precision weight.

  Args:
    x: [..., K] activations, or an `RmsNormed` (folded into the tensor-core GEMV where
      it runs, else formed first).
    w: dense [N, K] array or `AnyPrecWeight` (uses its active precision `w.bits`).
    bias: optional [N].

  Returns:
    [..., N] in the dtype of x.
  """
  if isinstance(x, RmsNormed):
    y = _folded_linear(x, w) if isinstance(w, AnyPrecWeight) else None
    if y is not None:
      return y if bias is None else y + bias.astype(y.dtype)
    x = x.value()
  if isinstance(w, AnyPrecWeight):
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # [M, K]
    y = _anyprec_matmul(x2, w, get_backend()).astype(x.dtype)
    y = y.reshape(*lead, w.out_features)  # [..., N]
  else:
    y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype),
                   preferred_element_type=jnp.float32).astype(x.dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def one_query_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        valid: jax.Array) -> jax.Array | None:
  """A decode step's attention from a kernel, or None where none applies.

  The Mosaic GPU kernel (`pallas/mosaic/decode_attention.py`) runs with the PALLAS
  backend on Hopper for bf16 q and caches, head dims 64 or 128 and at most 8 query
  heads per KV head, where `backend.auto_runs_attention_kernel` says so
  (`ANYPREC_DECODE_ATTENTION=mosaic`: any length and G; `=xla`: never).
  Otherwise the caller computes the attention with jnp.

  Args:
    q: [B, H, Dh] (scaled, rotated); k, v: [B, S, KVH, Dh] caches with the new slot
      written; valid: [B, S] bool.

  Returns:
    [B, H, Dh] in q's dtype, or None.
  """
  if get_backend() is not Backend.PALLAS:
    return None
  from anyprec_jax.pallas import backend  # Local import: Pallas only when used.
  mode = backend.decode_attention()
  if (mode == "xla" or not backend.is_hopper_or_newer()
      or (mode == "auto"
          and not backend.auto_runs_attention_kernel(k.shape[1], q.shape[1] // k.shape[2]))):
    return None
  h, d, kvh = q.shape[1], q.shape[2], k.shape[2]
  if (q.dtype != jnp.bfloat16 or k.dtype != jnp.bfloat16 or v.dtype != jnp.bfloat16
      or d not in (64, 128) or h % kvh or h // kvh > 8):
    return None
  from anyprec_jax.pallas.mosaic import decode_attention as da
  cfg = da.DecodeAttentionConfig(launch_dependents=backend.pdl())
  return da.decode_attention(q, k, v, valid, cfg=cfg, out_dtype=q.dtype)
