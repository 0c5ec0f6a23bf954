"""Params access by HF module name and AnyPrecWeight substitution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import anyprec_jax
import models
from tests.models import hf_fixtures as fx
from tests import slow

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


class FuseProjectionsTest(parameterized.TestCase):
  """q/k/v and gate/up stored as one weight: the same model, fewer launches."""

  def _quantized(self, name, bits=4):
    cfg, params = models.load_pretrained(fx.hf_model(name)[1])
    new = {m: _random_anyprec(models.get_param(params, m).shape, seed=i, bits=bits)
           for i, m in enumerate(models.linear_names(cfg))}
    return cfg, models.replace_params(params, new)

  @parameterized.parameters(("llama_gqa", "format"), ("llama_gqa", "tc_tiled"),
                            ("opt_125m", "tc"))
  def test_fused_forward_equals_separate(self, name, layout):
    """GQA widths, OPT's q/k/v biases and ungated MLP, every plane layout."""
    cfg, params = self._quantized(name)
    params = anyprec_jax.runtime.with_plane_layout(params, layout)
    fused = anyprec_jax.runtime.fuse_projections(params, mlp=True)
    layer = fused["layers_0"]
    self.assertEqual(sorted(layer["attn"]), ["o_proj", "qkv_proj"])
    want_mlp = ["down_proj", "gate_up_proj"] if cfg.gated_mlp else ["down_proj", "up_proj"]
    self.assertEqual(sorted(layer["mlp"]), want_mlp)
    if cfg.attention_bias:
      self.assertEqual(layer["attn"]["qkv_proj"]["bias"].shape,
                       (cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim,))
    ids = jnp.asarray(fx.random_ids(22, (2, 7)))
    np.testing.assert_allclose(_forward(cfg, fused, ids), _forward(cfg, params, ids),
                               atol=2e-5, rtol=2e-5)
    default = anyprec_jax.runtime.fuse_projections(params)["layers_0"]  # as loading does
    self.assertIn("qkv_proj", default["attn"])
    self.assertEqual("gate_up_proj" in default["mlp"], cfg.gated_mlp)
    attn_only = anyprec_jax.runtime.fuse_projections(params, mlp=False)["layers_0"]
    self.assertIn("qkv_proj", attn_only["attn"])
    self.assertNotIn("gate_up_proj", attn_only["mlp"])

  @slow.slow("interpreted Pallas kernels; native on a GPU with the flag")
  def test_kernels_run_fused_weights(self):
    """The Pallas kernels (interpreted here, native on a GPU) on a fused weight with
    float32 LUTs (4-bit byte tables take them as float16) equal the parts."""
    parts = [_random_anyprec((n, 40), seed=n) for n in (32, 16, 16)]
    fused = anyprec_jax.weight.concat_rows(parts)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 40), jnp.float32)
    backend = (anyprec_jax.ops.Backend.PALLAS if jax.default_backend() == "gpu"
               else anyprec_jax.ops.Backend.INTERPRET)
    with anyprec_jax.ops.use_backend(backend):
      got = anyprec_jax.ops.linear(x, fused)
      want = jnp.concatenate([anyprec_jax.ops.linear(x, w) for w in parts], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    ref = x @ anyprec_jax.dequantize(fused).T  # float32 LUTs: within f16 rounding
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=2e-2)

  def test_mismatched_parts_stay_separate(self):
    """Different active precisions cannot share one launch; dense weights are left
    alone by `weight.concat_rows`."""
    cfg, params = self._quantized("llama_gqa")
    k_name = "model.layers.0.self_attn.k_proj"
    params = models.replace_params(
        params, {k_name: models.get_param(params, k_name).with_bits(5)})
    fused = anyprec_jax.runtime.fuse_projections(params)
    self.assertIn("q_proj", fused["layers_0"]["attn"])
    self.assertIn("qkv_proj", fused["layers_1"]["attn"])
    dense_cfg, dense = models.load_pretrained(fx.hf_model("llama_gqa")[1])
    del dense_cfg
    self.assertEqual(jax.tree_util.tree_structure(
        anyprec_jax.runtime.fuse_projections(dense)), jax.tree_util.tree_structure(dense))


if __name__ == "__main__":
  absltest.main()
