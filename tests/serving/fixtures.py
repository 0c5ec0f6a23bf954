"""A tiny served model: the synthetic any-precision checkpoint plus a word-level
tokenizer with a chat template (a real `PreTrainedTokenizerFast`, 97 ids)."""

from __future__ import annotations

import atexit
import functools
import pathlib
import shutil

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
  """The synthetic checkpoint with its tokenizer (written once per process, removed
  at exit)."""
  directory, _, _ = synth.write(seed=0)
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  write_tokenizer(directory, synth.TINY_CONFIG["vocab_size"])
  return directory


@functools.lru_cache(maxsize=None)
def engine():
  """One `Engine` at PRECISIONS over `checkpoint_dir()` (loaded once per process)."""
  from anyprec_jax.serving.engine import Engine
  return Engine.load(checkpoint_dir(), precisions=PRECISIONS)


def needs_server_stack(cls):
  """Skips a test class when the optional `serve` extra (FastAPI, httpx) is absent."""
  import importlib.util
  import unittest
  missing = [m for m in ("fastapi", "httpx", "uvicorn") if importlib.util.find_spec(m) is None]
  return unittest.skipIf(missing, f"needs {', '.join(missing)} (pip install -e .[serve])")(cls)


def sse_events(text: str) -> list:
  """The `data:` payloads of a server-sent-events body, JSON-decoded ('[DONE]' kept)."""
  import json
  out = []
  for line in text.splitlines():
    if line.startswith("data: "):
      data = line[len("data: "):]
      out.append(data if data == "[DONE]" else json.loads(data))
  return out


def greedy_text(engine, prompt, precision: int, max_tokens: int) -> tuple[str, int]:
  """(text, tokens) of `models.generate` at `precision` for one prompt, cut after EOS:
  what the server must answer greedily."""
  import numpy as np
  import models
  out = models.generate(engine.cfg, engine.params_at(precision), np.asarray([prompt]),
                        max_new_tokens=max_tokens)
  n = int(out.lengths[0])
  return engine.tokenizer.decode(np.asarray(out.tokens[0, :n]),
                                 skip_special_tokens=True), n


def row(prompt, max_tokens: int):
  """A greedy `RowSpec` with the tokenizer's EOS (what the server builds)."""
  from anyprec_jax.serving.engine import RowSpec
  return RowSpec(tuple(prompt), max_tokens, eos=(2,))


def decode(engine, steps) -> str:
  """The text of row 0 of `Engine.run_batch` output (finished slots dropped)."""
  return engine.tokenizer.decode([int(s[0]) for s in steps if s[0] >= 0],
                                 skip_special_tokens=True)
