"""A self-contained character tokenizer for serving random weights (benchmarks only).

`Engine.random` serves a model without a checkpoint, so there are no tokenizer files;
this builds a real `transformers.PreTrainedTokenizerFast` in memory instead, sized to
the model's vocabulary so every id the model can sample decodes:

  <unk> 0, <s> 1 (put in front of every text, as Llama's tokenizer does), </s> 2,
  one id per printable ASCII character (space, newline, digits, letters,
  punctuation), then filler ids up to vocab_size that decode to "<id>" and that text
  never encodes to.

Prompt token counts are character counts plus one (`<s>`). It has a plain chat
template ("role : content ... assistant :"), so /v1/chat/completions works too.
"""

from __future__ import annotations

import string

BOS, EOS = 1, 2
SPECIALS = ("<unk>", "<s>", "</s>")
CHARS = (" ", "\n") + tuple(string.digits + string.ascii_letters + string.punctuation)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")


def min_vocab_size() -> int:
  """The smallest vocabulary `char_tokenizer` fits (specials + characters)."""
  return len(SPECIALS) + len(CHARS)


def char_tokenizer(vocab_size: int):
  """The character tokenizer with exactly `vocab_size` ids (module docstring).

  Args:
    vocab_size: the model's vocabulary, >= `min_vocab_size()`.

  Returns:
    A `transformers.PreTrainedTokenizerFast` (len() == vocab_size, eos_token_id 2).

  Raises:
    ValueError: vocab_size below `min_vocab_size()`.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  if vocab_size < min_vocab_size():
    raise ValueError(f"the character tokenizer needs a vocabulary of at least "
                     f"{min_vocab_size()}, got {vocab_size}")
  words = list(SPECIALS) + list(CHARS)
  words += [f"<{i}>" for i in range(len(words), vocab_size)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                   unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                 bos_token="<s>", eos_token="</s>",
                                 clean_up_tokenization_spaces=False)
  fast.chat_template = CHAT_TEMPLATE
  return fast
