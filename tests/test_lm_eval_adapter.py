"""The lm_eval model `anyprec` (anyprec_jax/lm_eval_adapter.py) on a tiny checkpoint.

Every request type is checked against a direct computation with the runtime
(`forward` logits, our perplexity code, `generate`), and the local tasks in
tests/data/lm_eval_tasks run through lm_eval end to end, in Python and on the command
line (in this process, and as a plain `lm_eval --model anyprec` in a fresh one). The
tokenizer is character level with a Llama-style BOS, so token counts are character
counts. Skips when lm_eval is not installed (`pip install -e .[eval]`).
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest

from anyprec_jax import errors, evaluation
from anyprec_jax.runtime import AnyPrecisionForCausalLM
from tests import synthetic_checkpoint as synth
from tests.char_tokenizer import BOS, EOS, write_char_tokenizer
from tests import slow
from tests import test_lm_eval_plugin

try:
  import lm_eval
  from lm_eval.api.instance import Instance
except ImportError:
  lm_eval = None

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
BITS = 4


def instances(kind: str, args: list[tuple]) -> list:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
          for i, a in enumerate(args)]


class LmEvalAdapterTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if lm_eval is None:
      raise unittest.SkipTest("lm_eval not installed (pip install -e .[eval])")
    from anyprec_jax import lm_eval_adapter
    cls.adapter = lm_eval_adapter
    cls.dir, quant, dense = synth.write(seed=5)
    cls.dense_dir = synth.dense_reference_dir(quant, dense, BITS)
    for d in (cls.dir, cls.dense_dir):
      write_char_tokenizer(d)
    cls.model = AnyPrecisionForCausalLM.from_quantized(cls.dir, [3, BITS])
    cls.tok = cls.model.tokenizer
    cls.lm = lm_eval_adapter.AnyPrecLM(model=cls.model, precision=BITS, batch_size=3)
    cls._e2e = None

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    shutil.rmtree(cls.dense_dir, ignore_errors=True)
    super().tearDownClass()

  def direct_loglikelihoods(self, pairs, bits: int = BITS) -> list[tuple[float, bool]]:
    """[(sum log p(continuation | BOS + context), is greedy)] from one forward.

    Trailing spaces of a context belong to the continuation (lm_eval's rule). The rows
    are [BOS] + context + continuation, right-filled with token 0 up to the model's
    128 positions and run with no mask at all: causal attention keeps the filler out
    of the real positions.
    """
    rows, spans = np.zeros((-(-len(pairs) // 8) * 8, 128), np.int32), []  # [8k, 128]
    for r, (ctx, cont) in enumerate(pairs):
      cut = len(ctx.rstrip())
      ids = self.tok(ctx + cont)["input_ids"]  # [BOS] + one id per character
      rows[r, :len(ids)] = ids
      spans.append((1 + cut, len(ids)))
    logits = np.asarray(self.model.forward(rows, precision=bits))  # [R, 128, V]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    out = []
    for r, (start, end) in enumerate(spans):
      pos, target = np.arange(start - 1, end - 1), rows[r, start:end]
      out.append((float(logp[r, pos, target].sum()),
                  bool((logits[r, pos].argmax(-1) == target).all())))
    return out

  def test_tokens_carry_one_bos(self):
    self.assertEqual(self.lm.prefix_token_id, BOS)
    ctx, cont = self.lm._encode_pair("Question: why? ", "because")
    self.assertEqual(ctx, self.tok("Question: why?")["input_ids"])
    self.assertEqual(cont, self.tok.encode(" because", add_special_tokens=False))
    # A text that starts with its BOS gets no second one.
    self.assertEqual(self.lm.tok_encode("<s>abc"), self.tok("abc")["input_ids"])

  def test_loglikelihood_matches_forward_logits(self):
    pairs = [("", "Hello"), ("Question: what is it?\nAnswer:", " a cat"),
             ("ab", "c"), ("A longer context that crosses a bucket of 32", " yes"),
             ("x " * 25, "end of a 64-token bucket"), ("Q: ", "trailing space"),
             ("one", " two three")]
    got = self.lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    want = self.direct_loglikelihoods(pairs)
    for (ctx, _), (logp, greedy), (want_logp, want_greedy) in zip(pairs, got, want):
      np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-4, err_msg=ctx)
      self.assertEqual(greedy, want_greedy, ctx)
    # The model's own greedy continuation (argmax after argmax) is greedy.
    prompt, cont = "The sky is", ""
    for _ in range(5):
      ids = np.zeros((8, 128), np.int32)
      ids[0, :11 + len(cont)] = self.tok(prompt + cont)["input_ids"]
      logits = self.model.forward(ids, precision=BITS)
      cont += self.tok.decode([int(np.argmax(logits[0, 10 + len(cont)]))])
    [(logp, greedy)] = self.lm.loglikelihood(instances("loglikelihood", [(prompt, cont)]),
                                             disable_tqdm=True)
    self.assertTrue(greedy)
    np.testing.assert_allclose(logp, self.direct_loglikelihoods([(prompt, cont)])[0][0],
                               rtol=1e-5, atol=1e-4)

  def test_rolling_equals_perplexity_code(self):
    texts = ["A text for the rolling loglikelihood."]
    got = self.lm.loglikelihood_rolling(instances("loglikelihood_rolling",
                                                  [(t,) for t in texts]), True)
    for text, total in zip(texts, got):
      ids = evaluation.tokenize(self.tok, text)  # [BOS] + text: one window
      ppl = evaluation.perplexity(self.model.nll_fn(BITS), ids, seq_len=len(ids))
      np.testing.assert_allclose(total, -len(text) * ppl.mean_nll, rtol=1e-5)
    # Three windows of 16 predictions: chunks [BOS] + text of 17 tokens, stride 16.
    short = self.adapter.AnyPrecLM(model=self.model, precision=BITS, batch_size=2,
                                   max_length=16)
    text = "The quick brown fox jumps over the lazy dog. Twice"[:48]
    [total] = short.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]),
                                          True)
    ids = evaluation.tokenize(self.tok, text)
    windows = np.stack([ids[16 * k:16 * k + 17] for k in range(3)])  # [3, 17]
    nll = evaluation.chunk_nll(self.model.cfg, self.model.params_at(BITS), windows)
    np.testing.assert_allclose(total, -16 * float(np.sum(nll)), rtol=1e-5)

  def test_generate_until_stops_and_equals_generate(self):
    prompts = ["Once upon a", "The sky is", "abc", "Q: 2+2?\nA:"]  # one 16 bucket
    raw = []
    for group in (prompts[:3], prompts[3:] * 3):  # [3, 16]: the adapter's shape
      ids, mask = np.zeros((3, 16), np.int32), np.zeros((3, 16), np.int32)
      for r, p in enumerate(group):
        ids[r, 16 - len(p) - 1:] = self.tok(p)["input_ids"]
        mask[r, 16 - len(p) - 1:] = 1
      out = self.model.generate(ids, precision=BITS, attention_mask=mask,
                                max_new_tokens=12, eos_token_id=EOS)
      raw += [self.tok.decode(out.tokens[r, :out.lengths[r]], skip_special_tokens=True)
              for r in range(3)]
    raw = raw[:4]
    # Stop strings that occur mid-continuation: one character (stops on device) and
    # two characters (cut from the text).
    until = [raw[0][5], raw[1][3:5]]
    want = [min((r.split(u)[0] for u in until), key=len) for r in raw]
    self.assertLess(len(want[0]), len(raw[0]))
    self.assertLess(len(want[1]), len(raw[1]))
    kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
    got = self.lm.generate_until(instances("generate_until",
                                           [(p, kwargs) for p in prompts]), True)
    self.assertEqual(got, want)

  def test_dense_directory_matches_anyprec_weights(self):
    dense = self.adapter.AnyPrecLM(path=str(self.dense_dir), batch_size=2)
    self.assertEqual(dense.model.method, "original")
    pairs = [("Question: what?\nAnswer:", " this"), ("", "abc")]
    a = self.lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    b = dense.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-3)

  def test_bad_arguments(self):
    cls = self.adapter.AnyPrecLM
    with self.assertRaisesRegex(errors.UsageError, "dense model"):
      cls(path=str(self.dense_dir), precision=4)
    with self.assertRaisesRegex(errors.UsageError, "not supported"):
      cls(model=self.model, precision=7)
    with self.assertRaisesRegex(errors.UsageError, "auto"):
      cls(model=self.model, batch_size="auto")
    with self.assertRaisesRegex(errors.UsageError, "once"):
      cls()

  def end_to_end(self) -> dict:
    """lm_eval.simple_evaluate on both local tasks at 3 bits (run once)."""
    if LmEvalAdapterTest._e2e is None:
      from lm_eval.tasks import TaskManager
      LmEvalAdapterTest._e2e = lm_eval.simple_evaluate(
          model="anyprec", model_args=f"path={self.dir},precision=3,batch_size=4",
          tasks=["anyprec_tiny_mc", "anyprec_tiny_gen"], log_samples=True,
          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    return LmEvalAdapterTest._e2e

  def direct_mc_accuracy(self, bits: int) -> tuple[int, float, float]:
    """(questions, acc, acc_norm) of anyprec_tiny_mc from `direct_loglikelihoods`."""
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").open()]
    pairs = [(f"Question: {d['question']}\nAnswer:", " " + c)
             for d in docs for c in d["choices"]]
    ll = np.array([x for x, _ in self.direct_loglikelihoods(pairs, bits=bits)]).reshape(
        len(docs), 4)
    lengths = np.array([[len(c) for c in d["choices"]] for d in docs])  # lm_eval's norm
    labels = np.array([d["label"] for d in docs])
    acc, acc_norm = ll.argmax(1) == labels, (ll / lengths).argmax(1) == labels
    return len(docs), float(np.mean(acc)), float(np.mean(acc_norm))

  def test_local_tasks_through_lm_eval(self):
    res = self.end_to_end()
    n, acc, acc_norm = self.direct_mc_accuracy(bits=3)
    mc = res["results"]["anyprec_tiny_mc"]
    self.assertEqual(mc["sample_len"], n)
    self.assertAlmostEqual(mc["acc,none"], acc)
    self.assertAlmostEqual(mc["acc_norm,none"], acc_norm)
    gen = res["samples"]["anyprec_tiny_gen"]
    self.assertLen(gen, 6)
    for s in gen:
      text = s["resps"][0][0]
      self.assertLessEqual(len(text), 8)
      self.assertFalse(set(text) & {"\n", ","}, text)

  @slow.slow("the lm_eval CLI indexes its whole task list; the Python API tests cover the numbers")
  def test_command_line(self):
    """`python -m anyprec_jax.lm_eval_cli` (lm_eval's CLI with `anyprec` registered),
    run in this process: the same numbers as the Python API."""
    from anyprec_jax import lm_eval_cli
    out = pathlib.Path(tempfile.mkdtemp(prefix="anyprec_lm_eval_cli_"))
    self.addCleanup(shutil.rmtree, out, True)
    argv = ["lm_eval", "--model", "anyprec",
            "--model_args", f"path={self.dir},precision=3,batch_size=4",
            "--tasks", "anyprec_tiny_mc", "--include_path", str(TASKS),
            "--output_path", str(out)]
    with mock.patch.object(sys, "argv", argv):
      lm_eval_cli.main()
    [path] = out.rglob("results_*.json")
    got = json.loads(path.read_text())["results"]["anyprec_tiny_mc"]
    want = self.end_to_end()["results"]["anyprec_tiny_mc"]
    self.assertAlmostEqual(got["acc,none"], want["acc,none"])
    self.assertAlmostEqual(got["acc_norm,none"], want["acc_norm,none"])

  @slow.slow("lm_eval's CLI in a fresh process, ~17 s; test_lm_eval_plugin checks the "
             "installed hook registers the model in a bare interpreter")
  def test_plain_lm_eval_command(self):
    """The plain `lm_eval --model anyprec` in a fresh process (`python -m lm_eval`,
    the `lm_eval` console script's code): the installed anyprec_jax_lm_eval.pth
    registers the name, nothing else does. Same accuracy as the direct computation."""
    if not test_lm_eval_plugin.hook_active():
      self.skipTest(test_lm_eval_plugin.SKIP_REASON)
    out = pathlib.Path(tempfile.mkdtemp(prefix="anyprec_plain_lm_eval_"))
    self.addCleanup(shutil.rmtree, out, True)
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "anyprec",
         "--model_args", f"path={self.dir},precision=3,batch_size=80",  # one batch
         "--tasks", "anyprec_tiny_mc", "--include_path", str(TASKS),
         "--output_path", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    [path] = out.rglob("results_*.json")
    got = json.loads(path.read_text())["results"]["anyprec_tiny_mc"]
    n, acc, acc_norm = self.direct_mc_accuracy(bits=3)
    self.assertEqual(got["sample_len"], n)
    self.assertAlmostEqual(got["acc,none"], acc)
    self.assertAlmostEqual(got["acc_norm,none"], acc_norm)


if __name__ == "__main__":
  absltest.main()
