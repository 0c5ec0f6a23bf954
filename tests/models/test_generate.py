"""Generation: HF generate parity, cache vs recompute, mixed batches, EOS, sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import models
from models.generate import sample_logits
from tests.models import hf_fixtures as fx
from tests import slow

_forward = jax.jit(models.forward, static_argnums=0)
_decode_step = jax.jit(models.decode_step, static_argnums=0)


@functools.lru_cache(maxsize=None)
def _load(name):
  model, path = fx.hf_model(name)
  cfg, params = models.load_pretrained(path)
  return model, cfg, params


class HFGenerateParityTest(parameterized.TestCase):

  @parameterized.parameters("llama_gqa", "mistral_window", "opt_350m")
  @slow.slow("generate against transformers on 3 HF fixtures; SmolLM2Test checks the real model against transformers")
  def test_greedy_equals_hf_generate(self, name):
    import torch
    model, cfg, params = _load(name)
    ids, mask = fx.left_padded([fx.random_ids(5, 7), fx.random_ids(6, 4)])
    n = 10  # Prompt + new tokens > the Mistral window (4).
    with torch.no_grad():
      hf = model.generate(torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=2,
                          pad_token_id=2).numpy()[:, ids.shape[1]:]
    out = models.generate(cfg, params, ids, mask, max_new_tokens=n, eos_token_id=2)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:, :hf.shape[1]], hf)
    self.assertTrue((tokens[:, hf.shape[1]:] == 2).all())  # Padded after all stopped.


class CacheTest(parameterized.TestCase):

  @parameterized.parameters("mistral_window", "opt_125m")
  def test_cached_decode_equals_full_recompute(self, name):
    """Prefill + single-token steps give the logits of a full forward pass."""
    _, cfg, params = _load(name)
    ids, mask = fx.left_padded([fx.random_ids(7, 5), fx.random_ids(8, 3)])
    more = fx.random_ids(9, (2, 6))  # Tokens fed one at a time.
    state, cache = models.prefill(cfg, params, jnp.asarray(ids), jnp.asarray(mask),
                                  cache_len=16)
    cached = [state.logits]
    for j in range(more.shape[1]):
      state, cache = _decode_step(cfg, params, jnp.asarray(more[:, j]), state, cache)
      cached.append(state.logits)
    cached = np.stack(cached, axis=1)  # [B, 7, V]
    full_ids = np.concatenate([ids, more], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(more)], axis=1)
    full = np.asarray(_forward(cfg, params, jnp.asarray(full_ids),
                               jnp.asarray(full_mask)))[:, ids.shape[1] - 1:]
    np.testing.assert_allclose(cached, full, atol=5e-5, rtol=1e-4)


class BatchTest(absltest.TestCase):

  def test_mixed_lengths_equal_each_alone(self):
    _, cfg, params = _load("mistral_window")
    rows = [fx.random_ids(10, 3), fx.random_ids(11, 9), fx.random_ids(12, 6)]
    ids, mask = fx.left_padded(rows)
    batch = models.generate(cfg, params, ids, mask, max_new_tokens=8, eos_token_id=())
    for i, row in enumerate(rows):
      alone = models.generate(cfg, params, row[None], max_new_tokens=8, eos_token_id=())
      np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    np.testing.assert_array_equal(batch.lengths, [8, 8, 8])

  def test_right_padding_is_realigned(self):
    _, cfg, params = _load("llama_gqa")
    ids, mask = fx.left_padded([fx.random_ids(13, 5), fx.random_ids(14, 2)])
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    a = models.generate(cfg, params, ids, mask, max_new_tokens=5)
    b = models.generate(cfg, params, right_ids, right_mask, max_new_tokens=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)


class DecodeOptionsTest(absltest.TestCase):

  def test_compiler_options_pick_the_program_not_the_tokens(self):
    """`decode` compiles one program per option set `decode_compiler_options` asks for
    (the GPU's command-buffer option parses on any backend); the tokens are equal."""
    from unittest import mock
    from anyprec_jax.pallas import backend
    import importlib
    gen = importlib.import_module("models.generate")  # (`models.generate`: the function)
    _, cfg, params = _load("llama_gqa")
    ids = fx.random_ids(15, 6)[None]
    a = models.generate(cfg, params, ids, max_new_tokens=4, eos_token_id=())
    before = gen._decode_jit.cache_info().currsize
    without = {"xla_gpu_enable_command_buffer": backend.GRAPHS_WITHOUT_CUSTOM_CALLS}
    with mock.patch.object(backend, "decode_compiler_options", return_value=without):
      b = models.generate(cfg, params, ids, max_new_tokens=4, eos_token_id=())
    self.assertEqual(gen._decode_jit.cache_info().currsize, before + 1)
    np.testing.assert_array_equal(a.tokens, b.tokens)


class EosTest(absltest.TestCase):

  def test_eos_stops_each_sequence_and_the_loop(self):
    _, cfg, params = _load("llama_gqa")
    ids, mask = fx.left_padded([fx.random_ids(15, 6), fx.random_ids(16, 4)])
    free = np.asarray(models.generate(cfg, params, ids, mask, max_new_tokens=12,
                                      eos_token_id=()).tokens)
    # An EOS id that row 0 emits at step k (first occurrence).
    k = 2
    eos = int(free[0, k])
    k = int(np.argmax(free[0] == eos))
    row1 = np.flatnonzero(free[1] == eos)
    k1 = int(row1[0]) if row1.size else 11
    out = models.generate(cfg, params, ids, mask, max_new_tokens=12, eos_token_id=eos,
                          pad_token_id=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    np.testing.assert_array_equal(lengths, [k + 1, k1 + 1])
    np.testing.assert_array_equal(tokens[0, :k + 1], free[0, :k + 1])
    self.assertTrue((tokens[0, k + 1:] == 0).all())
    np.testing.assert_array_equal(tokens[1, :k1 + 1], free[1, :k1 + 1])

  def test_loop_exits_when_all_done(self):
    """The while_loop runs max(lengths) - 1 steps, not max_new_tokens - 1."""
    _, cfg, params = _load("opt_125m")
    ids = fx.random_ids(17, (1, 5))
    first = int(models.generate(cfg, params, ids, max_new_tokens=1).tokens[0, 0])
    state, cache = models.prefill(cfg, params, jnp.asarray(ids),
                                  jnp.ones((1, 5), jnp.int32), cache_len=16 + 32)
    out, final, _ = models.decode(
        cfg, params, state, cache, jax.random.key(0), jnp.asarray(32), jnp.asarray(1.0),
        jnp.asarray(1.0), num_slots=32, greedy=True, top_k=0, use_top_p=False,
        eos_ids=(first,), pad_id=0)
    self.assertEqual(int(out.lengths[0]), 1)
    self.assertEqual(int(final.index), 5)  # No decode step ran.


class SamplingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("temperature", 0.7, 0, 1.0), ("top_k", 1.3, 3, 1.0), ("top_p", 1.0, 0, 0.6),
      ("all", 0.8, 4, 0.7))
  def test_distribution(self, temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 0.3, 0.2, -0.5, -1.0], np.float32)
    # Independent reference (HF order: temperature, top-k, top-p).
    x = logits / temperature
    keep = np.ones_like(x, bool)
    if top_k:
      keep &= x >= np.sort(x)[::-1][top_k - 1]
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep_p = np.zeros_like(keep)
    keep_p[order] = before < top_p
    want = p * keep_p / (p * keep_p).sum()

    n = 40000
    draws = sample_logits(
        jnp.broadcast_to(logits, (n, 6)), jax.random.key(1), jnp.float32(temperature),
        jnp.float32(top_p), greedy=False, top_k=top_k, use_top_p=top_p < 1)
    freq = np.bincount(np.asarray(draws), minlength=6) / n
    np.testing.assert_allclose(freq, want, atol=0.01)
    self.assertTrue((freq[want == 0] == 0).all())

  def test_generate_sampling_is_keyed(self):
    _, cfg, params = _load("llama_gqa")
    ids = fx.random_ids(18, (2, 5))
    s = models.SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    a = models.generate(cfg, params, ids, max_new_tokens=12, sampling=s,
                        rng=jax.random.key(3), eos_token_id=())
    b = models.generate(cfg, params, ids, max_new_tokens=12, sampling=s,
                        rng=jax.random.key(3), eos_token_id=())
    c = models.generate(cfg, params, ids, max_new_tokens=12, sampling=s,
                        rng=jax.random.key(4), eos_token_id=())
    np.testing.assert_array_equal(a.tokens, b.tokens)
    self.assertFalse(np.array_equal(a.tokens, c.tokens))
    greedy = models.generate(cfg, params, ids, max_new_tokens=12, eos_token_id=())
    top1 = models.generate(cfg, params, ids, max_new_tokens=12, eos_token_id=(),
                           sampling=models.SamplingConfig(temperature=1.0, top_k=1),
                           rng=jax.random.key(5))
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)

  def test_sampling_needs_a_key(self):
    _, cfg, params = _load("llama_gqa")
    with self.assertRaisesRegex(ValueError, "PRNG key"):
      models.generate(cfg, params, fx.random_ids(0, (1, 3)), max_new_tokens=2,
                      sampling=models.SamplingConfig(temperature=1.0))


if __name__ == "__main__":
  absltest.main()
