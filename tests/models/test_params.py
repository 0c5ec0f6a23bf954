"""Params access by HF module name and AnyPrecWeight substitution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import anyprec_jax
import models
from tests.models import hf_fixtures as fx

_forward = jax.jit(models.forward, static_argnums=0)


def _random_anyprec(shape, seed, bits=4, parent=8, seed_bits=3):
  """An AnyPrecWeight for a dense [N, K] weight with random codes and LUTs."""
  rs = np.random.RandomState(seed)
  n, k = shape
  codes = rs.randint(0, 2 ** parent, size=(n, k)).astype(np.uint8)
  luts = {b: (0.1 * rs.randn(n, 2 ** b)).astype(np.float32)
          for b in range(seed_bits, parent + 1)}
  return anyprec_jax.from_codes(codes, luts, parent, bits=bits)


class ParamsTest(parameterized.TestCase):

  @parameterized.parameters(*fx.NAMES)
  def test_linear_names_match_hf_modules(self, name):
    """Every name is an nn.Linear of the HF model with the weight get_param returns."""
    model, path = fx.hf_model(name)
    cfg, params = models.load_pretrained(path)
    names = models.linear_names(cfg)
    per_layer = 7 if cfg.gated_mlp else 6
    self.assertLen(names, per_layer * cfg.num_layers)
    self.assertLen(set(names), len(names))
    hf_modules = dict(model.named_modules())
    for n in names:
      np.testing.assert_array_equal(models.get_param(params, n),
                                    hf_modules[n].weight.detach().numpy(), err_msg=n)

  def test_get_param_unknown_name(self):
    _, params = models.load_pretrained(fx.hf_model("llama_gqa")[1])
    with self.assertRaisesRegex(KeyError, "lm_head2"):
      models.get_param(params, "lm_head2")
    with self.assertRaises(KeyError):
      models.get_param(params, "model.layers.9.mlp.up_proj")

  def test_replace_params_is_pure(self):
    cfg, params = models.load_pretrained(fx.hf_model("opt_350m")[1])
    name = "model.decoder.layers.1.fc2"
    old = models.get_param(params, name)
    new = models.replace_params(params, {name: jnp.zeros_like(old)})
    self.assertIs(models.get_param(params, name), old)
    self.assertEqual(float(jnp.abs(models.get_param(new, name)).max()), 0.0)
    # Untouched leaves are shared, not copied.
    other = "model.decoder.layers.0.fc1"
    self.assertIs(models.get_param(new, other), models.get_param(params, other))


class AnyPrecSubstitutionTest(parameterized.TestCase):

  @parameterized.parameters(("llama_gqa", "model.layers.1.self_attn.k_proj"),
                            ("opt_350m", "model.decoder.layers.0.fc1"))
  def test_forward_equals_dequantized_dense(self, name, module):
    cfg, params = models.load_pretrained(fx.hf_model(name)[1])
    dense_shape = models.get_param(params, module).shape
    w = _random_anyprec(dense_shape, seed=0)
    self.assertEqual(w.shape, dense_shape)
    ids = jnp.asarray(fx.random_ids(20, (2, 9)))
    for bits in (3, 4, 8):
      wb = w.with_bits(bits)
      quant = _forward(cfg, models.replace_params(params, {module: wb}), ids)
      dense = _forward(cfg, models.replace_params(
          params, {module: anyprec_jax.dequantize(wb)}), ids)
      np.testing.assert_allclose(quant, dense, atol=1e-5, rtol=1e-5)
    base = _forward(cfg, params, ids)
    self.assertGreater(float(jnp.abs(quant - base).max()), 1e-3)  # It was used.

  def test_generate_with_anyprec_weight(self):
    cfg, params = models.load_pretrained(fx.hf_model("llama_gqa")[1])
    module = "model.layers.0.mlp.down_proj"
    w = _random_anyprec(models.get_param(params, module).shape, seed=1, bits=5)
    ids = fx.random_ids(21, (1, 6))
    quant = models.generate(cfg, models.replace_params(params, {module: w}), ids,
                            max_new_tokens=6, eos_token_id=())
    dense = models.generate(cfg, models.replace_params(
        params, {module: anyprec_jax.dequantize(w)}), ids, max_new_tokens=6,
                            eos_token_id=())
    np.testing.assert_array_equal(quant.tokens, dense.tokens)


if __name__ == "__main__":
  absltest.main()
