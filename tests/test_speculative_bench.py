"""Speculative measurements: prompt cutting, acceptance accounting, the round model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from anyprec_jax import speculative_bench
from models.speculative import SpeculativeStats


class _StubModel:
  """Canned outputs: row 1 differs from plain decoding; 2 + 3 rounds, 7 accepted."""

  plain = np.array([[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])

  def generate(self, ids, precision, mask, **kwargs):
    return models.GenerationResult(tokens=self.plain, lengths=np.array([6, 6]))

  def timed_speculative_generate(self, ids, precision, mask, *, draft_precision,
                                 num_draft, **kwargs):
    tokens = self.plain.copy()
    tokens[1, 3] = 0
    return (models.GenerationResult(tokens=tokens, lengths=np.array([6, 6])), None,
            SpeculativeStats(rounds=np.array([2, 3]), accepted=np.array([4, 3])))


class SpeculativeBenchTest(absltest.TestCase):

  def test_text_prompts_spread_and_left_padded(self):
    ids, mask = speculative_bench.text_prompts(np.arange(100), num_prompts=3,
                                               prompt_len=10, lengths=[10, 4])
    np.testing.assert_array_equal(ids[0], np.arange(10))
    np.testing.assert_array_equal(ids[1], [0] * 6 + [40, 41, 42, 43])  # chunk 4 of 0..9
    np.testing.assert_array_equal(ids[2], np.arange(90, 100))
    np.testing.assert_array_equal(mask.sum(1), [10, 4, 10])
    with self.assertRaisesRegex(ValueError, "fewer than 20"):
      speculative_bench.text_prompts(np.arange(100), num_prompts=20, prompt_len=10)

  def test_acceptance_accounting(self):
    rows = speculative_bench.acceptance_rows(
        _StubModel(), np.zeros((2, 4)), np.ones((2, 4)), target=8, drafts=[3],
        num_drafts=[4], new_tokens=6, log=lambda s: None)
    (row,) = rows
    self.assertEqual(row["rounds"], 5)
    self.assertAlmostEqual(row["accepted_per_round"], 7 / 5)
    self.assertAlmostEqual(row["tokens_per_round"], 10 / 5)  # 2 x 5 after the first.
    self.assertEqual(row["identical_rows"], 1)
    self.assertIn("| 8 | 3 | 4 | 1.40 | 2.00 | 5 | 1/2 |",
                  speculative_bench.acceptance_table(rows))

  def test_round_model(self):
    costs = {"plain": 2.0, "verify": {4: 3.0}, "draft": {3: {1: 0.5, 2: 0.75}}}
    self.assertAlmostEqual(speculative_bench.round_ms(costs, 3, 4), 0.75 + 3 * 0.5 + 3.0)
    table = speculative_bench.projection_table(costs, drafts=[3], num_drafts=[4],
                                               tokens_per_round={(3, 4): 3.3})
    self.assertIn("| 3 | 4 | 5.250 | 2.62 | 3.30 | 1.26x |", table)

  def test_forward_ms_runs(self):
    cfg = models.config_from_hf(dict(
        model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, rms_norm_eps=1e-5, eos_token_id=2))
    params = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.1, x.dtype),
                                    models.decoder.abstract_params(cfg))
    ms = speculative_bench.forward_ms(cfg, params, width=2, batch=1, context=8,
                                      repeats=2, timed_runs=1, dtype=jnp.float32)
    self.assertGreater(ms, 0)


if __name__ == "__main__":
  absltest.main()
