"""Measurements of self-speculative decoding (`models.speculative`).

Used by `scripts/speculative_acceptance.py` (acceptance on a real checkpoint) and
`scripts/bench_speculative.py` (per-round costs and tokens/s on random weights).

Acceptance: mean accepted draft tokens per round (0..k) and tokens emitted per round
(accepted + the target's own token; the first token, from the prefill, excluded).

Per-round costs: each forward is timed inside one jitted `lax.fori_loop` of `repeats`
forwards (the next tokens are the argmax of the last logits, so iterations depend on
each other), after a warm-up call; median over `timed_runs` calls, divided by
`repeats`. Every forward writes its tokens at the same slots after `context` slots.
A round costs draft(M=2) + (k - 1) draft(M=1) + verify(M=k+1): the model below ignores
the acceptance logic and sampling, which the end-to-end speculative timing includes.
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from anyprec_jax import latency
from models import speculative
from models.decoder import init_cache


def text_prompts(token_ids: np.ndarray, *, num_prompts: int, prompt_len: int,
                 lengths: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Prompts cut from a tokenized text, spread evenly over it.

  Args:
    token_ids: [L] ids of the whole text.
    num_prompts: P.
    prompt_len: tokens per prompt (the longest, with `lengths`).
    lengths: optional per-prompt lengths (cycled), for a batch of mixed lengths.

  Returns:
    (ids [P, prompt_len] int32, mask [P, prompt_len] int32), left padded.
  """
  chunks = len(token_ids) // prompt_len
  if chunks < num_prompts:
    raise ValueError(f"text of {len(token_ids)} tokens holds {chunks} prompts of "
                     f"{prompt_len}, fewer than {num_prompts}")
  starts = np.linspace(0, chunks - 1, num_prompts).astype(int) * prompt_len
  ids = np.zeros((num_prompts, prompt_len), np.int32)
  mask = np.zeros((num_prompts, prompt_len), np.int32)
  for i, s in enumerate(starts):
    n = prompt_len if lengths is None else int(lengths[i % len(lengths)])
    ids[i, prompt_len - n:] = token_ids[s:s + n]
    mask[i, prompt_len - n:] = 1
  return ids, mask


def acceptance_rows(model, ids, mask, *, target: int, drafts: Sequence[int],
                    num_drafts: Sequence[int], new_tokens: int,
                    sampling: models.SamplingConfig = models.SamplingConfig(),
                    seed: int = 0, log: Callable[[str], None] = print) -> list[dict]:
  """Acceptance of each (draft precision, k) against `target` on a batch of prompts.

  Args:
    model: an `AnyPrecisionForCausalLM` holding `target` and `drafts`.
    ids, mask: [P, T] left-padded prompts.
    target: the verifying precision.
    drafts: draft precisions.
    num_drafts: values of k.
    new_tokens: tokens generated per prompt (EOS ignored, so every row makes them all).
    sampling: greedy (default) or a sampling config.
    seed: PRNG seed of sampling.
    log: progress printer.

  Returns:
    [{"target", "draft", "k", "prompts", "new_tokens", "rounds", "accepted_per_round",
      "tokens_per_round", "identical_rows"}]; identical_rows counts the rows equal to
    plain decoding at `target` (greedy only; None when sampling).
  """
  kwargs = dict(max_new_tokens=new_tokens, sampling=sampling, eos_token_id=(),
                rng=jax.random.key(seed))
  plain = None
  if sampling.greedy:
    plain = np.asarray(model.generate(ids, target, mask, **kwargs).tokens)
  rows = []
  for draft in drafts:
    for k in num_drafts:
      out, _, st = model.timed_speculative_generate(
          ids, target, mask, draft_precision=draft, num_draft=k, **kwargs)
      rounds = int(np.asarray(st.rounds).sum())
      emitted = int(np.asarray(out.lengths).sum()) - len(ids)  # Prefill tokens excluded.
      row = {"target": target, "draft": draft, "k": k, "prompts": len(ids),
             "new_tokens": new_tokens, "rounds": rounds,
             "accepted_per_round": int(np.asarray(st.accepted).sum()) / rounds,
             "tokens_per_round": emitted / rounds,
             "identical_rows": None if plain is None else int(
                 (np.asarray(out.tokens) == plain).all(axis=1).sum())}
      rows.append(row)
      log(f"draft {draft} k {k}: {row['accepted_per_round']:.2f} accepted / round, "
          f"{row['tokens_per_round']:.2f} tokens / round, identical rows "
          f"{row['identical_rows']}")
  return rows


