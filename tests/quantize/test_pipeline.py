"""End-to-end tests of the quantization pipeline on a tiny random bf16 Llama."""

import json
import pathlib
import shutil
import tempfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest
from safetensors import safe_open

import models
from anyprec_jax import format as fmt
from anyprec_jax import weight as wt
from anyprec_jax.quantize import (CalibrationConfig, LutDtype, Method, QuantConfig,
                                  RunOptions, pipeline, quantize_model, tensor_io)
from tests.quantize import fixtures, reference as ref
from tests.quantize.test_baselines import rtn_reference
from tests import slow

OPTS = RunOptions(progress=False)


def tensors_of(directory: pathlib.Path) -> tensor_io.TensorIndex:
  return tensor_io.TensorIndex(sorted(pathlib.Path(directory).glob("*.safetensors")))


class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.root = pathlib.Path(cls.tmp.name)
    cls.src = fixtures.tiny_llama(cls.root / "src", dtype="bfloat16")
    cls.calib = CalibrationConfig(dataset=str(fixtures.calibration_files(cls.root)["txt"]),
                                  num_samples=4, seq_len=32)
    cls.source = tensors_of(cls.src)
    cls.cfg, _ = models.load_config(cls.src)
    cls.names = models.linear_names(cls.cfg)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _assert_unquantized_copied(self, out: tensor_io.TensorIndex, skip: set[str]):
    for name in self.source.names():
      if name not in skip:
        self.assertEqual(out.entries[name].dtype, self.source.entries[name].dtype)
        self.assertEqual(out.raw(name), self.source.raw(name), name)

  def test_anyprec_checkpoint(self):
    out = self.root / "anyprec"
    config = QuantConfig(seed_bits=3, parent_bits=8, lut_dtype=LutDtype.FLOAT32)
    quantize_model(str(self.src), str(out), config, self.calib,
                   RunOptions(progress=False, max_shard_bytes=100_000, keep_cache=True))
    cfg_json = json.loads((out / "config.json").read_text())
    section = cfg_json.pop("anyprec")
    source_cfg = json.loads((self.src / "config.json").read_text())
    self.assertEqual(cfg_json, source_cfg)
    self.assertEqual(section["format_version"], 1)
    self.assertEqual((section["method"], section["seed_bits"], section["parent_bits"]),
                     ("anyprec", 3, 8))
    self.assertEqual(section["calibration"],
                     {"dataset": self.calib.dataset, "num_samples": 4, "seq_len": 32, "seed": 0})
    self.assertEqual(list(section["quantized_modules"]), self.names)
    for f in ("tokenizer.json", "tokenizer_config.json"):
      self.assertEqual((out / f).read_bytes(), (self.src / f).read_bytes())
    # Sharded, with an index naming every tensor.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    self.assertGreater(len(shards), 1)
    self.assertFalse((out / "model.safetensors").exists())
    result = tensors_of(out)
    self.assertEqual(sorted(index["weight_map"]), result.names())
    self._assert_unquantized_copied(result, {f"{m}.weight" for m in self.names})
    fisher_dir = next(pathlib.Path(f"{out}.cache").glob("fisher-*"))
    for m in self.names:
      self.assertNotIn(f"{m}.weight", result)
      shape = section["quantized_modules"][m]
      n, k = shape["out_features"], shape["in_features"]
      planes = result.array(f"{m}.planes")
      self.assertEqual((planes.dtype, planes.shape), (np.uint32, (8, n, fmt.num_words(k))))
      with safe_open(str(out / index["weight_map"][f"{m}.planes"]), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_slice(f"{m}.planes")[:3], planes[:3])
      w = self.source.array(f"{m}.weight").astype(np.float32)
      layer = int(m.split(".")[2])
      fisher = tensor_io.TensorIndex([fisher_dir / f"layer_{layer:05d}.safetensors"]).array(m)
      luts = {b: result.array(f"{m}.lut{b}") for b in range(3, 9)}
      codes = fmt.unpack_codes_np(planes, 8, k)
      prev = None
      for b in range(3, 9):
        self.assertEqual((luts[b].dtype, luts[b].shape), (np.float32, (n, 2 ** b)))
        err = ref.weighted_error(w, fisher, codes >> (8 - b), luts[b])
        if prev is not None:
          np.testing.assert_array_less(err, prev * (1 + 1e-5) + 1e-20)
        prev = err
      if m == self.names[-1]:  # down_proj: K = 96, not a multiple of 32
        weight = wt.AnyPrecWeight(jnp.asarray(planes), {3: jnp.asarray(luts[3])},
                                  in_features=k, bits=3)
        np.testing.assert_array_equal(np.asarray(wt.dequantize(weight, 3)),
                                      np.take_along_axis(luts[3], codes >> 5, 1))

  def test_default_lut_dtype_is_float16(self):
    out = self.root / "fp16"
    quantize_model(str(self.src), str(out), QuantConfig(seed_bits=3, parent_bits=4),
                   self.calib, OPTS)
    # The default cache goes once the run has succeeded; a named one stays.
    self.assertFalse(pathlib.Path(f"{out}.cache").exists())
    named = self.root / "named-cache"
    quantize_model(str(self.src), str(self.root / "fp16-b"),
                   QuantConfig(seed_bits=3, parent_bits=4), self.calib,
                   RunOptions(progress=False, cache_dir=str(named)))
    self.assertTrue(list(named.glob("fisher-*")) and list(named.glob("anyprec-*")))
    result = tensors_of(out)
    self.assertEqual(json.loads((out / "config.json").read_text())["anyprec"]["lut_dtype"],
                     "float16")
    self.assertTrue((out / "model.safetensors").exists())
    self.assertEqual(result.array(f"{self.names[0]}.lut4").dtype, np.float16)

  def test_rtn_writes_dense_fake_quantized_dirs(self):
    out = self.root / "rtn"
    quantize_model(str(self.src), str(out), QuantConfig(2, 3, method=Method.RTN),
                   self.calib, OPTS)
    for b in (2, 3):
      d = out / f"w{b}"
      section = json.loads((d / "config.json").read_text())["anyprec"]
      self.assertEqual((section["method"], section["bits"]), ("rtn", b))
      self.assertIsNone(section["calibration"])
      result = tensors_of(d)
      self._assert_unquantized_copied(result, {f"{m}.weight" for m in self.names})
      for m in self.names:
        got = result.array(f"{m}.weight")
        self.assertEqual(got.dtype, ml_dtypes.bfloat16)
        w = self.source.array(f"{m}.weight").astype(np.float32)
        want = rtn_reference(w, b)
        # Exact ties (w - min) / scale = q + 1/2 may round either way in float32.
        lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
        frac = np.mod((w - lo) / ((hi - lo) / (2 ** b - 1)), 1.0)
        ok = np.abs(frac - 0.5) > 1e-3
        np.testing.assert_allclose(got.astype(np.float32)[ok], want[ok], rtol=2 ** -8,
                                   atol=1e-7)
      _, params = models.load_pretrained(d)  # loadable as a plain model
      self.assertLessEqual(len(np.unique(np.asarray(models.get_param(params, self.names[0]))[0])),
                           2 ** b)

  @slow.slow("one full quantization per width")
  def test_independent_writes_one_dir_per_width(self):
    out = self.root / "independent"
    quantize_model(str(self.src), str(out), QuantConfig(3, 4, method=Method.INDEPENDENT),
                   self.calib, OPTS)
    errs = []
    for b in (3, 4):
      result = tensors_of(out / f"w{b}")
      self.assertEqual(json.loads((out / f"w{b}" / "config.json").read_text())
                       ["anyprec"]["method"], "independent")
      total = 0.0
      for m in self.names:
        got = result.array(f"{m}.weight").astype(np.float32)
        self.assertTrue(all(len(np.unique(r)) <= 2 ** b for r in got))
        total += float(np.sum((got - self.source.array(f"{m}.weight").astype(np.float32)) ** 2))
      errs.append(total)
    self.assertLess(errs[1], errs[0])

  def test_threaded_packing_equals_format_packing(self):
    codes = np.random.default_rng(0).integers(0, 256, (300, 70)).astype(np.uint8)
    np.testing.assert_array_equal(pipeline.pack_planes(codes, 8, block_rows=64),
                                  fmt.pack_bitplanes(codes, 8))

  def test_fisher_damping_weights_the_errors_by_the_damped_fisher(self):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 40)).astype(np.float32)
    f = (rng.pareto(1.0, size=(6, 40)) + 1e-3).astype(np.float32)  # spiky
    damped = pipeline.damped_fisher(f, 0.5)
    np.testing.assert_allclose(damped, f + 0.5 * f.mean(1, keepdims=True), rtol=1e-6)
    import jax
    key = jax.random.key(0)
    for method in (Method.SQUEEZELLM,):  # damping is applied before any method runs
      plain = QuantConfig(method=method, seed_bits=3, parent_bits=4)
      got = pipeline._quantize_group(w, f, QuantConfig(method=method, seed_bits=3,
                                                       parent_bits=4, fisher_damping=0.5),
                                     key, OPTS, "t")
      want = pipeline._quantize_group(w, damped, plain, key, OPTS, "t")
      flat = lambda r: jax.tree_util.tree_leaves(r)
      for a, b in zip(flat(got), flat(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad in (-1.0, float("inf")):
      with self.assertRaisesRegex(ValueError, "fisher_damping"):
        QuantConfig(fisher_damping=bad)

  def test_bad_inputs_raise(self):
    for kwargs, pattern in (({"seed_bits": 1}, "seed_bits must be >= 2"),
                            ({"parent_bits": 9}, "parent_bits must be <= 8"),
                            ({"seed_bits": 5, "parent_bits": 4}, "must be <= parent_bits")):
      with self.assertRaisesRegex(ValueError, pattern):
        QuantConfig(**kwargs)
    with self.assertRaises(TypeError):
      QuantConfig(method="anyprec")
    bad = self.root / "gptneox"
    shutil.copytree(self.src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    with self.assertRaisesRegex(ValueError, "cannot quantize .*gpt_neox.*supported"):
      quantize_model(str(bad), str(self.root / "x"), QuantConfig(), self.calib, OPTS)

  def test_nan_weight_names_the_module(self):
    import torch
    from safetensors.torch import load_file, save_file
    bad = self.root / "nan"
    shutil.copytree(self.src, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for method in (Method.RTN, Method.ANYPREC):
      with self.assertRaisesRegex(ValueError, r"non-finite.*model\.layers\.1\.mlp\.down_proj"):
        quantize_model(str(bad), str(self.root / f"nan-{method.value}"),
                       QuantConfig(2, 3, method=method), self.calib, OPTS)
    del torch


if __name__ == "__main__":
  absltest.main()
