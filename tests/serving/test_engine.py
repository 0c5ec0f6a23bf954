"""Engine.run_batch: batched rows equal solo generation; per-row limits, seeds, liveness;
dense directories as one precision."""

import shutil

import numpy as np
from absl.testing import absltest

import models
from anyprec_jax import errors
from anyprec_jax.serving.engine import Engine, RowSpec, batch_bucket
from tests import synthetic_checkpoint as synth
from tests.serving import fixtures

PROMPTS = ((1, 5, 6, 7, 8), (1, 9), (1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29))


def run(engine, precision, rows, live=None, max_batch=4, chunk=8):
  """[steps, rows] tokens of one batch (-1 where a row is finished)."""
  return np.array(list(engine.run_batch(precision, rows, max_batch, live, chunk)))


class EngineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.engine = fixtures.engine()

  def test_loaded_precisions(self):
    self.assertEqual(self.engine.precisions, fixtures.PRECISIONS)
    self.assertEqual(self.engine.default_precision, 8)
    self.assertTrue(self.engine.quantized)

  def test_greedy_batch_equals_solo_generate(self):
    """Left padding, per-row max_tokens: each row is what models.generate gives alone."""
    rows = [RowSpec(p, n) for p, n in zip(PROMPTS, (6, 3, 9))]
    out = run(self.engine, 4, rows)
    self.assertEqual(out.shape, (9, 3))
    np.testing.assert_array_equal(run(self.engine, 4, rows, chunk=2), out)  # 5 calls.
    for r, row in enumerate(rows):
      ref = models.generate(self.engine.cfg, self.engine.params_at(4),
                            np.asarray([row.prompt]), max_new_tokens=row.max_tokens,
                            eos_token_id=())
      got = out[:, r]
      np.testing.assert_array_equal(got[:row.max_tokens], np.asarray(ref.tokens)[0])
      self.assertTrue((got[row.max_tokens:] == -1).all())

  def test_eos_ends_a_row(self):
    free = run(self.engine, 4, [RowSpec(PROMPTS[0], 8)])[:, 0]
    stop = run(self.engine, 4, [RowSpec(PROMPTS[0], 8, eos=(int(free[2]),))])[:, 0]
    first = list(free).index(free[2])
    np.testing.assert_array_equal(stop, free[:first + 1])  # EOS emitted, then nothing.

  def test_sampling_follows_the_row_seed(self):
    """Each row draws from its own key: equal rows with one seed agree, another
    seed differs (a key shared by the batch would make equal rows differ)."""
    row = RowSpec(PROMPTS[0], 8, temperature=1.0, top_p=0.9, seed=7)
    out = run(self.engine, 4, [row, RowSpec(PROMPTS[1], 8), row,
                               RowSpec(PROMPTS[0], 8, temperature=1.0, top_p=0.9,
                                       seed=8)])
    np.testing.assert_array_equal(out[:, 0], out[:, 2])
    self.assertFalse((out[:, 3] == out[:, 0]).all())
    greedy = run(self.engine, 4, [RowSpec(PROMPTS[1], 8)] * 3)[:, 0]
    np.testing.assert_array_equal(out[:, 1], greedy)  # Greedy rows stay greedy.

  def test_rows_not_live_stop(self):
    steps = []

    def live():
      steps.append(1)
      return [len(steps) <= 2, True, True]

    rows = [RowSpec(PROMPTS[0], 8), RowSpec(PROMPTS[1], 5), RowSpec(PROMPTS[2], 3)]
    out = run(self.engine, 4, rows, live)
    self.assertEqual(out.shape, (5, 3))
    self.assertTrue((out[:2, 0] >= 0).all() and (out[2:, 0] == -1).all())
    self.assertTrue((out[:, 1] >= 0).all())
    steps.clear()

    def live_once():
      steps.append(1)
      return [len(steps) == 1] * 3

    self.assertEqual(len(run(self.engine, 4, rows, live_once)), 1)  # None live: ends.

  def test_bad_chunk(self):
    for chunk in (0, 3, 32):
      with self.assertRaises(ValueError):
        run(self.engine, 4, [RowSpec(PROMPTS[0], 2)], chunk=chunk)

  def test_batch_bucket(self):
    self.assertEqual([batch_bucket(n, 8) for n in (1, 2, 3, 5, 8, 20)],
                     [1, 2, 4, 8, 8, 8])
    self.assertEqual(batch_bucket(5, 6), 6)


class DenseEngineTest(absltest.TestCase):

  def test_dense_directory_is_one_precision(self):
    src, quant, dense = synth.write(seed=1)
    ref = synth.dense_reference_dir(quant, dense, 4)
    shutil.rmtree(src)
    try:
      fixtures.write_tokenizer(ref, synth.TINY_CONFIG["vocab_size"])
      engine = Engine.load(ref)
      self.assertEqual(engine.precisions, (32,))
      self.assertFalse(engine.quantized)
      self.assertEqual(run(engine, 32, [RowSpec(PROMPTS[0], 2)]).shape, (2, 1))
      with self.assertRaises(errors.UsageError):
        Engine.load(ref, precisions=[4])
    finally:
      shutil.rmtree(ref, ignore_errors=True)


if __name__ == "__main__":
  absltest.main()
