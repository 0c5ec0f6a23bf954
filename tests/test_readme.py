"""The README's Python API block runs as written (against a tiny checkpoint)."""

import contextlib
import io
import pathlib
import re
import shutil

from absl.testing import absltest

from tests import synthetic_checkpoint as synth

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CHECKPOINT = "out/mistral-7b-anyprec"  # the path the README block names


def python_api_block() -> str:
  text = README.read_text()
  section = text[text.index("## Python API"):]
  match = re.search(r"```python\n(.*?)```", section, re.S)
  assert match, "no ```python block under '## Python API'"
  return match.group(1)


def write_tokenizer(directory: pathlib.Path, vocab_size: int) -> None:
  """A word-level Hugging Face tokenizer of `vocab_size` ids (BOS 1, EOS 2, unk 0)."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 8)]
  words += ["The", "capital", "of", "France", "is"]
  vocab = {w: i for i, w in enumerate(words)}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                 bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(str(directory))


class ReadmeTest(absltest.TestCase):

  def test_python_api_block_runs(self):
    code = python_api_block()
    self.assertIn(CHECKPOINT, code)
    directory, _, _ = synth.write(seed=3, allocations=[3.5])
    try:
      write_tokenizer(directory, synth.TINY_CONFIG["vocab_size"])
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        exec(compile(code.replace(CHECKPOINT, str(directory)), str(README), "exec"), {})
      lines = out.getvalue().splitlines()
      self.assertEqual(lines[0], "(3, 4)")
      self.assertEqual(lines[2], "[3, 4]")  # the widths of the 3.5-bit allocation
      self.assertEqual(len(lines), 3, lines)  # supported precisions, text, widths
    finally:
      shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  absltest.main()
