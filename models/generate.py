"""Jitted generation: prefill, then the whole decode loop on device.

`prefill` runs the (left-padded) prompts once and fills a preallocated `KVCache`;
`decode` is one jitted program holding a `lax.while_loop` that feeds one token per
step through `decode_step`, samples, and stops when every sequence has emitted an EOS
or `max_new_tokens` is reached. The cache is donated to `decode`. Prompt length and
max_new_tokens are padded up to power-of-two buckets, so jit's cache holds one
program per (batch, bucket, sampling mode, precision).

Call `prefill` and `decode` separately to time them (`generate` is just both).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax import weight as weight_lib
from anyprec_jax.pallas import backend as pallas_backend
from models.config import ModelConfig, PositionKind
from models.decoder import (Decoder, KVCache, init_cache, make_mask,
                            positions_from_mask)

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Token selection; temperature == 0 is greedy (argmax).

  Attributes:
    temperature: logits are divided by it before sampling; 0: greedy.
    top_k: keep the k most likely tokens; 0: off.
    top_p: keep the smallest set of tokens with probability >= top_p; 1: off.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"invalid sampling config {self}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


class GenerationResult(NamedTuple):
  """tokens [B, max_new_tokens] int32 (pad after EOS); lengths [B] (EOS included)."""
  tokens: jax.Array
  lengths: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["logits", "next_pos", "kv_valid", "index"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """What decoding needs besides the cache.

  logits [B, V] float32 of the last fed token; next_pos [B] position of the next token;
  kv_valid [B, S] slots holding real tokens (or future ones); index: next cache slot.
  """
  logits: jax.Array
  next_pos: jax.Array
  kv_valid: jax.Array
  index: jax.Array


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _param_dtype(params):
  return params["embed_tokens"]["embedding"].dtype


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(cfg: ModelConfig, params, input_ids, attention_mask, *, cache_len: int):
  """Runs left-padded prompts and fills a fresh cache.

  Args:
    cfg: model config (static).
    params: params tree.
    input_ids: [B, T] int, left padded.
    attention_mask: [B, T], 1 for real tokens; every row needs one.
    cache_len: S >= T, cache slots (T + room for new tokens).

  Returns:
    (DecodeState, KVCache).
  """
  b, t = input_ids.shape
  mask = attention_mask.astype(jnp.int32)
  cache = init_cache(cfg, b, cache_len, _param_dtype(params))
  kv_valid = jnp.concatenate(
      [mask.astype(bool), jnp.ones((b, cache_len - t), bool)], axis=1)  # [B, S]
  attn = make_mask(cfg, kv_valid, jnp.arange(t))  # [B, T, S]
  logits, cache = Decoder(cfg).apply(
      {"params": params}, input_ids, positions_from_mask(mask), attn, cache, 0,
      last_only=True)
  state = DecodeState(logits=logits[:, 0], next_pos=mask.sum(axis=1),
                      kv_valid=kv_valid, index=jnp.asarray(t, jnp.int32))
  return state, cache


def decode_step(cfg: ModelConfig, params, tokens, state: DecodeState, cache: KVCache):
  """Feeds one token per sequence through the cached decoder (jittable).

  Args:
    cfg: model config.
    params: params tree.
    tokens: [B] int, the tokens at slot `state.index`.
    state: decode state.
    cache: the cache (updated at `state.index`).

  Returns:
    (new DecodeState with the next logits [B, V], new KVCache).
  """
  attn = make_mask(cfg, state.kv_valid, state.index[None])  # [B, 1, S]
  logits, cache = Decoder(cfg).apply(
      {"params": params}, tokens[:, None], state.next_pos[:, None], attn, cache,
      state.index)
  state = DecodeState(logits=logits[:, 0], next_pos=state.next_pos + 1,
                      kv_valid=state.kv_valid, index=state.index + 1)
  return state, cache


def filter_logits(logits, temperature, top_p, *, top_k: int, use_top_p: bool):
  """Logits divided by temperature, then top-k, then top-p (as HF does); removed
  tokens get -inf. softmax of the result is the distribution `sample_logits` draws from.

  Args:
    logits: [..., V] float32.
    temperature, top_p: float scalars (traced).
    top_k, use_top_p: static.

  Returns:
    [..., V] float32.
  """
  x = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]  # [..., 1]
    x = jnp.where(x < kth, -jnp.inf, x)
  if use_top_p:
    srt = -jnp.sort(-x, axis=-1)  # [..., V] descending
    probs = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # First token always kept.
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < thresh, -jnp.inf, x)
  return x


def sample_logits(logits, rng, temperature, top_p, *, greedy: bool, top_k: int,
                  use_top_p: bool):
  """Picks one token per row (temperature, then top-k, then top-p, as HF does).

  Args:
    logits: [B, V] float32.
    rng: PRNG key (unused when greedy).
    temperature, top_p: float scalars (traced).
    greedy, top_k, use_top_p: static.

  Returns:
    [B] int32.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = filter_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
  return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


