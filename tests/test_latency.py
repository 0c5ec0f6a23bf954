"""Latency helpers: timing protocol, random any-precision models, the e2e bench driver."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from anyprec_jax import format as fmt
from anyprec_jax import latency
from anyprec_jax.weight import AnyPrecWeight


class TimingTest(absltest.TestCase):

  def test_warm_up_excluded_and_median(self):
    timings = iter([(100.0, 100.0), (0.01, 0.9), (0.03, 0.3), (0.02, 0.6)])
    calls = []

    def run():
      prefill, decode = next(timings)
      calls.append(1)
      result = models.GenerationResult(tokens=np.zeros((1, 4)), lengths=np.array([4]))
      return result, models.Timing(prefill_s=prefill, decode_s=decode)

    lat = latency.time_generation(run, repeats=3)
    self.assertLen(calls, 4)
    self.assertAlmostEqual(lat.prefill_ms, 20.0)
    self.assertAlmostEqual(lat.decode_ms_per_token, 200.0)  # 0.6 s / 3 steps.
    self.assertAlmostEqual(lat.tokens_per_s, 5.0)


class RandomModelTest(absltest.TestCase):

  def test_random_anyprec_weight_padding_is_zero(self):
    planes, luts = latency._random_anyprec(jax.random.key(0), n=6, k=40, planes=5,
                                           precisions=(3, 5))
    self.assertEqual(planes.shape, (5, 6, 2))
    self.assertEqual({b: v.shape for b, v in luts.items()}, {3: (6, 8), 5: (6, 32)})
    codes = fmt.unpack_codes_np(np.asarray(planes), 5, 64)  # Padding columns too.
    self.assertTrue(np.all(codes[:, 40:] == 0))
    self.assertGreater(len(np.unique(codes[:, :40])), 8)

  def test_dense_params_without_linears(self):
    cfg = latency.shape_config(latency.Shape.TINY, layers=1)
    full = latency.random_dense_params(cfg, jnp.float32)
    lean = latency.random_dense_params(cfg, jnp.float32, linears=False)
    names = models.linear_names(cfg)
    for name in names:
      self.assertIsInstance(models.get_param(lean, name), jax.ShapeDtypeStruct)
      self.assertEqual(models.get_param(lean, name).shape,
                       models.get_param(full, name).shape)
    want = dict(jax.tree_util.tree_flatten_with_path(full)[0])
    arrays = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(lean)[0]
              if not isinstance(x, jax.ShapeDtypeStruct)]
    self.assertLen(arrays, len(want) - len(names))
    for path, x in arrays:  # The same draws as with the linears.
      np.testing.assert_array_equal(x, want[path])

  def test_bench_e2e_smoke(self):
    cfg = latency.shape_config(latency.Shape.TINY, layers=1)
    dense = latency.random_dense_params(cfg, jnp.float32)
    parts = latency.random_anyprec_params(cfg, dense, [3, 4], fuse=False)
    w = models.get_param(parts, models.linear_names(cfg)[0])
    self.assertIsInstance(w, AnyPrecWeight)
    self.assertEqual(w.planes.shape[0], 4)
    quant = latency.random_anyprec_params(cfg, dense, [3, 4])  # fused, as loaded
    mixed = latency.at_precision(quant, 3.5)  # random widths at the 3.5-bit budget
    widths = [w.bits for w in jax.tree_util.tree_leaves(
        mixed, is_leaf=lambda x: isinstance(x, AnyPrecWeight)) if isinstance(w, AnyPrecWeight)]
    self.assertEqual(set(widths), {3, 4})
    rows = latency.bench_e2e(cfg, [3, 3.5], prompt_len=5, new_tokens=3, dtype=jnp.float32,
                             repeats=1, copy_tbps=1e-3, log=lambda s: None)
    self.assertEqual([(r["model"], r["bits"]) for r in rows],
                     [("float32", 32), ("anyprec", 3), ("anyprec", 3.5)])
    self.assertEqual(rows[0]["speedup"], 1.0)
    self.assertTrue(all(r["new_tokens"] == 3 for r in rows))
    self.assertIn("| anyprec | 3 |", latency.latency_table(rows))
    self.assertTrue(all(r["step_mb"] > 0 and r["tbps"] > 0 for r in rows))
    self.assertAlmostEqual(rows[1]["copy_pct"], 100 * rows[1]["tbps"] / 1e-3)
    self.assertIn("% copy |", latency.latency_table(rows))
    self.assertNotIn("% copy", latency.latency_table([{k: v for k, v in r.items()
                                                       if k != "copy_pct"} for r in rows]))

  def test_decode_step_bytes_of_the_7b_shape(self):
    # Abstract params (no arrays): the ratio bf16 / b bits at context 0 is the issue's
    # ideal bytes ratio of the Llama-2-7B shape, 4.87 ... 1.77x.
    from anyprec_jax.plane_layout import PlaneLayout
    cfg = latency.shape_config(latency.Shape.LLAMA2_7B)
    dense = jax.eval_shape(lambda: latency.random_dense_params(cfg))
    quant = jax.eval_shape(lambda: latency.random_anyprec_params(
        cfg, latency.random_dense_params(cfg, linears=False), (3, 8),
        layout=PlaneLayout.TC_TILED))
    step = lambda p, **kw: latency.decode_step_bytes(cfg, p, **kw)
    bf16 = step(dense, batch=1, context=0)
    linears = sum(2 * n * k for n, k in (  # q, k, v, o, gate, up, down; lm_head; norms
        (4096, 4096),) * 4 + ((11008, 4096),) * 2 + ((4096, 11008),)) * 32
    self.assertEqual(bf16, linears + 2 * 32000 * 4096 + 2 * 4096 + 2 * 4096 * 65)
    self.assertAlmostEqual(bf16 / step(latency.at_precision(quant, 3), batch=1, context=0),
                           4.87, delta=0.01)
    self.assertAlmostEqual(bf16 / step(latency.at_precision(quant, 8), batch=1, context=0),
                           1.77, delta=0.01)
    kv = 2 * 32 * 4096 * 2  # K and V of one position over 32 layers, bf16
    self.assertEqual(step(dense, batch=8, context=100.5) - bf16,
                     8 * 100.5 * kv + 7 * 2 * 4096)  # 7 more embedding rows

  def test_plot(self):
    try:
      latency.require_matplotlib()
    except ImportError:
      self.skipTest("matplotlib not installed")
    rows = [{"model": "original", "bits": 32, "decode_ms_per_token": 2.0},
            {"model": "anyprec", "bits": 3, "decode_ms_per_token": 1.0},
            {"model": "anyprec", "bits": 4, "decode_ms_per_token": 1.2}]
    record = {"rows": [{"method": m, "bits": b, "results": {"wikitext2": {"ppl": p}}}
                       for m, b, p in [("original", 16, 10.0), ("anyprec", 3, 14.0),
                                       ("anyprec", 4, 11.0), ("rtn", 3, 40.0)]]}
    path = os.path.join(tempfile.mkdtemp(), "plot.png")
    latency.plot_latency_and_ppl(rows, record, path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class KernelTableTest(absltest.TestCase):

  def test_trace_table_counts_gpu_stream_kernels_per_step(self):
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid,
                                         "name": kind, "args": {"name": name}}
    kernel = lambda ts, dur, name: {"ph": "X", "pid": 2, "tid": 7, "ts": ts,
                                    "dur": dur, "name": name}
    trace = {"traceEvents": [
        meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
        meta(2, 7, "thread_name", "Stream #13(Compute)"),
        meta(2, 8, "thread_name", "XLA Ops"),
        {"ph": "X", "pid": 1, "tid": 0, "ts": 0.0, "dur": 99.0, "name": "host work"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 0.0, "dur": 50.0, "name": "fusion.1"},
        kernel(0.0, 10.0, "mosaic_gpu_kernel_a"), kernel(10.0, 5.0, "loop_fusion"),
        kernel(20.0, 10.0, "mosaic_gpu_kernel_a"), kernel(40.0, 5.0, "loop_fusion")]}
    table = latency.trace_kernel_table(trace, steps=2)
    # span 45 us over 2 steps, busy 30 (the XLA Ops line and the host are not kernels)
    self.assertIn("GPU span 22.5 us/step, busy 15.0 us/step (67%)", table)
    self.assertIn("| mosaic (any-precision GEMV) | 1 | 10.0 | 67% |", table)
    self.assertIn("| other XLA (fusions, copies) | 1 | 5.0 | 33% |", table)
    # gaps before kernels: 0 (10 us), 5 (20 us), 10 (40 us); none longer than 20 us
    self.assertIn("idle before kernels: 7.5 us/step, of which 0.0 in 0 gaps > 20 us", table)
    self.assertIn("mosaic (any-precision GEMV) 5.00 us, other XLA (fusions, copies) 5.00 us",
                  table)
    self.assertIn("kernels started before the previous one ended: none", table)
    with self.assertRaisesRegex(ValueError, "no GPU kernel events"):
      latency.trace_kernel_table({"traceEvents": trace["traceEvents"][:1]})
    # A kernel launched as a programmatic dependent starts in its predecessor's tail.
    trace["traceEvents"].append(kernel(43.0, 10.0, "mosaic_gpu_kernel_a"))
    self.assertIn("kernels started before the previous one ended: mosaic (any-precision "
                  "GEMV) 0.5 per step, 2.00 us early",
                  latency.trace_kernel_table(trace, steps=2))


if __name__ == "__main__":
  absltest.main()
