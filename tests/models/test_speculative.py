"""Speculative decoding: greedy equality with plain decoding, the sampling rule's law.

The tiny models are random (no checkpoint); the draft is the target plus noise, so the
acceptance ranges from everything (no noise) to almost nothing. The speculative loop
compiles once per (batch, buckets, k, sampling mode, EOS ids); the cases share those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from scipy import stats

import models
from models import speculative as spec
from models.generate import filter_logits
from tests.models import hf_fixtures as fx

_CONFIG = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=5,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_MAX_NEW = 13
_EOS = 55  # The fixture's greedy rows 0, 2 emit it first as their tokens 2, 1 (checked).


def _noisy(params, scale: float, seed: int):
  """params with every matrix entry times 1 + scale * N(0, 1) (a draft of the target)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: x if x.ndim == 1 else jnp.asarray(
          np.asarray(x) * (1 + scale * rng.normal(size=x.shape)), jnp.float32), params)


@functools.lru_cache(maxsize=None)
def _model(**overrides):
  """(cfg, params): a random tiny Mistral (sliding window 5 < the sequences)."""
  cfg = models.config_from_hf(dict(_CONFIG, **overrides))
  rng = np.random.default_rng(0)

  def init(path, leaf):
    if leaf.ndim == 1:  # Norm weights.
      return jnp.ones(leaf.shape, jnp.float32)
    embedding = "embed_tokens" in jax.tree_util.keystr(path)
    scale = 1.0 if embedding else leaf.shape[-1] ** -0.5
    return jnp.asarray(rng.normal(0, scale, leaf.shape), jnp.float32)

  abstract = models.decoder.abstract_params(cfg)
  return cfg, jax.tree_util.tree_map_with_path(init, abstract)


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 64, n).astype(np.int32) for n in (3, 9, 6)]


class GreedyTest(parameterized.TestCase):

  @parameterized.parameters(1, 4)
  def test_equals_plain_greedy(self, k):
    """Mixed-length batch, drafts from perfect to useless, k = 1 and 4.

    Rows 0 and 2 end with EOS at their tokens 2 and 1; with a perfect draft, round 1
    emits tokens 1..k+1 (token 0 comes from the prefill), so at k = 4 both EOS are
    accepted draft tokens, at k = 1 one is the target's own token. Row 1 reaches
    max_new_tokens = 13, mid-block at k = 4 (12 = 2 * 5 + 2).
    """
    cfg, params = _model()
    ids, mask = fx.left_padded(_prompts())
    plain = models.generate(cfg, params, ids, mask, max_new_tokens=_MAX_NEW,
                            eos_token_id=_EOS, pad_token_id=0)
    np.testing.assert_array_equal(  # Guards the fixture: update _EOS if it moved.
        plain.lengths, [3, _MAX_NEW, 2], err_msg="fixture model changed")
    accepted = {}
    for noise in (0.0, 0.3, 1.0):
      out, _, st = spec.timed_generate(cfg, params, _noisy(params, noise, 1), ids, mask,
                                       max_new_tokens=_MAX_NEW, num_draft=k,
                                       eos_token_id=_EOS, pad_token_id=0)
      np.testing.assert_array_equal(out.tokens, plain.tokens, err_msg=f"noise {noise}")
      np.testing.assert_array_equal(out.lengths, plain.lengths, err_msg=f"noise {noise}")
      accepted[noise] = (np.asarray(st.accepted), np.asarray(st.rounds))
    acc, rounds = accepted[0.0]  # A perfect draft is always accepted.
    np.testing.assert_array_equal(acc, k * rounds)
    np.testing.assert_array_equal(rounds, -(-(np.asarray(plain.lengths) - 1) // (k + 1)))
    acc, rounds = accepted[0.3]  # Partial acceptance: both paths taken.
    self.assertTrue(0 < acc.sum() < (k * rounds).sum())

  def test_batch_rows_equal_each_alone(self):
    """Per-row acceptance: a row's output does not depend on the other rows.

    "Alone" is the row repeated to the batch size, which reuses the compiled loop.
    """
    cfg, params = _model()
    draft = _noisy(params, 0.3, 1)
    rows = _prompts()
    ids, mask = fx.left_padded(rows)
    run = functools.partial(spec.timed_generate, cfg, params, draft,
                            max_new_tokens=_MAX_NEW, num_draft=4, eos_token_id=_EOS,
                            pad_token_id=0)
    batch, _, batch_stats = run(ids, mask)
    for i, row in enumerate(rows):
      alone, _, alone_stats = run(np.repeat(row[None], len(rows), axis=0))
      np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
      self.assertEqual(int(alone_stats.accepted[0]), int(batch_stats.accepted[i]))
    self.assertGreater(len(set(np.asarray(batch_stats.accepted).tolist())), 1)

  def test_learned_positions_past_the_table_stay_finite(self):
    """OPT: drafts past max_position_embeddings must not turn the verify into NaN."""
    cfg = models.config_from_hf(dict(
        model_type="opt", vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8))
    params = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.1, x.dtype),
                                    models.decoder.abstract_params(cfg))
    cache = models.decoder.init_cache(cfg, 1, 12, jnp.float32)
    logits, _ = spec.feed_tokens(cfg, params, jnp.array([[5, 6, 7]]), jnp.array([6]),
                                 jnp.array([6]), jnp.ones((1, 12), bool), cache)
    self.assertTrue(np.isfinite(np.asarray(logits)).all())  # Positions 6, 7, 8 (> 7).

  @parameterized.parameters(0, 8, 2.0)
  def test_num_draft_out_of_range(self, k):
    cfg, params = _model()
    with self.assertRaisesRegex(ValueError, r"num_draft must be an integer in 1\.\.7"):
      spec.generate(cfg, params, params, np.ones((1, 3), np.int32), max_new_tokens=4,
                    num_draft=k)


