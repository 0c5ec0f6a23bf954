"""AnyPrecisionForCausalLM: loading slices, precision switching, forward and generate."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
import shutil
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import models
from anyprec_jax import allocation, checkpoint_reader, errors, eval_runner, runtime
from anyprec_jax.runtime import AnyPrecisionForCausalLM
from anyprec_jax.weight import AnyPrecWeight
from tests import shared_data
from tests import synthetic_checkpoint as synth

_dense_forward = jax.jit(models.forward, static_argnums=0)


class _RecordingHandle:
  """Wraps a safe_open handle and records every read (name, index or 'full')."""

  def __init__(self, handle, log):
    self._h, self._log = handle, log

  def __enter__(self):
    self._h.__enter__()
    return self

  def __exit__(self, *exc):
    return self._h.__exit__(*exc)

  def keys(self):
    return self._h.keys()

  def get_tensor(self, name):
    self._log.append((name, "full"))
    return self._h.get_tensor(name)

  def get_slice(self, name):
    log, sl = self._log, self._h.get_slice(name)

    class _Slice:
      def get_shape(self):
        return sl.get_shape()

      def __getitem__(self, index):
        log.append((name, index))
        return sl[index]

    return _Slice()


def _weights(params):
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, AnyPrecWeight))
  return [x for x in leaves if isinstance(x, AnyPrecWeight)]


class _SyntheticCheckpointTest(parameterized.TestCase):
  """A synthetic checkpoint in `cls.dir` (written by the subclass's setUpClass,
  removed after the class), dense references in full fp32."""

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    # fp32 dense references on GPU would otherwise run their matmuls in TF32.
    self.enter_context(jax.default_matmul_precision("highest"))


class RuntimeTest(_SyntheticCheckpointTest):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir, cls.quant, cls.dense = synth.write(seed=0)
    cls.model = AnyPrecisionForCausalLM.from_quantized(cls.dir)
    cls.ids = np.random.default_rng(1).integers(0, 97, (2, 9)).astype(np.int32)

  def test_supported_precisions(self):
    self.assertEqual(self.model.supported_precisions, (3, 4, 5, 6, 7, 8))
    self.assertEqual(self.model.precision, 8)

  @parameterized.parameters(3, 5, 8)
  def test_forward_matches_numpy_dequantized_model(self, bits):
    ref_dir = synth.dense_reference_dir(self.quant, self.dense, bits)
    cfg, params = models.load_pretrained(ref_dir)
    ref = np.asarray(_dense_forward(cfg, params, jnp.asarray(self.ids)))
    ours = np.asarray(self.model.forward(self.ids, precision=bits))
    self.assertGreater(np.abs(ref).max(), 0.5)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)

  def test_loading_fuses_projections(self):
    """q/k/v and gate/up load as one weight each; fuse=False keeps the parts; the
    logits agree."""
    layer = self.model._base["layers_0"]
    self.assertEqual(sorted(layer["attn"]), ["o_proj", "qkv_proj"])
    self.assertEqual(sorted(layer["mlp"]), ["down_proj", "gate_up_proj"])
    parts = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[3], fuse=False)
    self.assertIn("q_proj", parts._base["layers_0"]["attn"])
    ids = np.arange(10, dtype=np.int32).reshape(2, 5) % 90 + 3
    np.testing.assert_allclose(parts.forward(ids, precision=3),
                               self.model.forward(ids, precision=3), atol=1e-5, rtol=1e-5)

  def test_precisions_differ(self):
    """Different precisions really run different weights."""
    a = np.asarray(self.model.forward(self.ids, precision=3))
    b = np.asarray(self.model.forward(self.ids, precision=8))
    self.assertGreater(np.abs(a - b).max(), 1e-2)

  def test_generate_matches_dense_reference(self):
    bits = 4
    ref_dir = synth.dense_reference_dir(self.quant, self.dense, bits)
    cfg, params = models.load_pretrained(ref_dir)
    ref = models.generate(cfg, params, self.ids, max_new_tokens=6, eos_token_id=())
    ours = self.model.generate(self.ids, precision=bits, max_new_tokens=6,
                               eos_token_id=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))
    sampled = self.model.generate(
        self.ids, precision=bits, max_new_tokens=6, eos_token_id=(),
        sampling=models.SamplingConfig(temperature=1.0, top_k=5), rng=jax.random.key(0))
    self.assertEqual(sampled.tokens.shape, (2, 6))

  def test_speculative_generate_equals_plain(self):
    """3-bit drafts for the 4-bit model give its greedy output, from the same arrays."""
    plain = self.model.generate(self.ids, precision=4, max_new_tokens=6, eos_token_id=())
    out, _, stats = self.model.timed_speculative_generate(
        self.ids, precision=4, draft_precision=3, num_draft=3, max_new_tokens=6,
        eos_token_id=())
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    self.assertTrue((np.asarray(stats.rounds) >= 2).all())  # 5 tokens, <= 4 per round.
    again = self.model.generate(self.ids, precision=4, draft_precision=3, num_draft=3,
                                max_new_tokens=6, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(plain.tokens))
    pairs = zip(_weights(self.model.params_at(3)), _weights(self.model.params_at(4)))
    for w3, w4 in pairs:
      self.assertIs(w3.planes, w4.planes)  # No copy: the draft is the same planes.
      self.assertIs(w3.luts[3], w4.luts[3])

  def test_speculative_argument_errors(self):
    model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[4, 6])
    gen = functools.partial(model.generate, self.ids, max_new_tokens=2)
    with self.assertRaisesRegex(ValueError, r"precision 3 not supported; "
                                r"supported: \[4, 6\]"):
      gen(precision=6, draft_precision=3)
    with self.assertRaisesRegex(ValueError, r"draft_precision \(6\) must be below the "
                                r"target precision \(6\)"):
      gen(draft_precision=6)  # The default precision is the highest loaded.
    with self.assertRaisesRegex(ValueError, r"draft_precision \(6\) .* \(4\)"):
      gen(precision=4, draft_precision=6)
    for k in (0, 8):
      with self.assertRaisesRegex(ValueError, r"num_draft must be an integer in 1\.\.7"):
        gen(precision=6, draft_precision=4, num_draft=k)

  def test_one_program_per_precision(self):
    model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[3, 4])
    ids = self.ids[:1, :5]  # A shape no other test uses.
    before = runtime._forward._cache_size()
    model.forward(ids, precision=3)
    model.forward(ids, precision=3)
    self.assertEqual(runtime._forward._cache_size(), before + 1)
    model.forward(ids, precision=4)
    model.set_precision(3)
    model.forward(ids)
    self.assertEqual(runtime._forward._cache_size(), before + 2)

  def test_unsupported_precision_lists_supported(self):
    with self.assertRaisesRegex(ValueError, r"supported: \[3, 4, 5, 6, 7, 8\]"):
      AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[2, 4])
    model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[4, 6])
    with self.assertRaisesRegex(ValueError, r"supported: \[4, 6\]"):
      model.forward(self.ids, precision=5)
    with self.assertRaisesRegex(ValueError, r"supported: \[4, 6\]"):
      model.set_precision(8)
    with self.assertRaisesRegex(ValueError, r"supported: \[4, 6\]"):
      model.generate(self.ids, precision=3, max_new_tokens=2)

  def test_precision_arguments_are_numbers_only(self):
    one = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=np.int64(4))
    self.assertEqual(one.supported_precisions, (4,))
    same = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[4.0, np.float32(5)])
    self.assertEqual(same.supported_precisions, (4, 5))  # integral floats are the ints
    for bad, shown in (("34", "'34' of type str"), ([3, "4"], "'4' of type str"),
                       (True, "True of type bool"), ([float("nan")], "nan of type float")):
      with self.assertRaisesRegex(errors.UsageError, f"must be a number of bits.*{shown}"):
        AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=bad)
    weight = _weights(self.model.params_at())[0]
    for bad in ("4", True):
      for call in (lambda b: self.model.forward(self.ids, precision=b),
                   self.model.set_precision):
        with self.assertRaisesRegex(errors.UsageError, r"precision must be a number of bits"):
          call(bad)
    for bad in ("4", 4.5, True):  # one weight runs at one whole width
      with self.assertRaisesRegex(errors.UsageError, r"precision must be an int \(bits\)"):
        weight.with_bits(bad)

  def test_subset_reads_only_needed_planes_and_luts(self):
    log = []
    real = checkpoint_reader.safe_open
    with mock.patch.object(checkpoint_reader, "safe_open",
                           lambda *a, **k: _RecordingHandle(real(*a, **k), log)):
      model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[5, 3])
    self.assertEqual(model.supported_precisions, (3, 5))
    for w in _weights(model.params_at()):
      self.assertEqual(w.planes.shape[0], 5)
      self.assertEqual(sorted(w.luts), [3, 5])
    reads = [(n, i) for n, i in log if n.endswith(".planes") or ".lut" in n]
    self.assertNotEmpty(reads)
    for name, index in reads:
      self.assertNotEqual(index, "full", name)  # Never a whole-tensor read.
      if name.endswith(".planes"):
        self.assertEqual(index, slice(None, 5, None), name)
      else:
        self.assertRegex(name, r"\.lut[35]$")
    self.assertLen([n for n, _ in reads if n.endswith(".planes")], len(synth.linear_names()))

  def test_sharded_checkpoint(self):
    out, quant, dense = synth.write(seed=2, shards=2)
    try:
      model = AnyPrecisionForCausalLM.from_quantized(out, precisions=[6])
      ref_dir = synth.dense_reference_dir(quant, dense, 6)
      cfg, params = models.load_pretrained(ref_dir)
      ref = np.asarray(_dense_forward(cfg, params, jnp.asarray(self.ids)))
      np.testing.assert_allclose(np.asarray(model.forward(self.ids)), ref,
                                 atol=2e-4, rtol=2e-4)
    finally:
      shutil.rmtree(out, ignore_errors=True)

  def test_bad_checkpoints(self):
    tmp = pathlib.Path(tempfile.mkdtemp())
    try:
      for f in self.dir.iterdir():
        shutil.copy(f, tmp / f.name)
      config = json.loads((tmp / "config.json").read_text())
      config["anyprec"] = {"format_version": 1, "method": "rtn", "bits": 4}
      (tmp / "config.json").write_text(json.dumps(config))
      with self.assertRaisesRegex(ValueError, "load_pretrained"):
        AnyPrecisionForCausalLM.from_quantized(tmp)
      config["anyprec"] = json.loads((self.dir / "config.json").read_text())["anyprec"]
      config["anyprec"]["parent_bits"] = 7  # Planes on disk hold 8.
      (tmp / "config.json").write_text(json.dumps(config))
      with self.assertRaisesRegex(ValueError, "planes"):
        AnyPrecisionForCausalLM.from_quantized(tmp)
      config["anyprec"]["seed_bits"], config["anyprec"]["parent_bits"] = 6, 4
      (tmp / "config.json").write_text(json.dumps(config))
      with self.assertRaisesRegex(checkpoint_reader.QuantizedCheckpointError,
                                  r"invalid checkpoint.*seed_bits \(6\) > parent_bits \(4\)"):
        AnyPrecisionForCausalLM.from_quantized(tmp, precisions=[4])
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


class FractionalRuntimeTest(_SyntheticCheckpointTest):
  """Fractional precisions: per-module widths from the checkpoint's allocations."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir, cls.quant, cls.dense = synth.write(seed=4, allocations=[3.5, 4.25])
    cls.model = AnyPrecisionForCausalLM.from_quantized(cls.dir, precisions=[3.5, 4, 8])
    cls.ids = np.random.default_rng(2).integers(0, 97, (2, 7)).astype(np.int32)
    cls.meta = checkpoint_reader.parse_meta(json.loads((cls.dir / "config.json").read_text()))

  def test_forward_and_generate_match_the_allocated_dense_model(self):
    self.assertEqual(self.model.supported_precisions, (3.5, 4, 8))
    bits = self.model.allocations[3.5].bits
    self.assertEqual(set(bits.values()), {3, 4})  # a real mix
    self.assertEqual(bits, self.meta.allocations[3.5].bits)  # the stored one
    cfg, params = models.load_pretrained(synth.dense_reference_dir(self.quant, self.dense,
                                                                   dict(bits)))
    ref = np.asarray(_dense_forward(cfg, params, jnp.asarray(self.ids)))
    np.testing.assert_allclose(np.asarray(self.model.forward(self.ids, precision=3.5)),
                               ref, atol=2e-4, rtol=2e-4)
    plain = models.generate(cfg, params, self.ids, max_new_tokens=5, eos_token_id=())
    self.model.set_precision(3.5)
    ours = self.model.generate(self.ids, max_new_tokens=5, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(plain.tokens))
    fast = self.model.generate(self.ids, precision=8, draft_precision=3.5, num_draft=2,
                               max_new_tokens=5, eos_token_id=())
    slow = self.model.generate(self.ids, precision=8, max_new_tokens=5, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(slow.tokens))
    self.model.set_precision(8)

  def test_fused_groups_and_one_program_per_allocation(self):
    layer = self.model.params_at(3.5)["layers_0"]
    self.assertIn("qkv_proj", layer["attn"])
    self.assertIn("gate_up_proj", layer["mlp"])  # gate/up share a width and a launch
    ids = self.ids[:1, :3]  # a shape no other test uses
    before = runtime._forward._cache_size()
    for p in (3.5, 3.5, 4, 3.5):
      self.model.forward(ids, precision=p)
    self.assertEqual(runtime._forward._cache_size(), before + 2)

  def test_unstored_target_computed_from_the_errors(self):
    model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[3.75, 4.25])
    self.assertNotIn(3.75, self.meta.allocations)
    for p in (3.75, 4.25):
      a = model.allocations[p]
      self.assertLessEqual(a.nbytes, a.budget)
      self.assertEqual(a, checkpoint_reader.allocation_for(
          dataclasses.replace(self.meta, allocations={}), model.cfg, p))
    random = AnyPrecisionForCausalLM.from_quantized(
        self.dir, precisions=[3.5], allocation=allocation.Method.RANDOM)
    self.assertEqual(random.allocations[3.5].method, "random")
    self.assertGreater(random.allocations[3.5].objective, model.allocations[3.75].objective)

  def test_reads_only_the_planes_each_module_runs_at(self):
    log = []
    real = checkpoint_reader.safe_open
    with mock.patch.object(checkpoint_reader, "safe_open",
                           lambda *a, **k: _RecordingHandle(real(*a, **k), log)):
      model = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=3.5)
    bits = model.allocations[3.5].bits
    planes = {n[:-len(".planes")]: i for n, i in log if n.endswith(".planes")}
    self.assertEqual(planes, {m: slice(None, b, None) for m, b in bits.items()})
    luts = sorted(n for n, _ in log if ".lut" in n)
    self.assertEqual(luts, sorted(f"{m}.lut{b}" for m, b in bits.items()))

  def test_generate_script_at_a_fractional_precision(self):
    from tests import script_runner, test_readme  # noqa: PLC0415
    test_readme.write_tokenizer(self.dir, synth.TINY_CONFIG["vocab_size"])
    result = script_runner.run_script("generate", [
        f"--model={self.dir}", "--precision=3.5", "--max_new_tokens=3",
        "--prompt=The capital of France is"])
    self.assertEqual(result.code, 0, result.stderr)
    self.assertIn("compiling for precision 3.5", result.stderr)
    self.assertIn("decode", result.stdout)

  def test_errors(self):
    load = functools.partial(AnyPrecisionForCausalLM.from_quantized, self.dir)
    with self.assertRaisesRegex(errors.UsageError, r"precision 2\.75 is below the seed "
                                r"\(3 bits\)"):
      load(precisions=[2.75, 4])
    with self.assertRaisesRegex(errors.UsageError, r"precision 8\.5 is above the parent "
                                r"\(8 bits\)"):
      load(precisions=8.5)
    with self.assertRaisesRegex(errors.UsageError, r"precision 3\.25 not supported; "
                                r"supported: \[3\.5, 4, 8\]"):
      self.model.forward(self.ids, precision=3.25)
    plain, _, _ = synth.write(seed=5)
    try:
      with self.assertRaisesRegex(errors.UsageError, r"no stored allocation .* no "
                                  r"anyprec\.fisher_errors .* scripts/allocate\.py"):
        AnyPrecisionForCausalLM.from_quantized(plain, precisions=[3.5])
      self.assertEqual(AnyPrecisionForCausalLM.from_quantized(
          plain, precisions=[3, 4]).supported_precisions, (3, 4))
    finally:
      shutil.rmtree(plain, ignore_errors=True)
    split = {m: (3 if m.endswith("q_proj") else 4) for m in synth.linear_names()}
    unfused = AnyPrecisionForCausalLM.from_quantized(self.dir, precisions=[3, 4], fuse=False)
    paths = {m: models.params.param_path(unfused.params_at(3), m) for m in split}
    with self.assertRaisesRegex(errors.UsageError, r"different widths; load with fuse=False"):
      runtime.widths_by_path(self.model.params_at(8), split, paths, 3.5)
    self.assertLen(runtime.widths_by_path(unfused.params_at(3), split, paths), len(split))


