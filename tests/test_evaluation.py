"""Perplexity evaluation: text loading, chunking, NLL, and the reference numbers."""

from __future__ import annotations

import json
import math
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import models
from anyprec_jax import evaluation as ev
from tests import shared_data


class TextLoadingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())

  def test_wikitext_crlf_normalised(self):
    (self.dir / "wikitext2").mkdir()
    (self.dir / "wikitext2" / "wiki.test.raw").write_bytes(b" = A = \r\n\r\n b c\r\n")
    t = ev.load_eval_text("wikitext2", self.dir)
    self.assertEqual(t.text, " = A = \n\n b c\n")
    self.assertEqual(t.name, "wikitext2")

  def test_ptb_gptq_join(self):
    (self.dir / "ptb.valid.txt").write_text(" a b \n c d \n")
    t = ev.load_eval_text("PTB", self.dir)
    self.assertEqual(t.text, "a b\n\nc d\n\n")

  def test_c4_jsonl_documents_joined(self):
    rows = [{"text": "first doc"}, {"text": "second\ndoc"}]
    (self.dir / "c4.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    self.assertEqual(ev.load_eval_text("c4", self.dir).text, "first doc second\ndoc")

  def test_generic_file_and_errors(self):
    path = self.dir / "mine.jsonl"
    path.write_text('{"text": "x"}\n{"text": "y"}\n')
    self.assertEqual(ev.load_eval_text(str(path)).text, "x\n\ny")
    with self.assertRaisesRegex(FileNotFoundError, "no ptb file"):
      ev.load_eval_text("ptb", self.dir)
    with self.assertRaisesRegex(ValueError, "unknown dataset"):
      ev.load_eval_text("nope", self.dir)


class ChunkAndNllTest(absltest.TestCase):

  def test_make_chunks(self):
    ids = np.arange(23)
    c = ev.make_chunks(ids, 5)
    np.testing.assert_array_equal(c, np.arange(20).reshape(4, 5))
    self.assertEqual(ev.make_chunks(ids, 5, max_chunks=2).shape, (2, 5))
    with self.assertRaises(ValueError):
      ev.make_chunks(ids, 50)

  def test_token_nll_matches_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6))
    got = np.asarray(ev.token_nll(jnp.asarray(logits), jnp.asarray(ids)))
    want = np.zeros(2)
    for b in range(2):
      for t in range(5):
        z = logits[b, t].astype(np.float64)
        want[b] += math.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[b, t + 1]]
    np.testing.assert_allclose(got, want / 5, rtol=1e-5)

  def test_perplexity_is_exp_mean_chunk_nll(self):
    calls = []

    def nll_fn(x):  # [B, T] -> [B]: a fake loss depending on the chunk.
      calls.append(x.shape)
      return x[:, 0].astype(jnp.float32) / 10.0

    res = ev.perplexity(nll_fn, np.arange(40), seq_len=8, max_chunks=3, batch_size=2)
    self.assertEqual(calls, [(2, 8), (1, 8)])
    np.testing.assert_allclose(res.chunk_nll, [0.0, 0.8, 1.6], rtol=1e-6)
    self.assertAlmostEqual(res.ppl, math.exp(0.8), places=5)
    self.assertEqual(res.total_tokens, 40)


class PairedDifferenceTest(absltest.TestCase):

  def test_mean_and_standard_error_of_the_chunk_differences(self):
    ref = [3.0, 3.5, 2.5, 4.0]
    nll = [3.1, 3.55, 2.58, 4.11]  # d = 0.1, 0.05, 0.08, 0.11
    p = ev.paired_difference(nll, ref)
    d = np.array([0.1, 0.05, 0.08, 0.11])
    self.assertAlmostEqual(p.mean, d.mean(), places=12)
    self.assertAlmostEqual(p.stderr, d.std(ddof=1) / 2, places=12)
    self.assertEqual(p.n, 4)
    # exp(mean difference) is the ratio of the two perplexities.
    self.assertAlmostEqual(p.ppl_ratio, math.exp(np.mean(nll)) / math.exp(np.mean(ref)))
    with self.assertRaises(ValueError):
      ev.paired_difference(nll[:3], ref)


class ReferenceNumbersTest(parameterized.TestCase):
  """First 4 chunks of 512 tokens vs transformers (../shared/README.md)."""

  @parameterized.named_parameters(
      ("stories260k", "stories260k", "tinystories", [1.3112, 1.4460, 1.2906, 1.3522]),
      ("smollm2", "smollm2", "wikitext2", [3.0112, 3.5795, 3.5162, 3.5280]),
  )
  def test_chunk_nll(self, model, dataset, want):
    model_dir = (shared_data.stories260k_dir() if model == "stories260k"
                 else shared_data.smollm2_dir())
    data_dir = shared_data.shared_path("data")
    cfg, params = models.load_pretrained(model_dir)
    ids = ev.tokenize(ev.load_tokenizer(model_dir), ev.load_eval_text(dataset, data_dir).text)
    res = ev.perplexity(ev.dense_nll_fn(cfg, params), ids, seq_len=512, max_chunks=4,
                        batch_size=2)
    np.testing.assert_allclose(res.chunk_nll, want, atol=6e-4)
    self.assertAlmostEqual(res.ppl, math.exp(np.mean(want)), delta=0.02 * res.ppl)


if __name__ == "__main__":
  absltest.main()
