"""Real model: SmolLM2-135M-Instruct (from ../shared) says " Paris"; speculative decoding
with a low-bit draft of it gives the same tokens.

Skips cleanly when ../shared (or the gguf package) is missing.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from models import speculative
from tests import shared_data

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # No BOS.


class SmolLM2Test(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_dir = shared_data.smollm2_dir()
    cls.cfg, cls.params = models.load_pretrained(cls.model_dir)

  def test_greedy_says_paris_like_transformers(self):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(self.model_dir)
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    self.assertEqual(ids, PROMPT_IDS)
    out = models.generate(self.cfg, self.params, np.asarray([ids]), max_new_tokens=12)
    tokens = np.asarray(out.tokens[0, :int(out.lengths[0])])
    text = tok.decode(tokens)
    self.assertTrue(text.startswith(" Paris"), text)

    hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                       dtype=torch.long),
                        max_new_tokens=12, do_sample=False)[0, len(ids):].numpy()
    np.testing.assert_array_equal(tokens, ref)

  def test_speculative_greedy_equals_plain(self):
    """A 4-bit round-to-nearest copy drafts for the model: its greedy output exactly.

    num_draft=1 keeps the compile short (the 30-layer loop compiles in ~5 s); larger k
    run on the tiny models of tests/models/test_speculative.py.
    """
    def rtn4(w):  # [N, K] per-row round to nearest, 16 levels.
      w = np.asarray(w)
      lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
      step = np.maximum(hi - lo, 1e-12) / 15
      return jnp.asarray(lo + np.round((w - lo) / step) * step, w.dtype)

    draft = models.replace_params(self.params, {
        name: rtn4(models.get_param(self.params, name))
        for name in models.linear_names(self.cfg)})
    ids = np.asarray([PROMPT_IDS])
    plain = models.generate(self.cfg, self.params, ids, max_new_tokens=12)
    out, _, stats = speculative.timed_generate(self.cfg, self.params, draft, ids,
                                               max_new_tokens=12, num_draft=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(plain.lengths))
    self.assertGreater(int(stats.accepted[0]), 0)


if __name__ == "__main__":
  absltest.main()
