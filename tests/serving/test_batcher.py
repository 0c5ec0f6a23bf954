"""Batching and the adaptive policy through the app: concurrent requests at one
precision run as one batch; unpinned requests get lower precisions as the queue grows
and the highest again once it drains. A gate holds the first batch so the queue
builds up deterministically."""

import threading
import time

from absl.testing import absltest

from anyprec_jax.serving import metrics as metrics_lib
from anyprec_jax.serving.policy import AdaptivePolicy, FixedPolicy
from tests.serving import fixtures

NAME = "tiny"
PROMPTS = ["once", "once upon", "once upon a time", "hello world the end", "a", "the end"]


class GatedEngine:
  """Test double around the real engine: records each batch (precision, rows) and
  holds every batch until `gate` is set."""

  def __init__(self, engine):
    self._engine = engine
    self.gate = threading.Event()
    self.batches = []

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def run_batch(self, precision, rows, max_batch, live=None, chunk=8):
    self.batches.append((precision, len(rows)))
    self.gate.wait(30)
    yield from self._engine.run_batch(precision, rows, max_batch, live, chunk)


class RecordingPolicy(FixedPolicy):
  """FixedPolicy that keeps what the batcher reports."""

  def __init__(self, precision):
    super().__init__(precision)
    self.records = []

  def record(self, precision, batch, ms_per_token):
    self.records.append((precision, batch, ms_per_token))


class PresetPolicy(AdaptivePolicy):
  """AdaptivePolicy whose estimates come only from the test (the batcher's real
  measurements are dropped), so its choices are deterministic."""

  def record(self, precision, batch, ms_per_token, from_test=False):
    if from_test:
      super().record(precision, batch, ms_per_token)


def wait_until(cond, timeout=30.0):
  end = time.monotonic() + timeout
  while not cond():
    if time.monotonic() > end:
      raise AssertionError("timed out")
    time.sleep(0.005)


class _Base(absltest.TestCase):
  POLICY = None

  def setUp(self):
    super().setUp()
    from fastapi.testclient import TestClient
    from anyprec_jax.serving.app import create_app
    from anyprec_jax.serving.config import ServeConfig
    self.engine = GatedEngine(fixtures.engine())
    self.app = create_app(self.engine, ServeConfig(NAME, max_batch=4), policy=self.policy())
    self.server = self.app.state.server
    self.client = self.enter_context(TestClient(self.app))
    self.results = {}
    self.threads = []

  def tearDown(self):
    self.engine.gate.set()
    for t in self.threads:
      t.join(60)
    super().tearDown()

  def send(self, key, model, prompt="once upon a time"):
    """Posts a greedy completion on a thread; the response lands in results[key]."""
    def go():
      self.results[key] = self.client.post("/v1/completions", json={
          "model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0})
    t = threading.Thread(target=go)
    t.start()
    self.threads.append(t)

  def finish(self):
    self.engine.gate.set()
    for t in self.threads:
      t.join(60)
    self.assertTrue(all(r.status_code == 200 for r in self.results.values()),
                    [r.text for r in self.results.values()])
    return {k: r.json() for k, r in self.results.items()}


@fixtures.needs_server_stack
class BatchingTest(_Base):

  def policy(self):
    self.recording = RecordingPolicy(8)
    return self.recording

  def test_concurrent_requests_share_batches(self):
    """One request holds the worker; 5 more at 4 bits and 1 at 3 bits queue up; with
    max_batch 4 they run as [4 @4], [1 @4], [1 @3] (FIFO across precisions)."""
    self.send("first", f"{NAME}@4")
    wait_until(lambda: len(self.engine.batches) == 1)
    for i, p in enumerate(PROMPTS[:5]):
      self.send(i, f"{NAME}@4", p)
    wait_until(lambda: self.server.batcher.waiting()[4] == 5)
    self.send("low", f"{NAME}@3")
    wait_until(lambda: self.server.batcher.waiting()[3] == 1)
    self.assertEqual(self.server.batcher.load(), 7)
    got = self.finish()
    self.assertEqual(self.engine.batches, [(4, 1), (4, 4), (4, 1), (3, 1)])
    for i, p in enumerate(PROMPTS[:5]):  # Batched (left padded) = alone.
      ids = list(self.engine.tokenizer(p).input_ids)
      alone = list(self.engine.run_batch(4, [fixtures.row(ids, 5)], 4))
      self.assertEqual(got[i]["choices"][0]["text"], fixtures.decode(self.engine, alone))
    self.assertEqual(got["low"]["precision"], 3)
    m = metrics_lib.parse(self.client.get("/metrics").text)
    self.assertEqual(m['anyprec_batches_total{precision="4"}'], 3)
    self.assertEqual(m['anyprec_batch_rows_total{precision="4"}'], 6)
    self.assertEqual(m['anyprec_requests_total{precision="4"}'], 6)
    self.assertEqual(m['anyprec_running_requests{precision="4"}'], 0)
    measured = [(b, n) for b, n, ms in self.recording.records if ms > 0]
    self.assertIn((4, 4), measured)  # The batcher reports ms/token per batch size.

  def test_queue_length_in_metrics(self):
    self.send("first", f"{NAME}@4")
    wait_until(lambda: len(self.engine.batches) == 1)
    self.send("second", f"{NAME}@8")
    wait_until(lambda: self.server.batcher.waiting()[8] == 1)
    m = metrics_lib.parse(self.client.get("/metrics").text)  # Served while decoding.
    self.assertEqual(m['anyprec_queue_length{precision="8"}'], 1)
    self.assertEqual(m['anyprec_running_requests{precision="4"}'], 1)
    self.finish()


@fixtures.needs_server_stack
class AdaptiveTest(_Base):

  def policy(self):
    self.adaptive = PresetPolicy((3, 4, 8), target_ms=20, max_batch=4)
    for bits, batch, ms in ((8, 1, 5), (8, 2, 40), (4, 2, 15), (8, 4, 50), (4, 4, 30),
                            (3, 4, 10)):
      self.adaptive.record(bits, batch, ms, from_test=True)
    return self.adaptive

  def test_precision_drops_with_the_queue_and_recovers(self):
    self.send("load1", NAME)
    wait_until(lambda: len(self.engine.batches) == 1)
    self.send("load2", NAME)
    wait_until(lambda: sum(self.server.batcher.waiting().values()) == 1)
    self.send("load3", NAME)
    wait_until(lambda: sum(self.server.batcher.waiting().values()) == 2)
    got = self.finish()
    self.assertEqual([got[k]["precision"] for k in ("load1", "load2", "load3")], [8, 4, 3])
    self.assertEqual(got["load3"]["model"], f"{NAME}@3")
    self.results.clear()
    self.send("drained", NAME)
    self.assertEqual(self.finish()["drained"]["precision"], 8)
    m = metrics_lib.parse(self.client.get("/metrics").text)
    self.assertEqual([m[f'anyprec_policy_choices_total{{precision="{b}"}}'] for b in (3, 4, 8)],
                     [1, 1, 2])
    self.assertEqual(m["anyprec_policy_precision"], 8)
    self.assertEqual(m['anyprec_policy_latency_estimate_ms{batch="4",precision="3"}'], 10)

  def test_pinned_requests_bypass_the_policy(self):
    self.send("pinned", f"{NAME}@8")
    self.assertEqual(self.finish()["pinned"]["precision"], 8)
    self.assertEqual(self.adaptive.last_choice, 8)
    m = metrics_lib.parse(self.client.get("/metrics").text)
    self.assertNotIn('anyprec_policy_choices_total{precision="8"}', m)


if __name__ == "__main__":
  absltest.main()
