"""Metrics: Prometheus text of counters, histograms and gauges, and its parse."""

from absl.testing import absltest

from anyprec_jax.serving import metrics as metrics_lib


class MetricsTest(absltest.TestCase):

  def test_render_and_parse(self):
    m = metrics_lib.Metrics()
    m.inc("anyprec_requests_total", precision=4)
    m.inc("anyprec_requests_total", precision=4)
    m.inc("anyprec_generation_tokens_total", 7, precision=3)
    m.observe("anyprec_request_latency_seconds", 0.3, precision=4)
    m.observe("anyprec_request_latency_seconds", 20.0, precision=4)
    text = m.render({"anyprec_queue_length": ("Queued.", {(("precision", 4),): 5})})
    self.assertIn("# TYPE anyprec_requests_total counter", text)
    self.assertIn("# TYPE anyprec_request_latency_seconds histogram", text)
    self.assertIn("# TYPE anyprec_queue_length gauge", text)
    got = metrics_lib.parse(text)
    self.assertEqual(got['anyprec_requests_total{precision="4"}'], 2)
    self.assertEqual(got['anyprec_generation_tokens_total{precision="3"}'], 7)
    self.assertEqual(got['anyprec_queue_length{precision="4"}'], 5)
    hist = 'anyprec_request_latency_seconds_bucket{precision="4",le="%s"}'
    self.assertEqual(got[hist % "0.25"], 0)
    self.assertEqual(got[hist % "0.5"], 1)  # Cumulative buckets.
    self.assertEqual(got[hist % "30.0"], 2)
    self.assertEqual(got[hist % "+Inf"], 2)
    self.assertAlmostEqual(got['anyprec_request_latency_seconds_sum{precision="4"}'], 20.3)
    self.assertEqual(m.value("anyprec_requests_total", precision=4), 2)
    self.assertEqual(m.value("anyprec_requests_total", precision=8), 0)

  def test_unknown_counter_is_a_bug(self):
    with self.assertRaises(AssertionError):
      metrics_lib.Metrics().inc("requests")


if __name__ == "__main__":
  absltest.main()
