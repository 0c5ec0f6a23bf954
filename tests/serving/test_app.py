"""The OpenAI routes through FastAPI's TestClient: models, completions, chat, streaming,
precision selection, /health, /metrics and the table of bad requests."""

import json

from absl.testing import absltest, parameterized

from anyprec_jax.serving import metrics as metrics_lib
from tests.serving import fixtures

NAME = "tiny"
PROMPT = "once upon a time"


@fixtures.needs_server_stack
class AppTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from fastapi.testclient import TestClient
    from anyprec_jax.serving.app import create_app
    from anyprec_jax.serving.config import ServeConfig
    cls.engine = fixtures.engine()
    cls.app = create_app(cls.engine, ServeConfig(NAME, max_batch=4))
    cls.client = TestClient(cls.app)
    cls.client.__enter__()  # Runs the lifespan: the batcher thread.
    cls.prompt_ids = list(cls.engine.tokenizer(PROMPT).input_ids)

  @classmethod
  def tearDownClass(cls):
    cls.client.__exit__(None, None, None)
    super().tearDownClass()

  def complete(self, **body):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body}
    r = self.client.post("/v1/completions", json=body)
    self.assertEqual(r.status_code, 200, r.text)
    return r.json()

  def test_health(self):
    self.assertEqual(self.client.get("/health").json(),
                     {"status": "ok", "precisions": [3, 4, 8]})

  def test_models_lists_the_bare_id_and_one_per_precision(self):
    data = self.client.get("/v1/models").json()["data"]
    self.assertEqual([(m["id"], m["precision"]) for m in data],
                     [(NAME, 8), (f"{NAME}@3", 3), (f"{NAME}@4", 4), (f"{NAME}@8", 8)])
    self.assertTrue(all(m["object"] == "model" for m in data))

  @parameterized.named_parameters(("suffix", {"model": f"{NAME}@3"}, 3),
                                  ("field", {"precision": 4}, 4),
                                  ("both", {"model": f"{NAME}@4", "precision": 4}, 4),
                                  ("default", {}, 8))
  def test_greedy_completion_is_generate_at_the_precision(self, fields, bits):
    got = self.complete(**fields)
    text, n = fixtures.greedy_text(self.engine, self.prompt_ids, bits, 6)
    self.assertEqual(got["choices"][0]["text"], text)
    self.assertEqual((got["model"], got["precision"], got["system_fingerprint"]),
                     (f"{NAME}@{bits}", bits, f"anyprec-{bits}bit"))
    self.assertEqual(got["usage"], {"prompt_tokens": len(self.prompt_ids),
                                    "completion_tokens": n,
                                    "total_tokens": len(self.prompt_ids) + n})
    self.assertEqual(got["choices"][0]["finish_reason"], "length" if n == 6 else "stop")
    self.assertEqual(got["object"], "text_completion")

  def test_token_id_prompt_and_one_string_list(self):
    by_text = self.complete(model=f"{NAME}@4")["choices"][0]["text"]
    by_ids = self.complete(model=f"{NAME}@4", prompt=self.prompt_ids)
    self.assertEqual(by_ids["choices"][0]["text"], by_text)
    self.assertEqual(self.complete(model=f"{NAME}@4", prompt=[PROMPT])["choices"][0]["text"],
                     by_text)

  def test_stop_string_cuts_the_text(self):
    full = self.complete(model=f"{NAME}@4", max_tokens=8, ignore_eos=True)
    words = full["choices"][0]["text"].split(" ")
    got = self.complete(model=f"{NAME}@4", max_tokens=8, ignore_eos=True,
                        stop=[" " + words[2]])
    self.assertEqual(got["choices"][0]["text"], " ".join(words[:2]))
    self.assertEqual(got["choices"][0]["finish_reason"], "stop")
    self.assertEqual(got["usage"]["completion_tokens"], 3)

  def test_ignore_eos_generates_max_tokens(self):
    got = self.complete(model=f"{NAME}@4", max_tokens=12, ignore_eos=True)
    self.assertEqual(got["usage"]["completion_tokens"], 12)
    self.assertEqual(got["choices"][0]["finish_reason"], "length")

  def test_sampling_with_a_seed_repeats(self):
    a = self.complete(model=f"{NAME}@4", temperature=1.0, top_p=0.9, seed=3)
    b = self.complete(model=f"{NAME}@4", temperature=1.0, top_p=0.9, seed=3)
    self.assertEqual(a["choices"][0]["text"], b["choices"][0]["text"])

  def test_streaming_completion_equals_non_streaming(self):
    whole = self.complete(model=f"{NAME}@4", max_tokens=8, ignore_eos=True)
    r = self.client.post("/v1/completions", json={
        "model": f"{NAME}@4", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    self.assertEqual(r.status_code, 200)
    self.assertTrue(r.headers["content-type"].startswith("text/event-stream"))
    events = fixtures.sse_events(r.text)
    self.assertEqual(events[-1], "[DONE]")
    chunks, usage = events[:-2], events[-2]
    self.assertGreater(len(chunks), 2)  # Token by token, not one blob.
    self.assertEqual("".join(c["choices"][0]["text"] for c in chunks),
                     whole["choices"][0]["text"])
    self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks][-1], "length")
    self.assertTrue(all(c["model"] == f"{NAME}@4" for c in chunks))
    self.assertEqual(usage["choices"], [])
    self.assertEqual(usage["usage"], whole["usage"])

  def test_chat_applies_the_template(self):
    messages = [{"role": "user", "content": "hello world"}]
    text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True)
    ids = list(self.engine.tokenizer(text, add_special_tokens=False).input_ids)
    expect = self.complete(model=f"{NAME}@3", prompt=ids)
    r = self.client.post("/v1/chat/completions", json={
        "model": f"{NAME}@3", "messages": messages, "max_tokens": 6, "temperature": 0})
    got = r.json()
    self.assertEqual(got["object"], "chat.completion")
    self.assertEqual(got["choices"][0]["message"],
                     {"role": "assistant", "content": expect["choices"][0]["text"]})
    self.assertEqual(got["usage"], expect["usage"])
    self.assertEqual(got["precision"], 3)

  def test_chat_streaming(self):
    body = {"model": f"{NAME}@3", "messages": [{"role": "user", "content": "hello"}],
            "max_completion_tokens": 6, "temperature": 0}
    whole = self.client.post("/v1/chat/completions", json=body).json()
    events = fixtures.sse_events(
        self.client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    self.assertEqual(events[-1], "[DONE]")
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    self.assertEqual(deltas[0], {"role": "assistant", "content": ""})
    self.assertEqual("".join(d.get("content", "") for d in deltas),
                     whole["choices"][0]["message"]["content"])
    self.assertEqual(events[-2]["choices"][0]["finish_reason"],
                     whole["choices"][0]["finish_reason"])
    self.assertTrue(all(e["object"] == "chat.completion.chunk" for e in events[:-1]))

  def test_metrics(self):
    self.complete(model=f"{NAME}@4")
    r = self.client.get("/metrics")
    self.assertTrue(r.headers["content-type"].startswith("text/plain"))
    got = metrics_lib.parse(r.text)
    self.assertGreaterEqual(got['anyprec_requests_total{precision="4"}'], 1)
    self.assertGreaterEqual(got['anyprec_generation_tokens_total{precision="4"}'], 1)
    self.assertGreaterEqual(got['anyprec_request_latency_seconds_count{precision="4"}'], 1)
    self.assertEqual(got['anyprec_queue_length{precision="4"}'], 0)
    self.assertEqual(got['anyprec_running_requests{precision="8"}'], 0)
    self.assertEqual(got["anyprec_policy_precision"], 8)

  # The bad-request table: (body, status, param). None of them generates.
  LONG = " ".join(["hello"] * 130)
  BAD = (
      ("malformed_json", b"{bad", 400, None),
      ("not_an_object", b"[1, 2]", 400, None),
      ("missing_model", {"prompt": "a"}, 422, "model"),
      ("missing_prompt", {"model": NAME}, 422, "prompt"),
      ("prompt_wrong_type", {"model": NAME, "prompt": 5}, 422, "prompt"),
      ("max_tokens_string", {"model": NAME, "prompt": "a", "max_tokens": "5"}, 422,
       "max_tokens"),
      ("temperature_string", {"model": NAME, "prompt": "a", "temperature": "hot"}, 422,
       "temperature"),
      ("stream_string", {"model": NAME, "prompt": "a", "stream": "yes"}, 422, "stream"),
      ("unknown_model", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
      ("precision_not_loaded_suffix", {"model": f"{NAME}@5", "prompt": "a"}, 404, "model"),
      ("bad_suffix", {"model": f"{NAME}@x", "prompt": "a"}, 404, "model"),
      ("precision_not_loaded_field", {"model": NAME, "prompt": "a", "precision": 5}, 400,
       "precision"),
      ("precision_disagrees", {"model": f"{NAME}@3", "prompt": "a", "precision": 4}, 400,
       "precision"),
      ("n_2", {"model": NAME, "prompt": "a", "n": 2}, 400, "n"),
      ("max_tokens_0", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
      ("max_tokens_negative", {"model": NAME, "prompt": "a", "max_tokens": -3}, 400,
       "max_tokens"),
      ("max_tokens_beyond_context", {"model": NAME, "prompt": "a", "max_tokens": 200},
       400, "max_tokens"),
      ("prompt_beyond_context", {"model": NAME, "prompt": LONG}, 400, "prompt"),
      ("empty_token_prompt", {"model": NAME, "prompt": []}, 400, "prompt"),
      ("token_out_of_vocab", {"model": NAME, "prompt": [1, 1000]}, 400, "prompt"),
      ("two_prompts", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
      ("temperature_high", {"model": NAME, "prompt": "a", "temperature": 3}, 400,
       "temperature"),
      ("top_p_0", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p"),
      ("five_stops", {"model": NAME, "prompt": "a", "stop": list("abcde")}, 400, "stop"),
  )
  BAD_CHAT = (
      ("chat_missing_messages", {"model": NAME}, 422, "messages"),
      ("chat_empty_messages", {"model": NAME, "messages": []}, 400, "messages"),
      ("chat_content_wrong_type", {"model": NAME, "messages": [{"role": "user",
                                                               "content": 5}]},
       422, "messages"),
      ("chat_beyond_context", {"model": NAME, "messages": [{"role": "user",
                                                           "content": LONG}]},
       400, "messages"),
      ("chat_n_2", {"model": NAME, "n": 2, "messages": [{"role": "user",
                                                        "content": "a"}]}, 400, "n"),
  )

  def check_error(self, r, status, param):
    self.assertEqual(r.status_code, status, r.text)
    err = r.json()["error"]
    self.assertEqual(sorted(err), ["code", "message", "param", "type"])
    self.assertEqual(err["param"], param)
    self.assertIsInstance(err["message"], str)
    self.assertNotIn("\n", err["message"])
    self.assertEqual(err["type"], "not_found_error" if status == 404
                     else "invalid_request_error")

  @parameterized.named_parameters(*BAD)
  def test_bad_completion(self, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    self.check_error(self.client.post("/v1/completions", content=raw,
                                      headers={"content-type": "application/json"}),
                     status, param)

  @parameterized.named_parameters(*BAD_CHAT)
  def test_bad_chat(self, body, status, param):
    self.check_error(self.client.post("/v1/chat/completions", json=body), status, param)

  def test_bad_requests_are_counted_and_nothing_is_queued(self):
    self.client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    got = metrics_lib.parse(self.client.get("/metrics").text)
    self.assertGreaterEqual(got['anyprec_request_errors_total{code="404"}'], 1)
    self.assertEqual(sum(v for k, v in got.items()
                         if k.startswith("anyprec_queue_length")), 0)

  def test_unknown_route_and_method(self):
    self.check_error(self.client.get("/v1/nothing"), 404, None)
    r = self.client.get("/v1/completions")
    self.assertEqual(r.status_code, 405)
    self.assertIn("error", r.json())


if __name__ == "__main__":
  absltest.main()
