"""A tiny served model: the synthetic any-precision checkpoint plus a word-level
tokenizer with a chat template (a real `PreTrainedTokenizerFast`, 97 ids)."""

from __future__ import annotations

import functools
import pathlib

from tests import synthetic_checkpoint as synth

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
WORDS = ["user", "assistant", "system", ":", "hello", "world", "once", "upon", "a",
         "time", "the", "end"]
PRECISIONS = (3, 4, 8)


def write_tokenizer(directory: pathlib.Path, vocab_size: int) -> None:
  """Word-level tokenizer: <unk> 0, <s> 1 (added in front), </s> 2, WORDS, w0.. ."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ["<unk>", "<s>", "</s>"] + WORDS
  words += [f"w{i}" for i in range(vocab_size - len(words))]
  tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)},
                                       unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                 bos_token="<s>", eos_token="</s>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(str(directory))


@functools.lru_cache(maxsize=None)
def checkpoint_dir() -> pathlib.Path:
  """The synthetic checkpoint with its tokenizer (written once per process)."""
  directory, _, _ = synth.write(seed=0)
  write_tokenizer(directory, synth.TINY_CONFIG["vocab_size"])
  return directory


@functools.lru_cache(maxsize=None)
def engine():
  """One `Engine` at PRECISIONS over `checkpoint_dir()` (loaded once per process)."""
  from anyprec_jax.serving.engine import Engine
  return Engine.load(checkpoint_dir(), precisions=PRECISIONS)
