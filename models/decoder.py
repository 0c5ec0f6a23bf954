"""The one decoder shared by Llama, Mistral and OPT (Flax linen).

Architecture differences are fields of `ModelConfig` (norm kind, positions, gated MLP,
biases, pre/post norm, projections, sliding window); there is no per-architecture
attention or MLP code. Every linear goes through `anyprec_jax.ops.linear`, so a
quantized model is the same params tree with some `weight` leaves replaced by
`AnyPrecWeight`s.

Attention takes an explicit boolean mask [B, T, S] built by `make_mask`, which
encodes padding, causality and Mistral's sliding window over cache slots. With left
padding, slot distances equal position distances between real tokens, so the window
over slots is the window over positions (as in HF).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from anyprec_jax import ops
from models.config import (FUSED_ATTN, FUSED_MLP, Activation, ModelConfig, NormKind, PositionKind,
                           rope_inv_freq)

_NEG = -1e30  # Finite: rows with every key masked (padding queries) stay NaN-free.


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer key/value cache; k[i], v[i]: [B, S, KVH, Dh]."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def length(self) -> int:
    return self.k[0].shape[1]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> KVCache:
  """Zero cache for `batch` sequences of `length` slots."""
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token = number of real tokens before it; pads get 0.

  Args:
    mask: [B, T] 1 for real tokens, 0 for padding.

  Returns:
    [B, T] int32.
  """
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) * mask


def make_mask(cfg: ModelConfig, kv_valid: jax.Array, q_slots: jax.Array) -> jax.Array:
  """Boolean attention mask over cache slots.

  Args:
    cfg: the config (for `sliding_window`).
    kv_valid: [B, S] true where slot s holds a real (non-pad) token.
    q_slots: [T] slot index of each query, or [B, T] per sequence.

  Returns:
    [B, T, S]: valid & causal & (inside the sliding window, if any).
  """
  k_slots = jnp.arange(kv_valid.shape[1])  # [S]
  q = jnp.atleast_2d(q_slots)[..., None]  # [1 or B, T, 1]
  allowed = k_slots <= q
  if cfg.sliding_window is not None:
    allowed &= k_slots > q - cfg.sliding_window
  return kv_valid.astype(bool)[:, None, :] & allowed  # [B, T, S]


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
  """Writes new [B, T, ...] into cache [B, S, ...] at slot `index`.

  `index` is a scalar (the same slot for every sequence) or [B] (one slot per
  sequence, as speculative decoding needs after per-row acceptance).
  """
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice(cache, new, (0, index) + (0,) * (cache.ndim - 2))
  row = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i,) + (0,) * (c.ndim - 1))
  return jax.vmap(row)(cache, new, index)


def _get_or_init(module: nn.Module, name: str, shape, dtype, init=None):
  """The stored parameter as is (dense or `AnyPrecWeight`), else a fresh one at init."""
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init or nn.initializers.normal(0.02), shape, dtype)


def _fused(module: nn.Module, spec) -> bool:
  """Whether the params hold `spec`'s fused weight (init always builds the parts)."""
  return spec[0] in module.variables.get("params", {})


def _split(y, widths):  # [..., sum(widths)] -> one array per width
  bounds = [sum(widths[:i]) for i in range(1, len(widths))]
  return jnp.split(y, bounds, axis=-1)


class Linear(nn.Module):
  """y = x W^T + b with W [out, in] (HF layout) or an `AnyPrecWeight`."""
  in_features: int
  out_features: int
  use_bias: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None, norm=None, glu=None, rope_kv=None):
    """[..., in] -> [..., out]. With `residual` [..., out]: (residual + y, the RMSNorm
    `norm` = (weight, eps) of that sum or None), as `ops.linear_residual` (a kernel
    epilogue where one runs). With `glu` (an activation; y = [gate | up]): glu(gate) *
    up [..., out / 2], as `ops.linear_glu`. With `rope_kv` (keyword arguments of
    `ops.linear_rope_kv`): its (q, k_cache, v_cache), or None where it does not run."""
    w = _get_or_init(self, "weight", (self.out_features, self.in_features),
                     self.param_dtype)
    b = (_get_or_init(self, "bias", (self.out_features,), self.param_dtype,
                      nn.initializers.zeros) if self.use_bias else None)
    if residual is not None:
      return ops.linear_residual(x, w, residual, norm, b)
    if glu is not None:
      return ops.linear_glu(x, w, glu, b)
    if rope_kv is not None:
      return ops.linear_rope_kv(x, w, b, **rope_kv)
    return ops.linear(x, w, b)


