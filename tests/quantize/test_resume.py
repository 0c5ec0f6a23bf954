"""Kill -9 and resume: the real stories260K model, quantized in subprocesses.

The kills are deterministic (anyprec_jax/faults.py: the process SIGKILLs itself at a
named point), one per stage: during the Fisher pass, during layer quantization and
during the final write; each resume continues from what the previous run left.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from anyprec_jax import faults
from anyprec_jax import weight as wt
from anyprec_jax.quantize import sensitivity, tensor_io
from tests import shared_data
from tests import slow

SEED, PARENT = 3, 5
_SCRIPT = """
import sys
from anyprec_jax.quantize import *
quantize_model(sys.argv[1], sys.argv[2], QuantConfig(seed_bits={seed}, parent_bits={parent}),
               CalibrationConfig(dataset=sys.argv[3], num_samples=4, seq_len=64),
               RunOptions(cache_dir=sys.argv[4], progress=False))
""".format(seed=SEED, parent=PARENT)


class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.src = shared_data.stories260k_dir()
    cls.text = shared_data.shared_path("data/tinystories/tinystories_val_head.txt")
    cls.tmp = tempfile.TemporaryDirectory()
    cls.root = pathlib.Path(cls.tmp.name)
    cls.env = dict(os.environ, PYTHONPATH=str(shared_data.REPO),
                   JAX_COMPILATION_CACHE_DIR=str(cls.root / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PLATFORMS="cpu")

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _args(self, name):
    return [sys.executable, "-c", _SCRIPT, str(self.src), str(self.root / name),
            str(self.text), str(self.root / f"{name}.cache")]

  def _run(self, name):
    subprocess.run(self._args(name), env=self.env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)

  def _kill_at(self, name, point):
    env = dict(self.env, **{faults.ENV: point})
    proc = subprocess.run(self._args(name), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=600)
    self.assertEqual(proc.returncode, -signal.SIGKILL, f"not killed at {point}")

  @slow.slow("a kill in every stage and a resume, 55 s; test_cache and test_faults cover the pieces")
  def test_killed_in_each_stage_then_resumed_is_byte_identical(self):
    self._run("full")
    killed, cache = self.root / "killed", self.root / "killed.cache"
    self._kill_at("killed", "fisher")  # after the first of 5 Fisher layer files
    (fisher,) = list(cache.glob("fisher-*"))
    self.assertLen(list(fisher.glob("layer_*.safetensors")), 1)
    self.assertFalse((fisher / "complete.json").exists())
    self._kill_at("killed", "layer:2")  # Fisher again, then 2 of 5 layers
    self.assertTrue((fisher / "complete.json").exists())
    self.assertLen(list(cache.glob("anyprec-*/layer_*.safetensors")), 2)
    self._kill_at("killed", "write")  # 3 more layers, then the shard, not config.json
    self.assertLen(list(cache.glob("anyprec-*/layer_*.safetensors")), 5)
    self.assertTrue((killed / "model.safetensors").exists())
    self.assertFalse((killed / "config.json").exists())
    self._run("killed")  # resume
    full = self.root / "full"
    names = sorted(p.name for p in full.iterdir())
    self.assertEqual(names, sorted(p.name for p in killed.iterdir()))
    for n in names:
      self.assertEqual((full / n).read_bytes(), (killed / n).read_bytes(), n)
    self._check_quality(full)

  def _check_quality(self, out: pathlib.Path):
    """The parent model is nearly lossless; the seed is worse but finite."""
    cfg, params = models.load_pretrained(self.src)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(self.src)(self.text.read_text()[-20000:])["input_ids"]
    tokens = jnp.asarray(np.asarray(ids[:2 * 256]).reshape(2, 256))

    @jax.jit
    def nll(p):
      return sensitivity.causal_lm_loss(models.forward(cfg, p, tokens), tokens)

    section = json.loads((out / "config.json").read_text())["anyprec"]
    result = tensor_io.TensorIndex([out / "model.safetensors"])
    base = float(nll(params))
    losses = {}
    for b in (SEED, PARENT):
      new = {}
      for m, shape in section["quantized_modules"].items():
        w = wt.AnyPrecWeight(jnp.asarray(result.array(f"{m}.planes")),
                             {b: jnp.asarray(result.array(f"{m}.lut{b}"))},
                             in_features=shape["in_features"], bits=b)
        new[m] = wt.dequantize(w, b)
      losses[b] = float(nll(models.replace_params(params, new)))
    self.assertLess(abs(losses[PARENT] - base), 0.01 * base)
    self.assertTrue(np.isfinite(losses[SEED]))
    self.assertGreater(losses[SEED], losses[PARENT])


if __name__ == "__main__":
  absltest.main()
