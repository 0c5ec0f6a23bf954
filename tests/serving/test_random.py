"""`scripts/serve.py --random_shape`: random any-precision weights served without a
checkpoint (for load runs on machines that have none). The script runs in process with
`uvicorn.run` caught, and its app is driven through FastAPI's TestClient."""

from unittest import mock

import jax
from absl.testing import absltest

from anyprec_jax import runtime
from anyprec_jax.serving import char_tokenizer
from anyprec_jax.weight import AnyPrecWeight
from tests.script_runner import run_script
from tests.serving import fixtures

NAME = "random-tiny"
PROMPT = "once upon a time"  # 17 tokens with <s>.


@fixtures.needs_server_stack
class RandomServeTest(absltest.TestCase):
  """One `--random_shape=tiny --precisions=3,8` app for the class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from fastapi.testclient import TestClient
    with mock.patch("uvicorn.run") as run:
      res = run_script("serve", ["--random_shape=tiny", "--precisions=3,8",
                                 "--max_batch=1", "--random_layers=1",
                                 f"--warmup={len(PROMPT) + 1},5"])
    if res.code != 0:
      raise AssertionError(res.stderr)
    cls.stdout = res.stdout
    cls.app = run.call_args.args[0]
    cls.engine = cls.app.state.server.engine
    cls.client = TestClient(cls.app)
    cls.client.__enter__()  # Runs the lifespan: the batcher thread.

  @classmethod
  def tearDownClass(cls):
    cls.client.__exit__(None, None, None)
    super().tearDownClass()

  def test_banner_names_the_random_model_after_the_warm_up(self):
    lines = self.stdout.splitlines()
    self.assertEqual([l.split(":")[1] for l in lines[:2]],
                     [" 3 bits, batch 1", " 8 bits, batch 1"])
    self.assertStartsWith(lines[2], "warm-up: ")
    self.assertStartsWith(lines[3], f"serving {NAME} (random weights, num_layers=1, "
                          "vocab_size=512) at precisions [3, 8]")

  def test_health_and_models(self):
    self.assertEqual(self.client.get("/health").json(),
                     {"status": "ok", "precisions": [3, 8]})
    ids = [m["id"] for m in self.client.get("/v1/models").json()["data"]]
    self.assertEqual(ids, [NAME, f"{NAME}@3", f"{NAME}@8"])

  def test_completion_at_each_precision(self):
    texts = {}
    for bits in (3, 8):
      r = self.client.post("/v1/completions", json={
          "model": f"{NAME}@{bits}", "prompt": PROMPT, "max_tokens": 5,
          "temperature": 0, "ignore_eos": True})
      self.assertEqual(r.status_code, 200, r.text)
      got = r.json()
      self.assertEqual((got["model"], got["precision"], got["system_fingerprint"]),
                       (f"{NAME}@{bits}", bits, f"anyprec-{bits}bit"))
      self.assertEqual(got["usage"]["completion_tokens"], 5)
      self.assertEqual(got["usage"]["prompt_tokens"], len(PROMPT) + 1)
      texts[bits] = got["choices"][0]["text"]
      self.assertTrue(texts[bits])
    self.assertNotEqual(texts[3], texts[8])  # Other LUTs: other tokens.

  def test_weights_are_laid_out_as_a_loaded_checkpoint(self):
    leaves = jax.tree_util.tree_flatten_with_path(
        self.engine.params_at(3), is_leaf=lambda x: isinstance(x, AnyPrecWeight))[0]
    weights = {jax.tree_util.keystr(p): w for p, w in leaves
               if isinstance(w, AnyPrecWeight)}
    self.assertLen(weights, 4)  # One layer: q/k/v fused, o, gate/up fused, down.
    self.assertTrue(any("qkv_proj" in p for p in weights))
    self.assertTrue(any("gate_up_proj" in p for p in weights))
    self.assertFalse(any("q_proj" in p and "qkv" not in p for p in weights))
    for w in weights.values():
      self.assertEqual((w.bits, w.precisions, w.planes.shape[0]), (3, (3, 8), 8))
      self.assertEqual(w.layout, runtime.default_layout())


@fixtures.needs_server_stack
class RandomServeUsageTest(absltest.TestCase):

  def test_usage_errors_are_one_line(self):
    for args, needle in (
        ([], "exactly one of --model and --random_shape"),
        ([f"--model={fixtures.checkpoint_dir()}", "--random_shape=tiny"],
         "exactly one of"),
        ([f"--model={fixtures.checkpoint_dir()}", "--random_layers=1"],
         "go with --random_shape"),
        (["--random_shape=huge"], "unknown shape 'huge'"),
        (["--random_shape=tiny", "--precisions=9"], "integer precisions in 2..8"),
        (["--random_shape=tiny", "--random_layers=0"], "layers must be >= 1"),
        (["--random_shape=tiny", "--warmup=5"], "--warmup takes")):
      with self.subTest(args=args):
        res = run_script("serve", args)
        self.assertEqual(res.code, 2, res.stderr)
        self.assertIn(needle, res.stderr.splitlines()[0])
        self.assertNotIn("Traceback", res.stderr)


class EngineRandomTest(absltest.TestCase):

  def test_a_given_tokenizer_sets_the_vocabulary(self):
    from anyprec_jax.serving.engine import Engine
    engine = Engine.random("tiny", [4], tokenizer=char_tokenizer.char_tokenizer(200),
                           layers=1)
    self.assertEqual((engine.cfg.vocab_size, engine.precisions), (200, (4,)))
    self.assertEqual(engine.params_at(4)["lm_head"]["weight"].shape, (200, 128))


class CharTokenizerTest(absltest.TestCase):

  def test_sized_to_the_vocabulary_and_every_id_decodes(self):
    tok = char_tokenizer.char_tokenizer(300)
    self.assertLen(tok, 300)
    self.assertEqual((tok.bos_token_id, tok.eos_token_id), (1, 2))
    ids = tok("Hi, you!").input_ids
    self.assertEqual(ids[0], 1)
    self.assertLen(ids, 9)
    self.assertEqual(tok.decode(ids, skip_special_tokens=True), "Hi, you!")
    self.assertEqual(tok.decode([2, 299], skip_special_tokens=True), "<299>")
    self.assertTrue(tok.apply_chat_template([{"role": "user", "content": "x"}],
                                            tokenize=False, add_generation_prompt=True))

  def test_too_small_a_vocabulary(self):
    with self.assertRaisesRegex(ValueError, "at least"):
      char_tokenizer.char_tokenizer(char_tokenizer.min_vocab_size() - 1)


if __name__ == "__main__":
  absltest.main()
