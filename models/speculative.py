"""Speculative decoding: a cheap draft proposes tokens, the target verifies them.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (ICML
2023); Chen et al., "Accelerating LLM Decoding with Speculative Sampling" (2023). Each
round the draft proposes k tokens autoregressively; the target scores all k + 1
positions in one forward (M = k + 1 <= 8 rows per sequence: the GEMV path); the longest
prefix the target agrees with is accepted, plus one token from the target.
  greedy:   d_j is accepted iff it is the target's argmax, so the output equals plain
            greedy decoding of the target token for token;
  sampling: d_j ~ q_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the
            first rejection the token is drawn from norm(max(0, p_j - q_j)); after k
            acceptances from p_{k+1}. The output has the target's distribution exactly.
p and q are the distributions `models.generate` samples from (temperature, top-k, top-p
applied). For an any-precision model the draft is the same params at a lower precision
(`AnyPrecisionForCausalLM.generate(draft_precision=...)`): no array is copied.

Cache bookkeeping. Prompts are left padded to T slots as in `models.generate`, and both
caches hold the same tokens at the same slots, so one per-row slot index serves both:
index[r] is the slot of row r's *pending* token (emitted, not yet fed to either model).
A round:
  draft:  feed [prev, pending] at slots [index - 1, index] (M = 2; re-writing prev fills
          the one entry the draft lacks after a fully accepted round), then k - 1
          single tokens: proposals d_1..d_k with distributions q_1..q_k;
  target: feed [pending, d_1..d_k] at slots index..index + k: p_1..p_{k+1};
  accept: n drafts; emit d_1..d_n and the target's token; index += n + 1.
Rolling a cache back is free: entries past index[r] are outside the causal mask over
slots and are overwritten by the next round. Rows that finished (EOS, max_new_tokens)
freeze. The whole loop is one jitted `lax.while_loop` with both caches donated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig, PositionKind
from models.decoder import Decoder, KVCache, make_mask
from models.generate import (DecodeState, GenerationResult, SamplingConfig, Timing,
                             bucket, filter_logits, prefill, prepare, sample_logits,
                             sampling_scalars)

MAX_DRAFT = 7  # The verify forward feeds k + 1 <= 8 rows per sequence (ops.GEMV_MAX_M).
# Provisional, from acceptance on SmolLM2 and earlier H200 step times (small k wins
# while a low-bit step costs half an 8-bit one; benchmarks/results/speculative.md).
DEFAULT_NUM_DRAFT = 2


class SpeculativeStats(NamedTuple):
  """Per row: rounds [B] (verify forwards while the row was active) and accepted [B]
  (draft tokens the target accepted over those rounds, counted before truncation at
  EOS / max_new_tokens). accepted / rounds is the mean number of accepted drafts per
  round; each round emits one token more."""
  rounds: jax.Array
  accepted: jax.Array


def check_num_draft(num_draft: int) -> int:
  """num_draft as an int; ValueError outside 1..MAX_DRAFT."""
  if not isinstance(num_draft, int) or not 1 <= num_draft <= MAX_DRAFT:
    raise ValueError(f"num_draft must be an integer in 1..{MAX_DRAFT} (the verify "
                     f"forward feeds num_draft + 1 <= 8 tokens); got {num_draft!r}")
  return num_draft


def accept_greedy(target_logits, draft):
  """Greedy acceptance: drafts that equal the target's argmax, then its next argmax.

  Args:
    target_logits: [B, k + 1, V] target logits after the pending token and each draft.
    draft: [B, k] int32 draft tokens.

  Returns:
    (n [B] accepted drafts, token [B] the target's token after them).
  """
  best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
  match = draft == best[:, :-1]  # [B, k]
  n = jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)  # [B]
  return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_sampled(p, q, draft, rng):
  """The speculative-sampling rejection rule (keeps the target's distribution).

  Args:
    p: [B, k + 1, V] target probabilities (rows sum to 1).
    q: [B, k, V] draft probabilities; draft[:, j] was drawn from q[:, j].
    draft: [B, k] int32.
    rng: PRNG key.

  Returns:
    (n [B] accepted drafts, token [B] drawn from norm(max(0, p_{n+1} - q_{n+1})) if
    n < k, else from p_{k+1}).
  """
  b, k = draft.shape
  key_u, key_t = jax.random.split(rng)
  p_d = jnp.take_along_axis(p[:, :k], draft[..., None], axis=-1)[..., 0]  # [B, k]
  q_d = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]  # [B, k], > 0
  ok = jax.random.uniform(key_u, (b, k)) * q_d < p_d  # u < p/q, no division.
  n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)  # [B]
  q_ext = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)  # [B, k + 1, V]
  resid = jnp.take_along_axis(jnp.maximum(p - q_ext, 0.0), n[:, None, None],
                              axis=1)[:, 0]  # [B, V]; at n = k it is p_{k+1}.
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
  # No residual mass means p == q there, where a rejection has probability 0.
  resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_n)
  token = jax.random.categorical(key_t, jnp.log(resid), axis=-1).astype(jnp.int32)
  return n, token


def feed_tokens(cfg: ModelConfig, params, tokens, index, pos, kv_valid, cache: KVCache,
                *, last_only: bool = False):
  """Runs the cached decoder on T new tokens per sequence at per-row offsets.

  Args:
    cfg: model config.
    params: params tree.
    tokens: [B, T] int32, written at slots index[:, None] + arange(T).
    index: [B] int32 first slot of each row.
    pos: [B] int32 position of each row's first token.
    kv_valid: [B, S] slots holding real (or future) tokens.
    cache: the cache.
    last_only: logits of the last token only.

  Returns:
    (logits [B, T or 1, V] float32, cache).
  """
  step = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  slots = index[:, None] + step  # [B, T]
  positions = pos[:, None] + step  # [B, T]
  if cfg.position is PositionKind.LEARNED:
    # Drafts past max_new_tokens may pass the table (`prepare` checks only the emitted
    # tokens); an out-of-range lookup is NaN, which would reach every query of the
    # forward through 0 * NaN in attention. Their outputs are never emitted.
    positions = jnp.minimum(positions, cfg.max_position_embeddings - 1)
  return Decoder(cfg).apply({"params": params}, tokens, positions,
                            make_mask(cfg, kv_valid, slots), cache, index,
                            last_only=last_only)


class _Carry(NamedTuple):
  tokens: jax.Array    # [B, N + k + 1] output buffer
  lengths: jax.Array   # [B] tokens emitted
  done: jax.Array      # [B]
  pending: jax.Array   # [B] emitted, not yet fed
  prev: jax.Array      # [B] the token before it (at slot index - 1)
  index: jax.Array     # [B] slot of the pending token
  pos: jax.Array       # [B] position of the pending token
  rounds: jax.Array    # [B]
  accepted: jax.Array  # [B]
  rng: jax.Array
  target_cache: KVCache
  draft_cache: KVCache


@functools.partial(
    jax.jit, donate_argnames=("target_cache", "draft_cache"),
    static_argnames=("cfg", "num_draft", "num_slots", "greedy", "top_k", "use_top_p",
                     "eos_ids", "pad_id"))
def speculative_decode(cfg: ModelConfig, target_params, draft_params, state: DecodeState,
                       last_prompt, target_cache: KVCache, draft_cache: KVCache, rng,
                       max_new_tokens, temperature, top_p, *, num_draft: int,
                       num_slots: int, greedy: bool, top_k: int, use_top_p: bool,
                       eos_ids: tuple[int, ...], pad_id: int):
  """The on-device speculative loop (one jitted `lax.while_loop`; caches donated).

  Args:
    cfg: model config (static); target and draft share it.
    target_params, draft_params: params trees (e.g. one any-precision tree at two
      precisions).
    state: the target's `prefill` state (its logits give the first token).
    last_prompt: [B] the last prompt token of each row (slot T - 1).
    target_cache, draft_cache: from `prefill` of each model, with at least
      T + max_new_tokens + k - 1 slots.
    rng: PRNG key.
    max_new_tokens: int scalar (traced) <= num_slots.
    temperature, top_p: float scalars (traced).
    num_draft: k, draft tokens per round (static, 1..MAX_DRAFT).
    num_slots, greedy, top_k, use_top_p, eos_ids, pad_id: as `models.decode`.

  Returns:
    (GenerationResult(tokens [B, num_slots], lengths [B]), SpeculativeStats, target
    cache, draft cache); returning the caches lets XLA alias them to the donated inputs.
  """
  k = check_num_draft(num_draft)
  filt = functools.partial(filter_logits, temperature=temperature, top_p=top_p,
                           top_k=top_k, use_top_p=use_top_p)
  sample = functools.partial(sample_logits, temperature=temperature, top_p=top_p,
                             greedy=greedy, top_k=top_k, use_top_p=use_top_p)
  eos = jnp.asarray(eos_ids if eos_ids else [-1], jnp.int32)
  kv_valid = state.kv_valid
  b = state.logits.shape[0]
  j = jnp.arange(k + 1, dtype=jnp.int32)  # [k + 1] offsets inside a round's block

  rng, sub = jax.random.split(rng)
  first = sample(state.logits, sub)  # [B]
  zeros = jnp.zeros((b,), jnp.int32)
  init = _Carry(
      tokens=jnp.full((b, num_slots + k + 1), pad_id, jnp.int32).at[:, 0].set(first),
      lengths=zeros + 1, done=jnp.isin(first, eos) | (max_new_tokens <= 1),
      pending=first, prev=last_prompt.astype(jnp.int32),
      index=jnp.broadcast_to(state.index, (b,)).astype(jnp.int32),
      pos=state.next_pos.astype(jnp.int32), rounds=zeros, accepted=zeros, rng=rng,
      target_cache=target_cache, draft_cache=draft_cache)

  def body(c: _Carry):
    rng, key_draft, key_last, key_accept = jax.random.split(c.rng, 4)

    def draft_step(carry, offset):
      """Samples a proposal from the last logits, feeds it at slot index + offset."""
      logits, cache, key = carry
      key, sub = jax.random.split(key)
      d = sample(logits, sub)  # [B]
      nxt, cache = feed_tokens(cfg, draft_params, d[:, None], c.index + offset,
                               c.pos + offset, kv_valid, cache)
      q = None if greedy else jax.nn.softmax(filt(logits), axis=-1)  # [B, V]
      return (nxt[:, 0], cache, key), (d, q)

    # Draft: k proposals; the first forward re-feeds prev (M = 2).
    logits, d_cache = feed_tokens(cfg, draft_params,
                                  jnp.stack([c.prev, c.pending], axis=1), c.index - 1,
                                  c.pos - 1, kv_valid, c.draft_cache, last_only=True)
    (logits, d_cache, _), (ds, qs) = jax.lax.scan(
        draft_step, (logits[:, 0], d_cache, key_draft), jnp.arange(1, k, dtype=jnp.int32))
    d_last = sample(logits, key_last)  # [B]
    draft = jnp.concatenate([ds.T, d_last[:, None]], axis=1)  # [B, k]
    # Target: score pending + k drafts in one forward (M = k + 1).
    fed = jnp.concatenate([c.pending[:, None], draft], axis=1)  # [B, k + 1]
    t_logits, t_cache = feed_tokens(cfg, target_params, fed, c.index, c.pos, kv_valid,
                                    c.target_cache)  # [B, k + 1, V]
    if greedy:
      n, token = accept_greedy(t_logits, draft)
    else:
      q = jnp.concatenate([jnp.moveaxis(qs, 0, 1),
                           jax.nn.softmax(filt(logits), axis=-1)[:, None]], axis=1)
      n, token = accept_sampled(jax.nn.softmax(filt(t_logits), axis=-1), q, draft,
                                key_accept)
    # Emit d_1..d_n, token; cut at the first EOS and at max_new_tokens.
    block = jnp.where(j < n[:, None], jnp.concatenate([draft, draft[:, :1]], axis=1),
                      jnp.where(j == n[:, None], token[:, None], pad_id))  # [B, k + 1]
    is_eos = jnp.isin(block, eos) & (j <= n[:, None])
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), k + 1)
    count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), max_new_tokens - c.lengths)
    count = jnp.where(c.done, 0, count)  # [B]
    block = jnp.where(j < count[:, None], block, pad_id)
    tokens = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice(row, blk, (at,)))(
        c.tokens, block, c.lengths)
    lengths = c.lengths + count
    done = c.done | (lengths >= max_new_tokens) | jnp.any(is_eos & (j < count[:, None]),
                                                          axis=1)
    # Finished rows freeze; what later rounds write into their caches is never read.
    keep = lambda old, new: jnp.where(c.done, old, new)
    return _Carry(
        tokens=tokens, lengths=lengths, done=done, pending=keep(c.pending, token),
        prev=keep(c.prev, jnp.take_along_axis(fed, n[:, None], axis=1)[:, 0]),
        index=keep(c.index, c.index + n + 1), pos=keep(c.pos, c.pos + n + 1),
        rounds=c.rounds + (~c.done).astype(jnp.int32),
        accepted=c.accepted + jnp.where(c.done, 0, n), rng=rng, target_cache=t_cache,
        draft_cache=d_cache)

  out = jax.lax.while_loop(lambda c: ~jnp.all(c.done), body, init)
  return (GenerationResult(tokens=out.tokens[:, :num_slots], lengths=out.lengths),
          SpeculativeStats(rounds=out.rounds, accepted=out.accepted), out.target_cache,
          out.draft_cache)


def timed_generate(cfg: ModelConfig, target_params, draft_params, input_ids,
                   attention_mask=None, *, max_new_tokens: int,
                   num_draft: int = DEFAULT_NUM_DRAFT,
                   sampling: SamplingConfig = SamplingConfig(), rng=None,
                   eos_token_id=None, pad_token_id: int | None = None
                   ) -> tuple[GenerationResult, Timing, SpeculativeStats]:
  """Speculative `models.generate`, plus wall times (blocking) and acceptance counts.

  Args:
    cfg: model config (target and draft).
    target_params: the params whose outputs are produced (greedy: token for token
      those of `models.generate(cfg, target_params, ...)`; sampling: its distribution).
    draft_params: the params that propose tokens (any tree of the same config).
    input_ids, attention_mask, max_new_tokens, sampling, rng, eos_token_id,
      pad_token_id: as `models.generate`.
    num_draft: k, draft tokens per round, 1..MAX_DRAFT.

  Returns:
    (GenerationResult(tokens [B, max_new_tokens], lengths [B]), Timing (prefill of
    both models; decode loop), SpeculativeStats).
  """
  import time  # Local: only timing needs it.
  k = check_num_draft(num_draft)
  pr = prepare(cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens,
               sampling=sampling, rng=rng, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id)
  ids, mask = jnp.asarray(pr.ids), jnp.asarray(pr.mask)
  # Verify writes reach slot T + max_new_tokens + k - 2. Bucketed like max_new_tokens,
  # so the prefill usually has the shape (and program) of plain generation.
  cache_len = pr.t_bucket + bucket(max_new_tokens + k)
  start = time.perf_counter()
  state, t_cache = prefill(cfg, target_params, ids, mask, cache_len=cache_len)
  _, d_cache = prefill(cfg, draft_params, ids, mask, cache_len=cache_len)
  jax.block_until_ready((state, d_cache))
  mid = time.perf_counter()
  out, stats, _, _ = speculative_decode(
      cfg, target_params, draft_params, state, ids[:, -1], t_cache, d_cache, pr.rng,
      jnp.asarray(max_new_tokens, jnp.int32), *sampling_scalars(sampling), num_draft=k,
      num_slots=pr.n_bucket, greedy=sampling.greedy, top_k=sampling.top_k,
      use_top_p=sampling.top_p < 1.0, eos_ids=pr.eos, pad_id=pr.pad)
  jax.block_until_ready(out)
  end = time.perf_counter()
  result = GenerationResult(tokens=out.tokens[:, :max_new_tokens], lengths=out.lengths)
  return result, Timing(prefill_s=mid - start, decode_s=end - mid), stats


def generate(cfg: ModelConfig, target_params, draft_params, input_ids,
             attention_mask=None, **kwargs) -> GenerationResult:
  """Speculative generation; arguments as `timed_generate`, returns its result only."""
  return timed_generate(cfg, target_params, draft_params, input_ids, attention_mask,
                        **kwargs)[0]
