"""Real servers on 127.0.0.1: `scripts/serve.py` in a subprocess driven by the official
`openai` client (completions, chat, streaming, precisions, bad requests, 32 concurrent
requests, graceful shutdown), and uvicorn in a thread with a slowed engine for client
disconnects (a stream closed early, a request that times out): each frees its slot."""

import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from absl.testing import absltest

try:
  import httpx
except ImportError:  # The classes below skip (fixtures.needs_server_stack).
  httpx = None

from anyprec_jax.serving import metrics as metrics_lib
from tests.serving import fixtures
from tests.script_runner import run_script
from tests.shared_data import REPO

NAME = "tiny"
PROMPT = "once upon a time"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 120.0) -> None:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"server exited: {proc.communicate()[1][-3000:]}")
    try:
      if httpx.get(url + "/health", timeout=1).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.1)
  raise AssertionError("server did not become healthy")


def metrics(url: str) -> dict:
  return metrics_lib.parse(httpx.get(url + "/metrics").text)


@fixtures.needs_server_stack
@unittest.skipIf(importlib.util.find_spec("openai") is None, "needs openai")
class SubprocessServerTest(absltest.TestCase):
  """One `scripts/serve.py` for the class; the tests share it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import openai
    cls.port = free_port()
    cls.url = f"http://127.0.0.1:{cls.port}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cls.proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"),
         f"--model={fixtures.checkpoint_dir()}", "--precisions=3,4,8",
         f"--served_model_name={NAME}", f"--port={cls.port}", "--max_batch=4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      wait_healthy(cls.url, cls.proc)
    except AssertionError:
      cls.proc.kill()
      raise
    cls.client = openai.OpenAI(base_url=cls.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
    cls.engine = fixtures.engine()
    cls.prompt_ids = list(cls.engine.tokenizer(PROMPT).input_ids)

  @classmethod
  def tearDownClass(cls):
    if cls.proc.poll() is None:
      cls.proc.kill()
      cls.proc.communicate()
    super().tearDownClass()

  def test_1_models(self):
    ids = [m.id for m in self.client.models.list()]
    self.assertEqual(ids, [NAME, f"{NAME}@3", f"{NAME}@4", f"{NAME}@8"])

  def test_2_completions_at_each_precision_equal_generate(self):
    texts = {}
    for bits in (3, 4):
      got = self.client.completions.create(model=f"{NAME}@{bits}", prompt=PROMPT,
                                           max_tokens=6, temperature=0)
      want, n = fixtures.greedy_text(self.engine, self.prompt_ids, bits, 6)
      self.assertEqual((got.choices[0].text, got.usage.completion_tokens), (want, n))
      self.assertEqual((got.model, got.system_fingerprint), (f"{NAME}@{bits}",
                                                             f"anyprec-{bits}bit"))
      texts[bits] = got.choices[0].text
    self.assertNotEqual(texts[3], texts[4])
    by_field = self.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6,
                                              temperature=0, extra_body={"precision": 3})
    self.assertEqual((by_field.model, by_field.choices[0].text), (f"{NAME}@3", texts[3]))

  def test_3_chat_and_streaming(self):
    messages = [{"role": "user", "content": "hello"}]
    whole = self.client.chat.completions.create(model=f"{NAME}@4", messages=messages,
                                                max_tokens=6, temperature=0)
    self.assertEqual(whole.choices[0].message.role, "assistant")
    parts = list(self.client.chat.completions.create(
        model=f"{NAME}@4", messages=messages, max_tokens=6, temperature=0, stream=True))
    self.assertEqual("".join(p.choices[0].delta.content or "" for p in parts),
                     whole.choices[0].message.content)
    self.assertEqual(parts[-1].choices[0].finish_reason, whole.choices[0].finish_reason)
    stream = list(self.client.completions.create(model=f"{NAME}@4", prompt=PROMPT,
                                                 max_tokens=6, temperature=0, stream=True))
    done = self.client.completions.create(model=f"{NAME}@4", prompt=PROMPT, max_tokens=6,
                                          temperature=0)
    self.assertEqual("".join(c.choices[0].text for c in stream), done.choices[0].text)

  def test_4_bad_requests(self):
    import openai
    cases = [
        (openai.NotFoundError, dict(model="gpt-4")),
        (openai.NotFoundError, dict(model=f"{NAME}@6")),
        (openai.BadRequestError, dict(model=NAME, extra_body={"precision": 6})),
        (openai.BadRequestError, dict(model=NAME, n=2)),
        (openai.BadRequestError, dict(model=NAME, max_tokens=0)),
        (openai.BadRequestError, dict(model=NAME, max_tokens=500)),
        (openai.BadRequestError, dict(model=NAME, prompt=" ".join(["a"] * 200))),
        (openai.UnprocessableEntityError, dict(model=NAME, max_tokens="5")),
    ]
    for error, kwargs in cases:
      with self.subTest(kwargs=kwargs), self.assertRaises(error) as ctx:
        self.client.completions.create(**{"prompt": PROMPT, **kwargs})
      self.assertIn("message", ctx.exception.body)
    r = httpx.post(self.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    self.assertEqual((r.status_code, sorted(r.json()["error"])),
                     (400, ["code", "message", "param", "type"]))

  def test_5_32_concurrent_requests(self):
    def one(i):
      return self.client.completions.create(
          model=f"{NAME}@4", prompt=f"once w{i}", max_tokens=4, temperature=0,
          extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
      got = list(pool.map(one, range(32), timeout=120))
    self.assertEqual(len({g.id for g in got}), 32)
    self.assertTrue(all(g.usage.completion_tokens == 4 for g in got))
    m = metrics(self.url)
    self.assertLess(m['anyprec_batches_total{precision="4"}'], 32)  # Some were batched.
    self.assertEqual(m['anyprec_running_requests{precision="4"}'], 0)

  def test_6_bounded_load_run(self):
    from anyprec_jax.serving import loadtest
    got = loadtest.run_load(self.url, f"{NAME}@3", requests=8, concurrency=4,
                            max_tokens=4, prompt=PROMPT)
    self.assertEqual((got.precision, got.requests, len(got.latencies_s)), (3, 8, 8))
    self.assertEqual(got.completion_tokens, 32)
    self.assertLessEqual(got.percentile(50), got.percentile(99))
    self.assertEqual(got.percentile(100), max(got.latencies_s))
    self.assertGreater(got.tokens_per_s, 0)
    self.assertIn("| 3 | 4 | 8 | 4 |", loadtest.markdown_table([got]))

  def test_9_graceful_shutdown(self):
    """SIGTERM while a stream is open: the stream still completes, then the server
    exits (uvicorn re-raises the signal after its graceful shutdown: -SIGTERM)."""
    events = []
    with httpx.stream("POST", self.url + "/v1/completions", timeout=60, json={
        "model": f"{NAME}@4", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
        "ignore_eos": True, "stream": True}) as r:
      lines = r.iter_lines()
      for line in lines:
        if line.startswith("data: "):
          events.append(line)
          break
      self.proc.send_signal(signal.SIGTERM)
      events += [line for line in lines if line.startswith("data: ")]
    self.assertEqual(events[-1], "data: [DONE]")
    self.assertEqual(sum(len(json.loads(e[6:])["choices"][0]["text"].split())
                         for e in events[:-1]), 12)
    _, err = self.proc.communicate(timeout=30)
    self.assertIn(self.proc.returncode, (0, -signal.SIGTERM), err[-3000:])
    self.assertNotIn("Traceback", err)


class SlowEngine:
  """Test double around the real engine: every step sleeps `delay` s; counts steps."""

  def __init__(self, engine, delay):
    self._engine, self.delay, self.steps = engine, delay, []

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def run_batch(self, precision, rows, max_batch, live=None, chunk=8):
    self.steps.append(0)
    for tokens in self._engine.run_batch(precision, rows, max_batch, live, chunk):
      time.sleep(self.delay)
      self.steps[-1] += 1
      yield tokens


@fixtures.needs_server_stack
class DisconnectTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import uvicorn
    from anyprec_jax.serving.app import create_app
    from anyprec_jax.serving.config import ServeConfig
    cls.engine = SlowEngine(fixtures.engine(), delay=0.15)
    port = free_port()
    cls.url = f"http://127.0.0.1:{port}"
    cls.uvicorn = uvicorn.Server(uvicorn.Config(
        create_app(cls.engine, ServeConfig(NAME)), host="127.0.0.1", port=port,
        log_level="warning"))
    cls.thread = threading.Thread(target=cls.uvicorn.run, daemon=True)
    cls.thread.start()
    wait_healthy(cls.url)

  @classmethod
  def tearDownClass(cls):
    cls.uvicorn.should_exit = True
    cls.thread.join(30)
    super().tearDownClass()

  def body(self, **kw):
    return {"model": f"{NAME}@4", "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, **kw}

  def assert_freed(self, cancelled: int):
    end = time.monotonic() + 10
    while time.monotonic() < end:
      m = metrics(self.url)
      if m.get('anyprec_requests_cancelled_total{precision="4"}') == cancelled:
        break
      time.sleep(0.02)
    self.assertEqual(m['anyprec_requests_cancelled_total{precision="4"}'], cancelled)
    self.assertEqual(m['anyprec_running_requests{precision="4"}'], 0)
    self.assertNotIn('anyprec_requests_total{precision="4"}', m)  # None was answered.
    time.sleep(0.2)
    self.assertLess(self.engine.steps[-1], 12)  # The batch ended at the disconnect (of 16).

  def test_1_stream_closed_early_frees_the_slot(self):
    events = 0
    with httpx.stream("POST", self.url + "/v1/completions",
                      json=self.body(stream=True), timeout=30) as r:
      for line in r.iter_lines():
        events += line.startswith("data: ")
        if events == 3:
          break
    self.assertEqual(events, 3)
    self.assert_freed(1)

  def test_2_request_timed_out_by_the_client_frees_the_slot(self):
    with self.assertRaises(httpx.ReadTimeout):
      httpx.post(self.url + "/v1/completions", json=self.body(), timeout=0.4)
    self.assert_freed(2)
    ok = httpx.post(self.url + "/v1/completions", json=self.body(max_tokens=3), timeout=30)
    self.assertEqual(ok.json()["usage"]["completion_tokens"], 3)  # Still serving.


@fixtures.needs_server_stack
class ServeScriptTest(absltest.TestCase):

  def test_usage_errors_are_one_line(self):
    for args, needle in (
        (["--policy=adaptive"], "latency_target_ms"),
        ([f"--model={fixtures.checkpoint_dir()}", "--precisions=9"], "precision"),
        (["--max_batch=0"], "max_batch")):
      with self.subTest(args=args):
        model = [] if any(a.startswith("--model") for a in args) else [
            f"--model={fixtures.checkpoint_dir()}"]
        res = run_script("serve", model + args)
        self.assertEqual(res.code, 2, res.stderr)
        self.assertIn(needle, res.stderr.splitlines()[0])
        self.assertNotIn("Traceback", res.stderr)


if __name__ == "__main__":
  absltest.main()