class RealQuantizedModelTest(absltest.TestCase):
  """stories260K quantized by the real pipeline, loaded and evaluated end to end."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from anyprec_jax import quantize
    cls.src = shared_data.stories260k_dir()
    calib = shared_data.shared_path("data/tinystories/tinystories_val_head.txt")
    cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="anyprec_rt_"))
    cls.dir = quantize.quantize_model(
        # Greedy nesting: the runtime is under test (the default's DP compiles ~10 s more
        # on the CPU; test_pipeline quantizes with the default end to end).
        str(cls.src), str(cls.tmp / "ap"), quantize.QuantConfig(nesting=quantize.Nesting.GREEDY),
        quantize.CalibrationConfig(dataset=str(calib), num_samples=4, seq_len=128),
        quantize.RunOptions(progress=False, keep_cache=True))
    cls.data_dir = shared_data.shared_path("data")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_quality_follows_bits_and_table(self):
    rows = eval_runner.evaluate_entries(
        itertools.chain(eval_runner.original_entries(str(self.src)),
                        eval_runner.anyprec_entries(str(self.dir), [3, 4, 8])),
        ["tinystories"], data_dir=self.data_dir, seq_len=256, max_chunks=2,
        batch_size=2, progress=False)
    ppl = {(r["method"], r["bits"]): r["results"]["tinystories"]["ppl"] for r in rows}
    self.assertGreater(ppl["anyprec", 3], ppl["anyprec", 4])
    self.assertGreater(ppl["anyprec", 4], ppl["anyprec", 8])
    self.assertLess(abs(ppl["anyprec", 8] / ppl["original", 32] - 1), 0.01)
    table = eval_runner.format_table(rows, ["tinystories"])
    self.assertIn("| anyprec | 3 |", table)
    self.assertLen(table.splitlines(), 2 + 4)
    paired = {(p["method"], p["bits"]): p["paired"]["tinystories"]
              for p in eval_runner.paired_rows(rows, ["tinystories"], "original")}
    self.assertEqual(sorted(paired), [("anyprec", 3), ("anyprec", 4), ("anyprec", 8)])
    chunks = {(r["method"], r["bits"]): r["results"]["tinystories"]["chunk_nll"]
              for r in rows}
    for key, p in paired.items():  # paired on the same 2 chunks
      diff = np.subtract(chunks[key], chunks["original", 32])
      self.assertAlmostEqual(p["mean_nll_diff"], diff.mean(), places=9)
      self.assertAlmostEqual(p["ppl_ratio"], ppl[key] / ppl["original", 32], places=6)
    self.assertEqual(paired["anyprec", 3]["num_chunks"], 2)
    self.assertIn("| anyprec | 4 | +", eval_runner.format_paired_table(
        rows, ["tinystories"], "original"))

  def test_allocations_stored_and_recomputed_from_the_fisher_pass(self):
    from anyprec_jax.quantize import fractional  # noqa: PLC0415
    config = json.loads((self.dir / "config.json").read_text())
    meta = checkpoint_reader.parse_meta(config)
    self.assertEqual(sorted(meta.allocations), [b + q / 4 for b in range(3, 8)
                                                for q in (1, 2, 3)])
    copy = self.tmp / "copy"
    shutil.copytree(self.dir, copy)
    fisher = next(self.tmp.glob("ap.cache/fisher-*"))
    section = fractional.recompute(copy, self.src, fisher, targets=[3.5])
    self.assertEqual(section["fisher_errors"]["modules"],
                     config["anyprec"]["fisher_errors"]["modules"])
    self.assertEqual(section["allocations"][0]["bits"], meta.allocations[3.5].bits)
    model = AnyPrecisionForCausalLM.from_quantized(copy, precisions=[3.5, 4])
    ids = np.asarray([model.tokenizer("Once upon a time").input_ids], np.int32)
    self.assertEqual(model.generate(ids, precision=3.5, max_new_tokens=4).tokens.shape,
                     (1, 4))

  def test_generate_at_8_bits_follows_original(self):
    model = AnyPrecisionForCausalLM.from_quantized(self.dir)
    tok = model.tokenizer
    ids = np.asarray([tok("Once upon a time").input_ids], np.int32)
    cfg, params = models.load_pretrained(self.src)
    ref = models.generate(cfg, params, ids, max_new_tokens=8)
    ours = model.generate(ids, precision=8, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))


if __name__ == "__main__":
  absltest.main()