class _Carry(NamedTuple):
  step: jax.Array
  token: jax.Array   # [B] last sampled token
  tokens: jax.Array  # [B, N]
  lengths: jax.Array  # [B]
  done: jax.Array    # [B]
  rng: jax.Array
  state: DecodeState
  cache: KVCache


def _decode_loop(cfg: ModelConfig, params, state: DecodeState, cache: KVCache, rng,
                 max_new_tokens, temperature, top_p, *, num_slots: int, greedy: bool,
                 top_k: int, use_top_p: bool, eos_ids: tuple[int, ...], pad_id: int):
  """The on-device decode loop (one `lax.while_loop`; jitted by `decode`, cache donated).

  Args:
    cfg: model config (static).
    params: params tree.
    state, cache: from `prefill`.
    rng: PRNG key.
    max_new_tokens: int scalar (traced) <= num_slots.
    temperature, top_p: float scalars (traced).
    num_slots: static size of the output buffer (the max_new_tokens bucket).
    greedy, top_k, use_top_p: static sampling mode.
    eos_ids: static EOS token ids (may be empty).
    pad_id: token written after a sequence is done.

  Returns:
    (GenerationResult(tokens [B, num_slots], lengths [B]), final DecodeState, final
    KVCache); returning the cache lets XLA alias it to the donated input.
  """
  sample = functools.partial(sample_logits, temperature=temperature, top_p=top_p,
                             greedy=greedy, top_k=top_k, use_top_p=use_top_p)
  eos = jnp.asarray(eos_ids if eos_ids else [-1], jnp.int32)
  b = state.logits.shape[0]

  rng, sub = jax.random.split(rng)
  first = sample(state.logits, sub)  # [B]
  init = _Carry(step=jnp.asarray(1, jnp.int32), token=first,
                tokens=jnp.full((b, num_slots), pad_id, jnp.int32).at[:, 0].set(first),
                lengths=jnp.ones((b,), jnp.int32), done=jnp.isin(first, eos), rng=rng,
                state=state, cache=cache)

  def cond(c: _Carry):
    return (c.step < max_new_tokens) & ~jnp.all(c.done)

  def body(c: _Carry):
    st, cache = decode_step(cfg, params, c.token, c.state, c.cache)
    rng, sub = jax.random.split(c.rng)
    tok = jnp.where(c.done, pad_id, sample(st.logits, sub))  # [B]
    tokens = jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.step))
    return _Carry(step=c.step + 1, token=tok, tokens=tokens,
                  lengths=c.lengths + (~c.done).astype(jnp.int32),
                  done=c.done | jnp.isin(tok, eos), rng=rng, state=st, cache=cache)

  out = jax.lax.while_loop(cond, body, init)
  return GenerationResult(tokens=out.tokens, lengths=out.lengths), out.state, out.cache


@functools.cache
def _decode_jit(options: tuple[tuple[str, str], ...]):
  """`_decode_loop` jitted with XLA compiler `options` (sorted (name, value) pairs)."""
  return jax.jit(_decode_loop, donate_argnames=("cache",),
                 static_argnames=("cfg", "num_slots", "greedy", "top_k", "use_top_p",
                                  "eos_ids", "pad_id"),
                 compiler_options=dict(options) or None)


def decode(cfg: ModelConfig, params, state: DecodeState, cache: KVCache, rng,
           max_new_tokens, temperature, top_p, *, num_slots: int, greedy: bool,
           top_k: int, use_top_p: bool, eos_ids: tuple[int, ...], pad_id: int):
  """The on-device decode loop (one jitted `lax.while_loop`; cache donated).

  Args and returns: as `_decode_loop`. Compiled with the command-buffer options
  `pallas.backend.decode_compiler_options` gives for the params' lowest precision
  (one program per option set; XLA's defaults off the GPU).
  """
  options = pallas_backend.decode_compiler_options(weight_lib.min_bits(params))
  return _decode_jit(tuple(sorted(options.items())))(
      cfg, params, state, cache, rng, max_new_tokens, temperature, top_p,
      num_slots=num_slots, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
      eos_ids=eos_ids, pad_id=pad_id)


class Timing(NamedTuple):
  """Wall-clock seconds of one `timed_generate` call (compile included if cold)."""
  prefill_s: float
  decode_s: float


def left_align(input_ids, attention_mask, length: int):
  """Moves each row's real tokens to the right end of a [B, length] buffer.

  Args:
    input_ids: [B, T] ints.
    attention_mask: [B, T] (1 = real) or None.
    length: output length >= the longest row.

  Returns:
    (ids [B, length] int32, mask [B, length] int32), left padded, as numpy.
  """
  ids = np.asarray(input_ids)
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(
      attention_mask).astype(bool)
  out_ids = np.zeros((ids.shape[0], length), np.int32)
  out_mask = np.zeros((ids.shape[0], length), np.int32)
  for r in range(ids.shape[0]):
    real = ids[r][mask[r]]
    if not 0 < len(real) <= length:
      raise ValueError(f"row {r} has {len(real)} real tokens (need 1..{length})")
    out_ids[r, length - len(real):] = real
    out_mask[r, length - len(real):] = 1
  return out_ids, out_mask


