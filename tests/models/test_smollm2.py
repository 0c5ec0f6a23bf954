"""Real model: SmolLM2-135M-Instruct (from ../shared) says " Paris".

Skips cleanly when ../shared (or the gguf package) is missing.
"""

from __future__ import annotations

import numpy as np
from absl.testing import absltest

import models
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


if __name__ == "__main__":
  absltest.main()
