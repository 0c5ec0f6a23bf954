"""Decoder structure: residual adds handed to the linears before them (issue 15)."""

from __future__ import annotations

import functools
from unittest import mock

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import models
from anyprec_jax import ops
from tests.models import hf_fixtures as fx


@functools.lru_cache(maxsize=None)
def _load(name):
  _, path = fx.hf_model(name)
  return models.load_pretrained(path)


class ResidualFusionTest(parameterized.TestCase):
  """With `ops.fuses_residual` on, each pre-norm layer hands its two residual adds (and
  the next RMSNorm's weight) to o_proj and down_proj (`ops.linear_residual`); off a
  kernel (here, the CPU) they are formed as before, so the logits must not change."""

  def _run(self, cfg, params, ids, mask, more):
    logits = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    state, cache = models.prefill(cfg, params, jnp.asarray(ids), jnp.asarray(mask),
                                  cache_len=12)
    steps = [np.asarray(state.logits)]
    for j in range(more.shape[1]):
      state, cache = models.decode_step(cfg, params, jnp.asarray(more[:, j]), state, cache)
      steps.append(np.asarray(state.logits))
    return logits, np.stack(steps, 1)

  @parameterized.parameters("llama_gqa", "llama_tied_bias", "opt_350m")
  def test_fused_structure_keeps_the_logits(self, name):
    cfg, params = _load(name)
    ids, mask = fx.left_padded([fx.random_ids(3, 5), fx.random_ids(4, 3)])
    more = fx.random_ids(5, (2, 3))
    want = self._run(cfg, params, ids, mask, more)
    calls = []
    real = ops.linear_residual

    def spy(x, w, residual, norm=None, bias=None):
      calls.append(norm is not None)
      return real(x, w, residual, norm, bias)

    with mock.patch.object(ops, "folds_norms", return_value=True), \
        mock.patch.object(ops, "fuses_residual", return_value=True), \
        mock.patch.object(ops, "linear_residual", side_effect=spy):
      got = self._run(cfg, params, ids, mask, more)
    if name == "opt_350m":  # post-norm (LayerNorm): never fused
      self.assertEqual(calls, [])
    else:  # per call of the decoder: o_proj and down_proj of every layer; each but the
      # last down_proj forms the next RMSNorm's x * w
      per_call = 2 * cfg.num_layers
      self.assertEqual(len(calls) % per_call, 0)
      self.assertEqual(calls[:per_call], [True] * (per_call - 1) + [False])
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


  def test_gated_mlp_handed_to_the_fused_linear_keeps_the_logits(self):
    cfg, params = _load("llama_gqa")
    from models import params as params_lib
    fused = params_lib.fuse_projections(params, lambda ws: jnp.concatenate(ws, 0), mlp=True)
    ids, mask = fx.left_padded([fx.random_ids(6, 5), fx.random_ids(7, 4)])
    more = fx.random_ids(8, (2, 2))
    want = self._run(cfg, fused, ids, mask, more)
    calls = []
    real = ops.linear_glu

    def spy(x, w, act, bias=None):
      calls.append(w.shape)
      return real(x, w, act, bias)

    with mock.patch.object(ops, "fuses_glu", return_value=True), \
        mock.patch.object(ops, "linear_glu", side_effect=spy):
      got = self._run(cfg, fused, ids, mask, more)
    self.assertEqual(calls[:cfg.num_layers],
                     [(2 * cfg.intermediate_size, cfg.hidden_size)] * cfg.num_layers)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)

if __name__ == "__main__":
  absltest.main()
