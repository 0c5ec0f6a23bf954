"""Tests of calibration sampling (anyprec_jax/quantize/calibration.py)."""

import json
import pathlib
import tempfile

import numpy as np
from absl.testing import absltest

from anyprec_jax import errors
from anyprec_jax.quantize import calibration as calib
from anyprec_jax.quantize.config import CalibrationConfig
from tests.quantize import fixtures


class CalibrationTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    root = pathlib.Path(cls.tmp.name)
    cls.files = fixtures.calibration_files(root)
    fixtures.write_tokenizer(root)
    from transformers import AutoTokenizer
    cls.tok = AutoTokenizer.from_pretrained(root)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _docs(self):
    return [json.loads(line)["text"] for line in self.files["jsonl"].read_text().splitlines()]

  def test_documents_are_prefixes_of_distinct_long_documents(self):
    cfg = CalibrationConfig(dataset=str(self.files["jsonl"]), num_samples=5, seq_len=64)
    tokens = calib.calibration_tokens(cfg, self.tok)
    self.assertEqual(tokens.shape, (5, 64))
    self.assertEqual(tokens.dtype, np.int32)
    encoded = [self.tok(d)["input_ids"] for d in self._docs()]
    sources = []
    for row in tokens:
      hits = [i for i, ids in enumerate(encoded) if len(ids) >= 64 and ids[:64] == list(row)]
      self.assertLen(hits, 1)
      sources.append(hits[0])
    self.assertLen(set(sources), 5)
    again = calib.calibration_tokens(cfg, self.tok)
    np.testing.assert_array_equal(tokens, again)
    other = calib.calibration_tokens(CalibrationConfig(
        dataset=str(self.files["jsonl"]), num_samples=5, seq_len=64, seed=1), self.tok)
    self.assertFalse(np.array_equal(tokens, other))

  def test_plain_file_fallback_matches_datasets(self):
    cfg = CalibrationConfig(dataset=str(self.files["jsonl"]), num_samples=4, seq_len=32)
    with_datasets = calib.calibration_tokens(cfg, self.tok)
    original = calib._import_datasets
    calib._import_datasets = lambda: None
    try:
      plain = calib.calibration_tokens(cfg, self.tok)
      with self.assertRaisesRegex(ValueError, "needs the `datasets` package"):
        calib.load_source("c4")
    finally:
      calib._import_datasets = original
    np.testing.assert_array_equal(with_datasets, plain)

  def test_heldout_documents_are_the_ones_no_seed_takes(self):
    path = str(self.files["jsonl"])
    cfgs = [CalibrationConfig(dataset=path, num_samples=5, seq_len=64, seed=s)
            for s in (0, 1)]
    docs = self._docs()
    used = [calib.document_indices(docs, self.tok, c) for c in cfgs]
    for c, idx in zip(cfgs, used):  # the indices are the samples' sources, in order
      np.testing.assert_array_equal(
          calib.calibration_tokens(c, self.tok),
          [self.tok(docs[i])["input_ids"][:64] for i in idx])
    held = calib.heldout_documents(cfgs, self.tok)
    self.assertEqual(held, [d for i, d in enumerate(docs) if i not in set(used[0] + used[1])])
    self.assertLen(held, len(docs) - len(set(used[0] + used[1])))
    self.assertGreater(len(set(used[0] + used[1])), 5)  # two seeds take different documents
    with self.assertRaisesRegex(errors.UsageError, "one source"):
      calib.heldout_documents(cfgs + [CalibrationConfig(dataset=str(self.files["txt"]))],
                              self.tok)
    with self.assertRaisesRegex(errors.UsageError, "running text"):
      calib.heldout_documents([CalibrationConfig(dataset=str(self.files["txt"]))], self.tok)

  def test_heldout_docs_script_writes_them(self):
    from tests.script_runner import run_script
    root = pathlib.Path(self.tmp.name)
    out = root / "held" / "c4_heldout.jsonl"
    r = run_script("heldout_docs", [f"--model={root}", f"--calibration={self.files['jsonl']}",
                                    "--num_samples=5", "--seq_len=64", "--seeds=0,1",
                                    f"--output={out}"])
    self.assertEqual(r.code, 0, r.stderr)
    cfgs = [CalibrationConfig(dataset=str(self.files["jsonl"]), num_samples=5, seq_len=64,
                              seed=s) for s in (0, 1)]
    written = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    self.assertEqual(written, calib.heldout_documents(cfgs, self.tok))
    self.assertIn(f"{len(written)} held-out documents", r.stdout)

  def test_running_text_gives_windows_of_the_tokenized_text(self):
    cfg = CalibrationConfig(dataset=str(self.files["txt"]), num_samples=6, seq_len=50)
    tokens = calib.calibration_tokens(cfg, self.tok)
    self.assertEqual(tokens.shape, (6, 50))
    ids = np.asarray(self.tok(self.files["txt"].read_text())["input_ids"])
    for row in tokens:
      starts = [s for s in range(len(ids) - 49) if np.array_equal(ids[s:s + 50], row)]
      self.assertNotEmpty(starts)

  def test_empty_or_broken_files_name_the_file(self):
    root = pathlib.Path(self.tmp.name)
    empty, broken = root / "empty.jsonl", root / "broken.jsonl"
    empty.write_text("\n  \n")
    broken.write_text('{"text": "w1 w2"}\n{"text": \n')
    original = calib._import_datasets
    for plain in (False, True):
      if plain:
        calib._import_datasets = lambda: None
      try:
        with self.assertRaisesRegex(errors.BadInputError, r"empty\.jsonl is empty"):
          calib.load_source(str(empty))
        with self.assertRaisesRegex(errors.BadInputError, r"broken\.jsonl"):
          calib.load_source(str(broken))
      finally:
        calib._import_datasets = original
    with self.assertRaisesRegex(errors.MissingInputError, r"/nonexistent/x\.txt.*--calibration"):
      calib.load_source("/nonexistent/x.txt")

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "neither 'c4', 'wikitext2' nor an existing"):
      calib.load_source("/nonexistent/file.jsonl")
    bad = pathlib.Path(self.tmp.name) / "calib.csv"
    bad.write_text("a,b\n")
    with self.assertRaisesRegex(ValueError, "unsupported calibration file"):
      calib.load_source(str(bad))
    cfg = CalibrationConfig(dataset=str(self.files["jsonl"]), num_samples=50, seq_len=150)
    with self.assertRaisesRegex(ValueError, "documents have >= 150 tokens"):
      calib.calibration_tokens(cfg, self.tok)
    nokey = pathlib.Path(self.tmp.name) / "nokey.jsonl"
    nokey.write_text(json.dumps({"body": "w1 w2"}) + "\n")
    with self.assertRaisesRegex(ValueError, "no 'text' field"):
      calib.load_source(str(nokey))
    short = CalibrationConfig(dataset=str(self.files["txt"]), num_samples=1, seq_len=10 ** 5)
    with self.assertRaisesRegex(errors.BadInputError, r"calib\.txt: the text has \d+ tokens"):
      calib.calibration_tokens(short, self.tok)
    for kwargs in ({"num_samples": 0}, {"seq_len": 1}, {"dataset": ""}):
      with self.assertRaises(ValueError):
        CalibrationConfig(**kwargs)


if __name__ == "__main__":
  absltest.main()