class Embed(nn.Module):
  """Token (or position) embedding [num, dim]; `attend` is the tied output head."""
  num: int
  dim: int
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                (self.num, self.dim), self.param_dtype)

  def __call__(self, ids):  # [B, T] -> [B, T, dim]
    return jnp.take(self.embedding, ids, axis=0)

  def attend(self, x):  # [B, T, dim] -> [B, T, num]
    return ops.linear(x, self.embedding)


class Norm(nn.Module):
  """RMSNorm (weight) or LayerNorm (weight, bias), computed in float32.

  With `fold` (a norm whose output only feeds linears) an RMSNorm may return
  `ops.RmsNormed`, which a quantized linear folds into its kernel (`ops.folds_norms`).
  """
  cfg: ModelConfig
  dim: int
  fold: bool = False

  @nn.compact
  def __call__(self, x):  # [..., D]
    dtype = x.dtype
    w = _get_or_init(self, "weight", (self.dim,), jnp.float32, nn.initializers.ones)
    if self.cfg.norm is NormKind.RMS:
      if self.fold and ops.folds_norms():
        return ops.RmsNormed(x, w, self.cfg.norm_eps)
      return ops.rms_norm(x, w, self.cfg.norm_eps)
    h = x.astype(jnp.float32)
    b = _get_or_init(self, "bias", (self.dim,), jnp.float32, nn.initializers.zeros)
    h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (h * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array):
  """cos, sin [B, T, Dh] (float32) for RoPE in HF's rotate_half layout."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg))  # [Dh/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, Dh] rotated by cos/sin [B, T, Dh]."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


def attend(q, k, v, mask):
  """Masked softmax attention with grouped KV heads.

  Args:
    q: [B, T, H, Dh] (already scaled).
    k, v: [B, S, KVH, Dh].
    mask: [B, T, S] bool.

  Returns:
    [B, T, H * Dh] in q's dtype.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  if t == 1:  # a decode step: a kernel where one applies (ops.one_query_attention)
    o = ops.one_query_attention(q[:, 0], k, v, mask[:, 0])  # [B, H, Dh] or None
    if o is not None:
      return o.reshape(b, 1, h * d).astype(q.dtype)
  q = q.reshape(b, t, kvh, h // kvh, d)  # [B, T, KVH, G, Dh]
  s = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                 preferred_element_type=jnp.float32)  # [B, KVH, G, T, S]
  s = jnp.where(mask[:, None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)  # [B, T, KVH, G, Dh]
  return o.reshape(b, t, h * d).astype(q.dtype)


class Attention(nn.Module):
  """Self-attention (MHA / GQA), optional RoPE, optional cache update."""
  cfg: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, kv=None, cache_index=None, residual=None,
               out_norm=None):
    """x [B, T, D]; mask [B, T, S]; kv: (k, v) [B, S, KVH, Dh] or None (S = T).

    Returns (out [B, T, D], kv); with `residual`, ((residual + out, the RMSNorm
    `out_norm` of it or None), kv) (`Linear`'s residual form for o_proj)."""
    c = self.cfg
    b, t, _ = x.shape
    lin = functools.partial(Linear, use_bias=c.attention_bias, param_dtype=self.param_dtype)
    widths = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
              c.num_kv_heads * c.head_dim)
    o_proj = lin(c.num_heads * c.head_dim, c.hidden_size, name="o_proj")
    if _fused(self, FUSED_ATTN):  # one [B, T, (H + 2 KVH) Dh] product
      qkv = lin(c.hidden_size, sum(widths), name=FUSED_ATTN[0])
      if kv is not None and rope is not None and t == 1:
        # A decode step: RoPE, q's scale and the cache write in the GEMV's epilogue
        # where that runs (ops.linear_rope_kv; None: the plain path below).
        fused = qkv(x, rope_kv=dict(
            cos=rope[0], sin=rope[1], k_cache=kv[0], v_cache=kv[1], index=cache_index,
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim))
        if fused is not None:
          q, k, v = fused
          return o_proj(attend(q, k, v, mask), residual, out_norm), (k, v)
      q, k, v = _split(qkv(x), widths)
    else:
      q, k, v = (lin(c.hidden_size, w, name=n)(x) for w, n in zip(widths, FUSED_ATTN[1]))
    q = q.reshape(b, t, c.num_heads, c.head_dim)  # [B, T, H, Dh]
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)  # [B, T, KVH, Dh]
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q * jnp.asarray(c.head_dim ** -0.5, q.dtype)
    if kv is not None:
      k, v = write_cache(kv[0], k, cache_index), write_cache(kv[1], v, cache_index)
    out = attend(q, k, v, mask)  # [B, T, H * Dh]
    out = o_proj(out, residual, out_norm)
    return out, (None if kv is None else (k, v))