def write_report(path: str, title: str, header: str, body: str) -> None:
  """The markdown results file of the speculative scripts: title, header lines as
  paragraphs, body."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(f"# {title}\n\n" + header.replace("\n", "\n\n") + "\n\n" + body + "\n")


def acceptance_table(rows: Sequence[dict]) -> str:
  """Markdown table of `acceptance_rows`."""
  lines = ["| target | draft | k | accepted drafts / round | tokens / round | rounds | "
           "rows identical to plain greedy |", "|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    same = "-" if r["identical_rows"] is None else f"{r['identical_rows']}/{r['prompts']}"
    lines.append(f"| {r['target']} | {r['draft']} | {r['k']} | "
                 f"{r['accepted_per_round']:.2f} | {r['tokens_per_round']:.2f} | "
                 f"{r['rounds']} | {same} |")
  return "\n".join(lines)


@functools.partial(jax.jit, static_argnames=("cfg", "repeats"), donate_argnames=("cache",))
def _forward_loop(cfg: models.ModelConfig, params, cache, kv_valid, tokens, index, pos,
                  *, repeats: int):
  """`repeats` dependent forwards of tokens [B, M] at slots index (on device)."""

  def body(_, carry):
    cache, tok = carry
    logits, cache = speculative.feed_tokens(cfg, params, tok, index, pos, kv_valid, cache)
    return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, M]

  return jax.lax.fori_loop(0, repeats, body, (cache, tokens))


def forward_ms(cfg: models.ModelConfig, params, *, width: int, batch: int, context: int,
               repeats: int = 16, timed_runs: int = 3, dtype=jnp.bfloat16) -> float:
  """Median ms of one cached forward of `width` tokens per sequence after `context`.

  Args:
    cfg, params: the model (any precision).
    width: M tokens per sequence (1: a decode / draft step; k + 1: a verify).
    batch: sequences.
    context: cache slots before the new tokens (attention reads them).
    repeats: forwards per timed call (one jitted loop).
    timed_runs: timed calls after a warm-up (median).
    dtype: cache dtype.

  Returns:
    milliseconds per forward.
  """
  cache = init_cache(cfg, batch, context + width, dtype)
  kv_valid = jnp.ones((batch, context + width), bool)
  tokens = jnp.full((batch, width), 3, jnp.int32)
  index = jnp.full((batch,), context, jnp.int32)
  times = []
  for i in range(timed_runs + 1):
    start = time.perf_counter()
    cache, tokens = _forward_loop(cfg, params, cache, kv_valid, tokens, index, index,
                                  repeats=repeats)
    jax.block_until_ready(tokens)
    if i:  # The first call compiles.
      times.append((time.perf_counter() - start) / repeats)
  return 1e3 * statistics.median(times)


def round_costs(cfg: models.ModelConfig, params_at: Callable[[int], object], *,
                target: int, drafts: Sequence[int], num_drafts: Sequence[int],
                batch: int, context: int, repeats: int = 16, timed_runs: int = 3,
                dtype=jnp.bfloat16, log: Callable[[str], None] = print) -> dict:
  """Per-forward costs of a speculative round.

  Returns:
    {"plain": ms of a target step (M = 1), "verify": {k: ms at M = k + 1},
     "draft": {b: {1: ms at M = 1, 2: ms at M = 2}}}.
  """
  run = functools.partial(forward_ms, cfg, batch=batch, context=context,
                          repeats=repeats, timed_runs=timed_runs, dtype=dtype)
  out = {"plain": run(params_at(target), width=1), "verify": {}, "draft": {}}
  log(f"target {target} M=1: {out['plain']:.3f} ms")
  for k in num_drafts:
    out["verify"][k] = run(params_at(target), width=k + 1)
    log(f"target {target} M={k + 1}: {out['verify'][k]:.3f} ms")
  for b in drafts:
    out["draft"][b] = {m: run(params_at(b), width=m) for m in (1, 2)}
    log(f"draft {b} M=1: {out['draft'][b][1]:.3f} ms, M=2: {out['draft'][b][2]:.3f} ms")
  return out


def round_ms(costs: dict, draft: int, k: int) -> float:
  """Modelled ms of one round: draft(M=2) + (k - 1) draft(M=1) + verify(M=k+1)."""
  d = costs["draft"][draft]
  return d[2] + (k - 1) * d[1] + costs["verify"][k]


def projection_table(costs: dict, *, drafts: Sequence[int], num_drafts: Sequence[int],
                     tokens_per_round: dict | None = None) -> str:
  """Markdown: per-round cost and modelled speed-up over plain decoding at the target.

  Args:
    costs: `round_costs` output.
    drafts, num_drafts: rows.
    tokens_per_round: {(draft, k): measured tokens per round} (e.g. from
      `acceptance_rows` on a real checkpoint); the speed-up is modelled where given.

  Returns:
    The table; speed-up = tokens_per_round * plain_ms / round_ms; break-even = the
    tokens per round at which speculation pays (round_ms / plain_ms).
  """
  lines = ["| draft | k | round ms (model) | break-even tokens / round | "
           "tokens / round (measured) | modelled speed-up |",
           "|---:|---:|---:|---:|---:|---:|"]
  for b in drafts:
    for k in num_drafts:
      ms = round_ms(costs, b, k)
      tau = (tokens_per_round or {}).get((b, k))
      speed = "-" if tau is None else f"{tau * costs['plain'] / ms:.2f}x"
      lines.append(f"| {b} | {k} | {ms:.3f} | {ms / costs['plain']:.2f} | "
                   f"{'-' if tau is None else f'{tau:.2f}'} | {speed} |")
  return "\n".join(lines)


def bench_decode(cfg: models.ModelConfig, params_at: Callable[[int], object], *,
                 target: int, pairs: Sequence[tuple[int, int]], prompt_len: int,
                 new_tokens: int, batch: int = 1, repeats: int = 3,
                 log: Callable[[str], None] = print) -> list[dict]:
  """End-to-end decode speed: plain at `target`, then speculative for each (draft, k).

  Random prompts, EOS ignored; timing as `latency.time_generation` (warm-up, median).

  Returns:
    [{"mode", "draft", "k", "decode_ms_per_token", "tokens_per_s", "speedup",
      "tokens_per_round"}], plain first; speed-up over plain decode tokens/s.
  """
  ids = np.asarray(jax.random.randint(jax.random.key(2), (batch, prompt_len), 3,
                                      cfg.vocab_size), np.int32)
  kwargs = dict(max_new_tokens=new_tokens, eos_token_id=())
  runs = [("plain", None, None)] + [("speculative", b, k) for b, k in pairs]
  rows = []
  for mode, b, k in runs:
    stats = {}

    def run(b=b, k=k, stats=stats):
      if b is None:
        return models.timed_generate(cfg, params_at(target), ids, **kwargs)
      result, timing, st = speculative.timed_generate(
          cfg, params_at(target), params_at(b), ids, num_draft=k, **kwargs)
      stats["tau"] = ((int(np.asarray(result.lengths).sum()) - batch)
                      / int(np.asarray(st.rounds).sum()))
      return result, timing

    lat = latency.time_generation(run, repeats)
    rows.append({"mode": mode, "draft": b, "k": k,
                 "decode_ms_per_token": lat.decode_ms_per_token,
                 "tokens_per_s": lat.tokens_per_s, "tokens_per_round": stats.get("tau")})
    log(f"{mode} draft {b} k {k}: {lat.decode_ms_per_token:.3f} ms/token"
        + ("" if b is None else f", {stats['tau']:.2f} tokens / round"))
  for r in rows:
    r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
  return rows


def decode_table(rows: Sequence[dict], target: int) -> str:
  """Markdown table of `bench_decode`."""
  lines = ["| mode | draft | k | tokens / round | decode ms/token | tokens/s | speed-up |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    tau = "-" if r["tokens_per_round"] is None else f"{r['tokens_per_round']:.2f}"
    lines.append(f"| {r['mode']} ({target}-bit target) | {r['draft'] or '-'} | "
                 f"{r['k'] or '-'} | {tau} | {r['decode_ms_per_token']:.3f} | "
                 f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
  return "\n".join(lines)
