"""HF loading: logits parity with transformers, sharding, dtypes, clear errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from safetensors.numpy import load_file, save_file

import models
from models import decoder, hf_loader
from tests.models import hf_fixtures as fx

_forward = jax.jit(models.forward, static_argnums=0)


def _copy_with_tensors(src: pathlib.Path, edit) -> pathlib.Path:
  """Copies an HF dir, applying `edit(dict of numpy tensors)` to its weights."""
  dst = pathlib.Path(tempfile.mkdtemp(prefix="edit_", dir=fx.TMP_DIR))
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"))
  return dst


class ParityTest(parameterized.TestCase):

  @parameterized.parameters(*fx.NAMES)
  def test_logits_match_transformers(self, name):
    model, path = fx.hf_model(name)
    cfg, params = models.load_pretrained(path)
    ids = fx.random_ids(0, (2, 11))
    mask = np.ones((2, 11), np.int32)
    mask[1, :4] = 0  # Left padding in row 1.
    ours = np.asarray(_forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = fx.hf_logits(model, ids, mask)
    real = mask.astype(bool)
    self.assertGreater(np.abs(ref[real]).max(), 0.5)  # Not a degenerate model.
    np.testing.assert_allclose(ours[real], ref[real], atol=5e-5, rtol=1e-4)

  def test_window_matters(self):
    """The Mistral case would fail without the window: the test has teeth."""
    _, path = fx.hf_model("mistral_window")
    cfg, params = models.load_pretrained(path)
    self.assertEqual(cfg.sliding_window, 4)
    ids = jnp.asarray(fx.random_ids(1, (1, 11)))
    no_window = dataclasses.replace(cfg, sliding_window=None)
    diff = np.abs(_forward(cfg, params, ids) - _forward(no_window, params, ids))
    self.assertLess(diff[0, :4].max(), 1e-6)  # Window not reached yet.
    self.assertGreater(diff[0, 4:].max(), 1e-3)

  def test_sharded_checkpoint(self):
    model, path = fx.hf_model("llama_gqa", max_shard_size="40KB")
    index = json.loads((path / hf_loader.INDEX_FILE).read_text())
    self.assertGreater(len(set(index["weight_map"].values())), 2)
    self.assertFalse((path / hf_loader.SINGLE_FILE).exists())
    cfg, params = models.load_pretrained(path)
    ids = fx.random_ids(2, (1, 7))
    np.testing.assert_allclose(_forward(cfg, params, jnp.asarray(ids)),
                               fx.hf_logits(model, ids), atol=5e-5, rtol=1e-4)

  @parameterized.parameters((jnp.bfloat16, 0.1), (jnp.float16, 0.02))
  def test_dtype(self, dtype, tol):
    model, path = fx.hf_model("llama_gqa")
    cfg, params = models.load_pretrained(path, dtype=dtype)
    self.assertEqual({x.dtype for x in jax.tree_util.tree_leaves(params)},
                     {jnp.dtype(dtype)})
    ids = fx.random_ids(3, (1, 7))
    ours = _forward(cfg, params, jnp.asarray(ids))
    self.assertEqual(ours.dtype, jnp.float32)
    np.testing.assert_allclose(ours, fx.hf_logits(model, ids), atol=tol, rtol=tol)

  @parameterized.parameters(*fx.NAMES)
  def test_table_matches_decoder(self, name):
    """Every path the table fills is a parameter of the Flax decoder, and vice versa."""
    cfg, params = models.load_pretrained(fx.hf_model(name)[1])
    abstract = decoder.abstract_params(cfg)
    self.assertEqual(hf_loader.param_shapes(params), hf_loader.param_shapes(abstract))


class ErrorTest(absltest.TestCase):

  def test_missing_key(self):
    path = _copy_with_tensors(fx.hf_model("llama_gqa")[1], lambda t: t.pop(
        "model.layers.1.mlp.up_proj.weight"))
    with self.assertRaisesRegex(models.CheckpointError,
                                r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
      models.load_pretrained(path)

  def test_wrong_shape(self):
    def edit(t):
      t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    path = _copy_with_tensors(fx.hf_model("llama_gqa")[1], edit)
    with self.assertRaisesRegex(models.CheckpointError,
                                r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(5, 64\)"
                                r".*\(32, 64\)"):
      models.load_pretrained(path)

  def test_unexpected_key(self):
    def edit(t):
      t["model.layers.7.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"]
      t["model.extra.weight"] = np.zeros(3, np.float32)
    path = _copy_with_tensors(fx.hf_model("llama_gqa")[1], edit)
    with self.assertRaisesRegex(models.CheckpointError,
                                r"unexpected.*model\.extra\.weight.*model\.layers\.7"):
      models.load_pretrained(path)

  def test_ignored_buffers_and_tied_head(self):
    """rotary inv_freq buffers and a duplicated tied lm_head are legitimately skipped."""
    def edit(t):
      t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
      t["lm_head.weight"] = t["model.embed_tokens.weight"]
    path = _copy_with_tensors(fx.hf_model("llama_tied_bias")[1], edit)
    _, params = models.load_pretrained(path)
    self.assertNotIn("lm_head", params)

  def test_opt_bare_decoder_prefix(self):
    """Old OPT checkpoints name tensors `decoder.*` (no `model.`)."""
    model, src = fx.hf_model("opt_125m")
    def edit(t):
      for k in list(t):
        t[k.removeprefix("model.")] = t.pop(k)
    cfg, params = models.load_pretrained(_copy_with_tensors(src, edit))
    ids = fx.random_ids(4, (1, 6))
    np.testing.assert_allclose(_forward(cfg, params, jnp.asarray(ids)),
                               fx.hf_logits(model, ids), atol=5e-5, rtol=1e-4)

  def test_unknown_architecture(self):
    with self.assertRaisesRegex(ValueError, r"'gpt2'.*llama, mistral, opt"):
      models.config_from_hf({"model_type": "gpt2"})
    path = pathlib.Path(tempfile.mkdtemp(dir=fx.TMP_DIR))
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with self.assertRaisesRegex(ValueError, r"'bert'.*supported"):
      models.load_pretrained(path)

  def test_unsupported_rope(self):
    d = json.loads((fx.hf_model("llama_gqa")[1] / "config.json").read_text())
    d.pop("rope_parameters", None)
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with self.assertRaisesRegex(NotImplementedError, "yarn"):
      models.config_from_hf(d)

  def test_not_local_not_on_hub(self):
    with self.assertRaisesRegex(FileNotFoundError, "not a local directory"):
      models.load_pretrained("/nonexistent/anyprec-test-dir")

  def test_anyprec_checkpoint_refused_baseline_loaded(self):
    src = fx.hf_model("llama_gqa")[1]
    for method, ok in (("anyprec", False), ("rtn", True), ("independent", True)):
      path = _copy_with_tensors(src, lambda t: None)
      d = json.loads((path / "config.json").read_text())
      d["anyprec"] = {"format_version": 1, "method": method, "bits": 4}
      (path / "config.json").write_text(json.dumps(d))
      if ok:
        models.load_pretrained(path)
      else:
        with self.assertRaisesRegex(models.CheckpointError, "from_quantized"):
          models.load_pretrained(path)


class ConfigTest(absltest.TestCase):

  def test_legacy_rope_keys(self):
    """transformers v4 configs: rope_theta + rope_scaling at top level."""
    cfg = models.config_from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_theta": 500000.0, "eos_token_id": [5, 7],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}})
    self.assertEqual(cfg.rope_theta, 500000.0)
    self.assertEqual(cfg.rope_scaling.rope_type, models.RopeType.LLAMA3)
    self.assertEqual((cfg.num_kv_heads, cfg.head_dim, cfg.eos_token_ids), (2, 4, (5, 7)))

  def test_opt_350m_fields(self):
    cfg = models.load_pretrained(fx.hf_model("opt_350m")[1])[0]
    self.assertEqual((cfg.arch, cfg.embed_dim, cfg.hidden_size), (models.Arch.OPT, 32, 64))
    self.assertTrue(cfg.has_projection)
    self.assertFalse(cfg.pre_norm or cfg.final_norm)
    self.assertEqual(cfg.position_offset, 2)


if __name__ == "__main__":
  absltest.main()