class Mlp(nn.Module):
  """Gated (down(act(gate x) * up x)) or plain (down(act(up x))) MLP."""
  cfg: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None, out_norm=None):  # [B, T, D]
    """down(...) [B, T, D]; with `residual`, (residual + down(...), the RMSNorm
    `out_norm` of it or None) (`Linear`'s residual form)."""
    c = self.cfg
    lin = functools.partial(Linear, use_bias=c.mlp_bias, param_dtype=self.param_dtype)
    act = {Activation.SILU: jax.nn.silu, Activation.RELU: jax.nn.relu,
           Activation.GELU: functools.partial(jax.nn.gelu, approximate=False)}[c.activation]
    f = c.intermediate_size
    if c.gated_mlp and _fused(self, FUSED_MLP):  # one [B, T, 2F] product
      h = lin(c.hidden_size, 2 * f, name=FUSED_MLP[0])(x, glu=act)  # [B, T, F]
    elif c.gated_mlp:
      h = act(lin(c.hidden_size, f, name="gate_proj")(x))  # [B, T, F]
      h = h * lin(c.hidden_size, f, name="up_proj")(x)
    else:
      h = act(lin(c.hidden_size, c.intermediate_size, name="up_proj")(x))  # [B, T, F]
    down = lin(c.intermediate_size, c.hidden_size, name="down_proj")
    return down(h, residual, out_norm)


class DecoderLayer(nn.Module):
  """Attention + MLP with residuals, pre-norm (default) or post-norm (OPT-350m)."""
  cfg: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, kv=None, cache_index=None, normed=None,
               next_norm=None):  # [B, T, D]
    """Returns (x, normed_next, kv).

    With residual fusion (`fuses_residual(cfg)`) the adds run in the epilogues of
    o_proj and down_proj (`ops.linear_residual`): `normed` is this layer's attn_norm
    of x formed by the previous layer (or None), `next_norm` (weight, eps) the next
    layer's attn_norm, and normed_next its `ops.RmsNormed` (None without fusion).
    """
    c = self.cfg
    attn = Attention(c, self.param_dtype, name="attn")
    mlp = Mlp(c, self.param_dtype, name="mlp")
    norm1 = Norm(c, c.hidden_size, fold=c.pre_norm, name="attn_norm")
    norm2 = Norm(c, c.hidden_size, fold=c.pre_norm, name="mlp_norm")
    if fuses_residual(c):
      n1 = normed if normed is not None else norm1(x)
      spec2 = norm2(x)  # an unformed RMSNorm (folds_norms): only its weight and eps
      (x, n2), kv = attn(n1, rope, mask, kv, cache_index, residual=x,
                         out_norm=(spec2.weight, spec2.eps))
      x, n_next = mlp(n2, residual=x, out_norm=next_norm)
      return x, n_next, kv
    if c.pre_norm:
      a, kv = attn(norm1(x), rope, mask, kv, cache_index)
      x = x + a
      return x + mlp(norm2(x)), None, kv
    a, kv = attn(x, rope, mask, kv, cache_index)
    x = norm1(x + a)
    return norm2(x + mlp(x)), None, kv