def _chi2_pvalue(draws, probs):
  """p-value of draws ~ probs (cells of probability 0 must be empty)."""
  probs = np.asarray(probs, np.float64)
  counts = np.bincount(draws, minlength=len(probs))
  assert counts[probs == 0].sum() == 0, counts
  keep = probs > 0
  expected = len(draws) * probs[keep] / probs[keep].sum()  # float64, sums agree
  return stats.chisquare(counts[keep], expected).pvalue


class SamplingRuleTest(absltest.TestCase):

  def test_emitted_tokens_follow_the_target(self):
    """accept_sampled on fixed p, q (k = 2, V = 8): each emitted token ~ its p_j."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(8), 3)  # [k + 1, V]
    q = rng.dirichlet(np.ones(8), 2)  # [k, V]
    p[0, 7] = 0.0  # The target never emits 7 first, though the draft proposes it.
    q[0, 0] = 0.0  # ...and 0 only comes from the residual.
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    n = 100_000

    @jax.jit
    def run(key):
      k_draft, k_rule = jax.random.split(key)
      qs = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 2, 8))
      draft = jax.random.categorical(k_draft, jnp.log(qs), axis=-1).astype(jnp.int32)
      acc, tok = spec.accept_sampled(
          jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 3, 8)), qs, draft, k_rule)
      return draft, acc, tok

    draft, acc, tok = map(np.asarray, run(jax.random.key(0)))
    emitted = np.concatenate([draft, np.zeros((n, 1), np.int32)], axis=1)
    emitted[np.arange(n), acc] = tok  # Token j is emitted when acc >= j.
    self.assertGreater(_chi2_pvalue(emitted[:, 0], p[0]), 1e-3)
    self.assertGreater(_chi2_pvalue(emitted[acc >= 1, 1], p[1]), 1e-3)
    self.assertGreater(_chi2_pvalue(emitted[acc == 2, 2], p[2]), 1e-3)
    self.assertTrue(0.1 < (acc == 0).mean() < 0.9)  # Rejections and acceptances.
    # The test can fail: keeping every draft would follow q, not p.
    d = draft[:, 0][draft[:, 0] != 7]
    self.assertLess(_chi2_pvalue(d, p[0]), 1e-6)

  def test_generate_samples_the_target(self):
    """End to end: the second token (the first verified one) ~ the target's marginal."""
    cfg, params = _model(vocab_size=16, num_hidden_layers=1)
    draft = _noisy(params, 1.0, 2)
    sampling = models.SamplingConfig(temperature=0.8, top_k=8)
    prompt = np.array([5, 9, 3], np.int32)
    n = 6_000
    out, _, st = spec.timed_generate(
        cfg, params, draft, np.tile(prompt, (n, 1)), max_new_tokens=2, num_draft=2,
        sampling=sampling, rng=jax.random.key(7), eos_token_id=())
    tokens = np.asarray(out.tokens)
    # Exact marginal of token 1: sum over token 0 of p(t0) p(t1 | t0).
    ext = np.concatenate([np.tile(prompt, (16, 1)), np.arange(16)[:, None]], axis=1)
    logits = jax.jit(models.forward, static_argnums=0)(cfg, params, ext)  # [V, 4, V]
    probs = np.asarray(jax.nn.softmax(filter_logits(
        logits[:, -2:], 0.8, 1.0, top_k=8, use_top_p=False), axis=-1))
    p0, p1 = probs[0, 0], probs[:, 1]  # [V], [V, V]
    self.assertGreater(_chi2_pvalue(tokens[:, 0], p0), 1e-3)
    self.assertGreater(_chi2_pvalue(tokens[:, 1], p0 @ p1), 1e-3)
    rate = np.asarray(st.accepted).sum() / np.asarray(st.rounds).sum()
    self.assertTrue(0.1 < rate < 1.9, rate)  # The draft is often rejected.


if __name__ == "__main__":
  absltest.main()
