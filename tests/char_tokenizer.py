"""A character-level Hugging Face tokenizer sized for tests/synthetic_checkpoint.py.

94 characters (space, newline, digits, letters, punctuation but ` and |) plus <unk> 0,
<s> 1 (put in front of every text, as Llama's tokenizer does) and </s> 2: 97 ids, the
tiny model's vocabulary. Token counts are character counts, which keeps the tests'
expected values simple.
"""

import pathlib
import string

from tests import synthetic_checkpoint as synth

BOS, EOS = 1, 2


def write_char_tokenizer(directory: pathlib.Path) -> None:
  """One token per character (94 of them), <unk> 0, <s> 1 (added in front), </s> 2."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  chars = [" ", "\n"] + [c for c in string.digits + string.ascii_letters +
                         string.punctuation if c not in "`|"]
  vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS}
  vocab.update({c: i + 3 for i, c in enumerate(chars)})
  assert len(vocab) == synth.TINY_CONFIG["vocab_size"]
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", clean_up_tokenization_spaces=False
                          ).save_pretrained(str(directory))