def _eos_tuple(cfg: ModelConfig, eos_token_id) -> tuple[int, ...]:
  if eos_token_id is None:
    return tuple(cfg.eos_token_ids)
  if isinstance(eos_token_id, (int, np.integer)):
    return (int(eos_token_id),)
  return tuple(int(e) for e in eos_token_id)


class Prompts(NamedTuple):
  """Prompts and settings checked and bucketed by `prepare`.

  ids, mask: [B, t_bucket] int32 numpy, left padded; n_bucket: max_new_tokens bucket;
  eos: EOS ids; pad: id written after EOS; rng: PRNG key.
  """
  ids: np.ndarray
  mask: np.ndarray
  n_bucket: int
  eos: tuple[int, ...]
  pad: int
  rng: jax.Array

  @property
  def t_bucket(self) -> int:
    return self.ids.shape[1]


def prepare(cfg: ModelConfig, input_ids, attention_mask, *, max_new_tokens: int,
            sampling: SamplingConfig, rng, eos_token_id, pad_token_id) -> Prompts:
  """Checks the arguments of `generate` and left-aligns the prompts into buckets."""
  if max_new_tokens < 1:
    raise ValueError("max_new_tokens must be >= 1")
  if rng is None:
    if not sampling.greedy:
      raise ValueError("sampling needs an explicit PRNG key (rng=jax.random.key(...))")
    rng = jax.random.key(0)
  t = max(int(np.asarray(attention_mask).sum(1).max()) if attention_mask is not None
          else np.shape(input_ids)[1], 1)
  if (cfg.position is PositionKind.LEARNED
      and t + max_new_tokens > cfg.max_position_embeddings):
    raise ValueError(f"{t} + {max_new_tokens} tokens exceed max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  ids, mask = left_align(input_ids, attention_mask, bucket(t))
  eos = _eos_tuple(cfg, eos_token_id)
  pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
  return Prompts(ids=ids, mask=mask, n_bucket=bucket(max_new_tokens), eos=eos,
                 pad=int(pad), rng=rng)


def sampling_scalars(sampling: SamplingConfig):
  """(temperature, top_p) as traced float32 scalars (temperature floored at 1e-6)."""
  return (jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32),
          jnp.asarray(sampling.top_p, jnp.float32))


def timed_generate(cfg: ModelConfig, params, input_ids, attention_mask=None, *,
                   max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                   rng=None, eos_token_id=None, pad_token_id: int | None = None):
  """`generate` that also returns the prefill and decode wall times (blocking)."""
  import time  # Local: only timing needs it.
  pr = prepare(cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens,
               sampling=sampling, rng=rng, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id)
  start = time.perf_counter()
  state, cache = prefill(cfg, params, jnp.asarray(pr.ids), jnp.asarray(pr.mask),
                         cache_len=pr.t_bucket + pr.n_bucket)
  jax.block_until_ready(state)
  mid = time.perf_counter()
  out, _, _ = decode(cfg, params, state, cache, pr.rng,
                     jnp.asarray(max_new_tokens, jnp.int32), *sampling_scalars(sampling),
                     num_slots=pr.n_bucket, greedy=sampling.greedy, top_k=sampling.top_k,
                     use_top_p=sampling.top_p < 1.0, eos_ids=pr.eos, pad_id=pr.pad)
  jax.block_until_ready(out)
  end = time.perf_counter()
  result = GenerationResult(tokens=out.tokens[:, :max_new_tokens], lengths=out.lengths)
  return result, Timing(prefill_s=mid - start, decode_s=end - mid)


def generate(cfg: ModelConfig, params, input_ids, attention_mask=None, *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             rng=None, eos_token_id=None, pad_token_id: int | None = None
             ) -> GenerationResult:
  """Generates up to `max_new_tokens` tokens per prompt.

  Args:
    cfg: model config.
    params: params tree (dense or `AnyPrecWeight` linears).
    input_ids: [B, T] prompt ids (any padding; real tokens given by the mask).
    attention_mask: [B, T] 1 = real token; None: all real.
    max_new_tokens: tokens to generate (at most).
    sampling: `SamplingConfig` (default greedy).
    rng: PRNG key; required unless greedy.
    eos_token_id: int or ids that end a sequence; None: the config's; (): never stop.
    pad_token_id: written after EOS; default the first EOS id (or 0).

  Returns:
    GenerationResult(tokens [B, max_new_tokens] int32, lengths [B] int32).
  """
  return timed_generate(cfg, params, input_ids, attention_mask,
                        max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0]
