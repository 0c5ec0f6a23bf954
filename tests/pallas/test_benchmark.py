"""The benchmark harness on CPU: a case is checked, timed and reported (tiny shapes)."""

from unittest import mock

from absl.testing import absltest

from anyprec_jax.pallas import bench_report
from anyprec_jax.pallas import benchmark as bm


class HarnessTest(absltest.TestCase):

  def test_attention_case_runs_checks_and_times(self):
    shape = bm.AttentionShape("tiny", 2, 48, 2, 2, 64)
    res, log = {}, []
    with mock.patch.object(bm, "MIN_BYTES", 1e5):
      cases = [bm.attention_case(shape, "xla")]
      bench_report.run_cases(cases, res, log.append, samples=3, threads=1)
    r = res[("attention", "tiny", "xla", "")]
    self.assertGreater(r["us"], 0)
    self.assertLess(r["err"], 1e-2)  # the decoder's bf16 output against the f32 twin
    self.assertEqual(r["bytes"], 2 * 2 * 48 * 2 * 64 * 2 + 2 * 4 * 64 * 2 + 2 * 48 * 4
                     + 2 * 4 * 64 * 4)
    self.assertIn("compiled 1 programs", log[0])

  def test_attention_shapes_by_name(self):
    self.assertEqual(bm.attention_shapes(), bm.ATTENTION_SHAPES)
    picked = bm.attention_shapes(["7b b1 s128", "7b b1 s384"])
    self.assertEqual([(s.slots, s.batch) for s in picked], [(128, 1), (384, 1)])
    with self.assertRaisesRegex(ValueError, "unknown attention shape.*s99"):
      bm.attention_shapes(["s99"])

  def test_floor_case_runs_on_cpu_and_rejects_unknown_kinds(self):
    res = {}
    bench_report.run_cases([bm.floor_case("xla")], res, lambda _: None, samples=3,
                           threads=1)
    self.assertGreater(res[("floor", "xla", 132, 1)]["us"], 0)
    with self.assertRaisesRegex(ValueError, "kind"):
      bm.floor_case("cuda")

  def test_a_failing_case_is_reported_and_the_others_run(self):
    def boom(*_):
      raise RuntimeError("no GPU")
    bad = bm.Case(("bad",), boom, lambda: ((), ()), 1.0, 1)
    res = {}
    with mock.patch.object(bm, "compile_all", lambda cases, threads: None):
      bench_report.run_cases([bad], res, lambda _: None, samples=1)
    self.assertIn("no GPU", res[("bad",)]["error"])


if __name__ == "__main__":
  absltest.main()
