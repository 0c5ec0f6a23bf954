"""The model side of the server: one set of weights, a params tree per precision, and
a batched generation that yields one token per row per step.

An `Engine` holds either an any-precision checkpoint (one `AnyPrecisionForCausalLM`,
every loaded precision sharing its planes) or a dense Hugging Face model, served as
the single precision of its dtype (16 for bfloat16 / float16, 32 for float32).
`Engine.random` builds the first kind from random weights of a benchmark shape (no
checkpoint; a character tokenizer), for load runs on machines without one.

`Engine.run_batch` is the only generation path. It left-aligns the prompts into
buckets (`models.generate.bucket`: batch rows to a power of two up to `max_batch`,
prompt length and new-token room to powers of two >= 16), runs the jitted `prefill`,
then decodes in chunks: one jitted `_steps` call runs `chunk` steps of
`models.generate.decode_step` plus per-row sampling in a `fori_loop` (cache
donated), and the host yields the chunk's tokens step by step. Chunks rather than the
whole on-device `lax.while_loop` of `models.generate.decode` are what let the server
stream tokens as they come, stop a row at a stop string or a client disconnect, and
give each row its own `max_tokens`, temperature, top_p and seed; chunks rather than
single steps keep the per-call cost (dispatch; on CPU the reference path's
dequantisation, which XLA hoists out of the loop) once per chunk. The jit cache holds
one program per (precision, batch bucket, prompt bucket, room bucket, chunk, sampling
mode).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.generate import (MIN_BUCKET, bucket, decode_step, filter_logits, left_align,
                             prefill)


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One request's share of a batch.

  Attributes:
    prompt: prompt token ids (at least one).
    max_tokens: tokens to generate at most (>= 1).
    temperature: 0: greedy.
    top_p: nucleus mass in (0, 1]; 1: off.
    seed: PRNG seed of this row's sampling.
    eos: token ids that end the row (empty: never).
  """
  prompt: tuple[int, ...]
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  eos: tuple[int, ...] = ()


def sample_rows(logits, keys, temperature, top_p, *, greedy: bool, use_top_p: bool):
  """One token per row, each row with its own temperature, top_p and PRNG key.

  Args:
    logits: [B, V] float32.
    keys: [B] PRNG keys.
    temperature: [B] float32; rows with 0 take the argmax.
    top_p: [B] float32 in (0, 1].
    greedy: static; every row greedy (no sampling ops).
    use_top_p: static; some row has top_p < 1.

  Returns:
    (tokens [B] int32, next keys [B]).
  """
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
  if greedy:
    return argmax, keys
  split = jax.vmap(jax.random.split)(keys)  # [B, 2]
  keys, sub = split[:, 0], split[:, 1]
  temp = jnp.maximum(temperature, 1e-6)[:, None]  # [B, 1]
  x = logits / temp
  if use_top_p:
    filtered = filter_logits(logits, temp, top_p[:, None], top_k=0, use_top_p=True)
    x = jnp.where((top_p < 1.0)[:, None], filtered, x)
  sampled = jax.vmap(jax.random.categorical)(sub, x).astype(jnp.int32)  # [B]
  return jnp.where(temperature > 0, sampled, argmax), keys


@functools.partial(jax.jit, static_argnames=("greedy", "use_top_p"))
def _first(logits, keys, temperature, top_p, *, greedy, use_top_p):
  return sample_rows(logits, keys, temperature, top_p, greedy=greedy,
                     use_top_p=use_top_p)


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("cfg", "chunk", "greedy", "use_top_p"))
def _steps(cfg, params, tokens, state, cache, keys, temperature, top_p, n, *, chunk,
           greedy, use_top_p):
  """`n` <= chunk decode steps in one program: feeds `tokens` [B], samples the next,
  feeds it, ... (a `fori_loop`, so XLA hoists loop-invariant work such as the CPU
  reference path's dequantisation out of the steps).

  Returns:
    (sampled [chunk, B] int32 (rows past n undefined), last tokens [B], keys, state,
    cache).
  """
  def body(i, carry):
    tok, keys, state, cache, out = carry
    state, cache = decode_step(cfg, params, tok, state, cache)
    tok, keys = sample_rows(state.logits, keys, temperature, top_p, greedy=greedy,
                            use_top_p=use_top_p)
    return tok, keys, state, cache, out.at[i].set(tok)

  out = jnp.zeros((chunk, tokens.shape[0]), jnp.int32)
  tok, keys, state, cache, out = jax.lax.fori_loop(0, n, body,
                                                   (tokens, keys, state, cache, out))
  return out, tok, keys, state, cache


RANDOM_PRECISIONS = (3, 4, 5, 6, 7, 8)  # `Engine.random`'s default.


def batch_bucket(n: int, max_batch: int) -> int:
  """Rows a batch of `n` requests runs with (n above max_batch: max_batch's bucket):
  the next power of two, at most max_batch."""
  return min(bucket(n, minimum=1), max_batch)


