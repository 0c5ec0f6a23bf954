"""Tests of the Fisher pass (anyprec_jax/quantize/sensitivity.py) against PyTorch."""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from anyprec_jax.quantize import sensitivity
from tests.quantize import fixtures


class FisherTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.dir = fixtures.tiny_llama(pathlib.Path(cls.tmp.name) / "m", dtype="float32")
    cls.cfg, cls.params = models.load_pretrained(cls.dir)
    rng = np.random.default_rng(0)
    cls.tokens = rng.integers(0, fixtures.VOCAB, (3, 24)).astype(np.int32)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_sum_of_squared_per_sample_gradients_matches_torch(self):
    import torch
    from transformers import AutoModelForCausalLM
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: compare fp32 math
      fisher = sensitivity.fisher_information(self.cfg, self.params, self.tokens)
    names = models.linear_names(self.cfg)
    self.assertEqual(sorted(fisher), sorted(names))
    model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32)
    ref = {}
    for sample in self.tokens:
      model.zero_grad()
      ids = torch.tensor(sample[None], dtype=torch.long)
      model(input_ids=ids, labels=ids).loss.backward()
      for name, p in model.named_parameters():
        module = name[:-len(".weight")]
        if module in fisher:
          ref[module] = ref.get(module, 0.0) + p.grad.double().numpy() ** 2
    for name in names:
      got = np.asarray(fisher[name])
      self.assertEqual(got.dtype, np.float32)
      np.testing.assert_allclose(got, ref[name], rtol=2e-3, atol=1e-6 * ref[name].max())

  def test_block_size_does_not_change_the_result(self):
    one = sensitivity.fisher_information(self.cfg, self.params, self.tokens, block_size=1)
    two = sensitivity.fisher_information(self.cfg, self.params, self.tokens, block_size=2)
    for name in one:
      if jax.default_backend() == "cpu":  # same per-sample order of additions: bit-exact
        np.testing.assert_array_equal(np.asarray(one[name]), np.asarray(two[name]))
      else:  # two compiled programs; accelerators may round differently
        np.testing.assert_allclose(np.asarray(one[name]), np.asarray(two[name]), rtol=1e-5)

  def test_loss_matches_torch_definition(self):
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 7)), jnp.float32)
    tokens = jnp.asarray([[1, 3, 0, 6, 2]])
    import torch
    ref = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits[0, :-1])),
                                            torch.tensor([3, 0, 6, 2]))
    self.assertAlmostEqual(float(sensitivity.causal_lm_loss(logits, tokens)), float(ref),
                           places=5)

  def test_nan_weight_gives_an_error_naming_a_layer(self):
    name = "model.layers.1.mlp.up_proj"
    w = np.array(models.get_param(self.params, name))
    w[0, 0] = np.nan
    params = models.replace_params(self.params, {name: jnp.asarray(w)})
    pattern = r"non-finite .*weights in model\.layers\.1\.mlp\.up_proj"
    with self.assertRaisesRegex(ValueError, pattern):
      sensitivity.fisher_information(self.cfg, params, self.tokens[:1])


if __name__ == "__main__":
  absltest.main()