class Decoder(nn.Module):
  """Token ids -> float32 logits, optionally reading/writing a `KVCache`."""
  cfg: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, positions, mask, cache: KVCache | None = None,
               cache_index=None, last_only: bool = False):
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int positions (0 = first real token).
      mask: [B, T, S] bool attention mask (S = T without a cache).
      cache: optional `KVCache` of S slots; the new keys/values are written at
        slots [cache_index, cache_index + T).
      cache_index: int scalar, first slot of this chunk; or [B], one per sequence.
      last_only: compute logits for the last position only.

    Returns:
      (logits [B, T or 1, V] float32, updated cache or None).
    """
    c = self.cfg
    embed = Embed(c.vocab_size, c.embed_dim, self.param_dtype, name="embed_tokens")
    x = embed(tokens)  # [B, T, E]
    if c.has_projection:
      x = Linear(c.embed_dim, c.hidden_size, param_dtype=self.param_dtype,
                 name="project_in")(x)  # [B, T, D]
    rope = None
    if c.position is PositionKind.LEARNED:
      pos = Embed(c.max_position_embeddings + c.position_offset, c.hidden_size,
                  self.param_dtype, name="embed_positions")
      x = x + pos(positions + c.position_offset).astype(x.dtype)
    else:
      rope = rope_cos_sin(c, positions)
    ks, vs = [], []
    normed = None
    for i in range(c.num_layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, normed, kv = DecoderLayer(c, self.param_dtype, name=f"layers_{i}")(
          x, rope, mask, kv, cache_index, normed=normed,
          next_norm=self._attn_norm(i + 1) if fuses_residual(c) else None)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    if c.final_norm:
      x = Norm(c, c.hidden_size, name="final_norm")(x)
    if last_only:
      x = x[:, -1:]  # [B, 1, D]
    if c.has_projection:
      x = Linear(c.hidden_size, c.embed_dim, param_dtype=self.param_dtype,
                 name="project_out")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(c.embed_dim, c.vocab_size, param_dtype=self.param_dtype,
                      name="lm_head")(x)
    new_cache = None if cache is None else KVCache(k=tuple(ks), v=tuple(vs))
    return logits.astype(jnp.float32), new_cache


  def _attn_norm(self, i: int):
    """(weight, eps) of layer i's stored attn_norm, or None (no such layer, or init)."""
    if i >= self.cfg.num_layers:
      return None
    w = (self.variables.get("params", {}).get(f"layers_{i}", {}).get("attn_norm", {})
         .get("weight"))
    return None if w is None else (w, self.cfg.norm_eps)


def fuses_residual(cfg: ModelConfig) -> bool:
  """Whether the decoder's residual adds run in the linears' epilogues
  (`ops.fuses_residual`): pre-norm RMSNorm models only."""
  return cfg.pre_norm and cfg.norm is NormKind.RMS and ops.fuses_residual()


def forward(cfg: ModelConfig, params, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
  """Full-sequence forward pass without a cache.

  Jittable with `cfg` static. Used by the Fisher pass and perplexity.

  Args:
    cfg: the model config.
    params: params tree (dense or `AnyPrecWeight` linear weights).
    input_ids: [B, T] int.
    attention_mask: [B, T], 1 = real token, 0 = padding (left or right); None: all 1.

  Returns:
    logits [B, T, V] float32.
  """
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  positions = positions_from_mask(attention_mask)
  mask = make_mask(cfg, attention_mask, jnp.arange(input_ids.shape[1]))
  logits, _ = Decoder(cfg).apply({"params": params}, input_ids, positions, mask)
  return logits



def abstract_params(cfg: ModelConfig, dtype=jnp.float32):
  """Shape/dtype tree of the params the config needs (no allocation)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)

  def init():
    return Decoder(cfg, dtype).init(jax.random.key(0), tokens, tokens, mask)["params"]

  return jax.eval_shape(init)