class Engine:
  """Weights at every served precision, the config and the tokenizer.

  Attributes:
    cfg: `models.ModelConfig`.
    precisions: served precisions, ascending.
    default_precision: the highest.
    quantized: whether the weights are any-precision (else one dense precision).
    context_length: prompt + new tokens allowed per request.
  """

  def __init__(self, cfg: models.ModelConfig, params_at: Callable[[int], object],
               precisions: Sequence[int], tokenizer, *, quantized: bool):
    self.cfg = cfg
    self._params_at = params_at
    self.precisions = tuple(sorted(precisions))
    self.default_precision = self.precisions[-1]
    self.tokenizer = tokenizer
    self.quantized = quantized
    self.context_length = cfg.max_position_embeddings

  @classmethod
  def load(cls, model_dir, precisions: Sequence[int] | None = None, dtype=None,
           tokenizer=None) -> "Engine":
    """Loads an any-precision checkpoint, or a dense HF directory as one precision.

    Args:
      model_dir: local directory (or hub id / alias, resolved by `models`).
      precisions: precisions to serve (any-precision only); None: all.
      dtype: activation / dense-weight dtype; None: `runtime.default_dtype()`.
      tokenizer: a tokenizer to use; None: the directory's.

    Raises:
      errors.UsageError: precisions given for a dense model, or outside the
        checkpoint's range.
    """
    from anyprec_jax import errors, evaluation, runtime
    from models import hf_loader
    model_dir = models.resolve_model_dir(models.resolve_alias(str(model_dir)))
    dtype = runtime.default_dtype() if dtype is None else dtype
    tok = evaluation.load_tokenizer(model_dir) if tokenizer is None else tokenizer
    anyprec = hf_loader.read_hf_config(model_dir).get("anyprec") or {}
    if anyprec.get("method") == "anyprec":
      model = runtime.AnyPrecisionForCausalLM.from_quantized(model_dir, precisions,
                                                             dtype=dtype)
      for b in model.supported_precisions:
        model.params_at(b)  # Built once here, not on a request.
      return cls(model.cfg, model.params_at, model.supported_precisions, tok,
                 quantized=True)
    if precisions:
      raise errors.UsageError(f"--precisions needs an any-precision checkpoint; "
                              f"{model_dir} is a dense model")
    cfg, params = models.load_pretrained(model_dir, dtype=dtype)
    bits = jnp.dtype(dtype).itemsize * 8
    return cls(cfg, lambda b: params, (bits,), tok, quantized=False)

  @classmethod
  def random(cls, shape, precisions: Sequence[int] | None = None, dtype=None,
             tokenizer=None, layers: int | None = None, seed: int = 0) -> "Engine":
    """Random any-precision weights of a benchmark shape, served as a loaded
    checkpoint would be (benchmarks only: the text is noise).

    The params are `latency.random_anyprec_model`'s: one random parent with
    max(precisions) planes plus a LUT per precision, in this backend's plane layout
    with q/k/v fused, as `from_quantized` loads a checkpoint. So a decode step reads
    the bytes, and runs the kernels, of a real checkpoint of that shape.

    Args:
      shape: `latency.Shape` or its value ("llama-2-7b", "tiny", ...).
      precisions: integer widths to serve; None: RANDOM_PRECISIONS (what a 3-bit
        seed / 8-bit parent checkpoint loads).
      dtype: activation / dense-weight dtype; None: `runtime.default_dtype()`.
      tokenizer: a tokenizer; the model's vocabulary is resized to len(tokenizer)
        so every id stays in range. None: `char_tokenizer.char_tokenizer` of the
        shape's own vocabulary.
      layers: override the shape's number of layers.
      seed: PRNG seed of the weights.

    Raises:
      errors.UsageError: an unknown shape, layers < 1, or a precision that is not an
        int in 2..8.
    """
    from anyprec_jax import errors, latency
    from anyprec_jax.serving import char_tokenizer
    try:
      shape = latency.Shape(shape)
    except ValueError:
      raise errors.UsageError(f"unknown shape {shape!r}; shapes: "
                              f"{[s.value for s in latency.Shape]}") from None
    if layers is not None and layers < 1:
      raise errors.UsageError(f"layers must be >= 1, got {layers}")
    if tokenizer is None:
      tokenizer = char_tokenizer.char_tokenizer(latency.shape_config(shape).vocab_size)
    cfg = latency.shape_config(shape, layers, vocab_size=len(tokenizer))
    model = latency.random_anyprec_model(
        cfg, RANDOM_PRECISIONS if precisions is None else precisions, dtype=dtype,
        seed=seed)
    for b in model.supported_precisions:
      model.params_at(b)  # Built once here, not on a request.
    return cls(cfg, model.params_at, model.supported_precisions, tokenizer,
               quantized=True)

  def params_at(self, precision: int):
    return self._params_at(precision)

  def warm_up(self, max_batch: int, prompt_tokens: int, max_tokens: int, chunk: int = 8,
              log: Callable[[str], None] = lambda s: None) -> float:
    """Compiles the greedy programs of every (precision, batch bucket), for prompts of
    up to `prompt_tokens` tokens and up to `max_tokens` new ones, by running one
    generation of each; requests of those shapes then pay no compilation.

    Args:
      max_batch: the server's largest batch bucket.
      prompt_tokens, max_tokens: the prompt and new-token buckets to compile (each
        rounded up to its bucket, as `run_batch` does).
      chunk: decode steps per device call (the server's `decode_chunk`).
      log: gets one line per (precision, batch bucket) with its seconds.

    Returns:
      Seconds taken in all.
    """
    import time
    start = time.perf_counter()
    row = RowSpec((self.cfg.bos_token_id or 0,) * prompt_tokens, max_tokens)
    for b in self.precisions:
      for rows in sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)}):
        t = time.perf_counter()
        for _ in self.run_batch(b, [row] * rows, max_batch, chunk=chunk):
          pass
        log(f"warm-up: {b} bits, batch {rows}: {time.perf_counter() - t:.1f} s")
    return time.perf_counter() - start

  def run_batch(self, precision: int, rows: Sequence[RowSpec], max_batch: int,
                live: Callable[[], Sequence[bool]] | None = None, chunk: int = 8
                ) -> Iterator[np.ndarray]:
    """Generates for `rows` at `precision`, yielding one token per row per step.

    The device runs `chunk` steps per call (`_steps`); the tokens of a chunk are then
    yielded one step at a time, so a row finished mid-chunk wastes at most chunk - 1
    steps and a stream receives its tokens in bursts of up to `chunk`.

    Args:
      precision: a served precision.
      rows: 1..max_batch row specs.
      max_batch: the largest batch bucket.
      live: called before each yielded step; False for a row the caller has finished
        (a stop string, a disconnect). When no row is live the generation ends.
      chunk: decode steps per device call, a power of two <= 16 (so the steps fit the
        cache's room bucket).

    Yields:
      [len(rows)] int32 numpy per step: each row's next token, -1 for a row that is
      finished (EOS emitted, max_tokens reached, or not live).
    """
    if chunk < 1 or chunk > MIN_BUCKET or chunk & (chunk - 1):
      raise ValueError(f"chunk must be a power of two in 1..{MIN_BUCKET}, got {chunk}")
    cfg, params = self.cfg, self.params_at(precision)
    n, b = len(rows), batch_bucket(len(rows), max_batch)
    t_bucket = bucket(max(len(r.prompt) for r in rows))
    room = max(r.max_tokens for r in rows)
    pad = [(0,)] * (b - n)
    ids, mask = left_align(*_ragged([r.prompt for r in rows] + pad), t_bucket)
    temp = np.array([r.temperature for r in rows] + [0.0] * (b - n), np.float32)
    top_p = np.array([r.top_p for r in rows] + [1.0] * (b - n), np.float32)
    keys = jax.vmap(jax.random.key)(
        jnp.asarray([r.seed for r in rows] + [0] * (b - n), jnp.uint32))
    mode = dict(greedy=bool((temp == 0).all()), use_top_p=bool((top_p < 1).any()))
    state, cache = prefill(cfg, params, jnp.asarray(ids), jnp.asarray(mask),
                           cache_len=t_bucket + bucket(room))
    temp, top_p = jnp.asarray(temp), jnp.asarray(top_p)
    tok, keys = _first(state.logits, keys, temp, top_p, **mode)
    done = np.zeros(n, bool)
    counts = np.zeros(n, np.int64)
    limits = np.array([r.max_tokens for r in rows])
    eos = [set(r.eos) for r in rows]
    pending = [np.asarray(tok)[:n]]  # Steps computed, not yet yielded.
    produced = 1
    while True:
      for host in pending:
        if live is not None:
          done |= ~np.asarray(live(), bool)
        if done.all():
          return
        host = host.astype(np.int32)
        out = np.where(done, -1, host)
        counts += ~done
        done |= (counts >= limits) | np.array([int(t) in e for t, e in zip(host, eos)])
        yield out
        if done.all():
          return
      steps = min(chunk, room - produced)
      if steps <= 0:
        return
      block, tok, keys, state, cache = _steps(
          cfg, params, tok, state, cache, keys, temp, top_p, jnp.asarray(steps, jnp.int32),
          chunk=chunk, **mode)
      pending = list(np.asarray(block)[:steps, :n])
      produced += steps


def _ragged(prompts):
  """(ids [B, T], mask [B, T]) right-padded from ragged prompts (for `left_align`)."""
  t = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), t), np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
    mask[i, :len(p)] = 1
  return ids, mask


def model_name(model_dir) -> str:
  """The served model id of a directory: its last path component."""
  return pathlib.Path(str(model_dir)).name or "model"
