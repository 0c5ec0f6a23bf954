"""lm-evaluation-harness model `anyprec`: any-precision checkpoints at any width.

    lm_eval --model anyprec \\
        --model_args path=out/smol-anyprec,precision=4,batch_size=8 --tasks arc_easy

    import lm_eval
    lm_eval.simple_evaluate(model="anyprec", model_args="path=DIR,precision=3", ...)

`path` is an any-precision checkpoint (evaluated at `precision`, default its highest)
or a dense Hugging Face directory (the original model, a fake-quantized baseline), so
one command line compares the original and every width. lm_eval 0.4.13 discovers no
third-party models by itself (no entry-point group): the installed
`anyprec_jax_lm_eval.pth` registers "anyprec" as the lazy string
"anyprec_jax.lm_eval_adapter:AnyPrecLM" when lm_eval loads its models
(`anyprec_jax_lm_eval_hook`), and `@register_model("anyprec")` below replaces it with
the class. Without the .pth, importing this module registers the name, and the
`anyprec-lm-eval` / `python -m anyprec_jax.lm_eval_cli` wrapper does that import.

Requests run through `anyprec_jax.lm_scoring` (jitted forward / generate, batched,
padded to power-of-two length buckets). Tokens follow lm_eval's `HFLM`:
- contexts are encoded with the tokenizer's own special tokens (Llama-style
  tokenizers add one BOS, SmolLM2's none; `add_bos_token` overrides), an empty
  context becomes `prefix_token_id` (BOS, else EOS);
- `loglikelihood_rolling` encodes the text *without* special tokens and conditions
  its first window on one `prefix_token_id` (HFLM 0.4.13 keeps the tokenizer's BOS
  there too, so a BOS-adding tokenizer sees BOS twice);
- `generate_until` stops on EOS on device, and on a stop string that is one token;
  the text is cut at the first stop string (EOS included, as in HFLM).
"""

from __future__ import annotations

import json
import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils

import models
from anyprec_jax import errors, lm_scoring

_LOG = logging.getLogger(__name__)
_DTYPES = ("float32", "bfloat16", "float16")


def _as_int(value, what: str) -> int:
  """An int from lm_eval's arguments (the CLI's --batch_size arrives as a string)."""
  try:
    if isinstance(value, bool) or float(value) != int(value):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise errors.UsageError(f"{what} must be an int, got {value!r}") from None


@register_model("anyprec")
class AnyPrecLM(TemplateLM):
  """An any-precision (or dense) model for lm_eval.

  Attributes:
    model: the `lm_scoring.EvalModel` evaluated.
    batch_size: rows per forward / generate call.
    max_length: the most tokens one forward sees.
    max_gen_toks: default continuation length of `generate_until`.
  """

  backend = "causal"

  def __init__(self, path: str | None = None, precision: int | None = None,
               batch_size=1, max_length: int | None = None, max_gen_toks: int = 256,
               dtype: str | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, seed: int = 0, model=None,
               device=None, max_batch_size=None):
    """Loads the model (or wraps a loaded one).

    Args:
      path: any-precision checkpoint directory, or a dense HF directory / hub id.
      precision: bits of an any-precision checkpoint; None: its highest (or, with
        `model`, its default). Must be None for a dense model.
      batch_size: rows per call (an int; "auto" is not supported).
      max_length: context limit; None: the config's max_position_embeddings.
      max_gen_toks: `generate_until` length when a task gives none.
      dtype: "float32", "bfloat16" or "float16"; None: bfloat16 on GPU, float32 on CPU.
      add_bos_token: None: the tokenizer's default; True / False: force.
      prefix_token_id: the token that stands for an empty context; None: BOS, else EOS.
      seed: PRNG seed of sampled generation.
      model: instead of `path`, an `AnyPrecisionForCausalLM` (its arrays are shared:
        one load serves every precision) or an `lm_scoring.EvalModel`.
      device, max_batch_size: passed by lm_eval; JAX uses its default device.

    Raises:
      errors.UsageError: neither or both of path / model; bad numbers or dtype.
    """
    super().__init__()
    if (path is None) == (model is None):
      raise errors.UsageError("give the model as path=DIR (or model= in Python), once")
    if str(batch_size).startswith("auto"):
      raise errors.UsageError("batch_size=auto is not supported; give an int")
    if device:
      _LOG.info("anyprec: device=%s ignored; JAX runs on its default device", device)
    del max_batch_size
    if dtype is not None and dtype not in _DTYPES:
      raise errors.UsageError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if path is not None:
      self.model = lm_scoring.load(path, precision, dtype)
    elif isinstance(model, lm_scoring.EvalModel):
      if precision is not None and precision != model.bits:
        raise errors.UsageError(f"model is fixed at {model.bits} bits; precision="
                                f"{precision} cannot change it")
      self.model = model
    else:
      self.model = lm_scoring.from_anyprec(model, precision)
    self.tokenizer = self.model.tokenizer
    self.batch_size = _as_int(batch_size, "batch_size")
    self.max_length = _as_int(self.model.cfg.max_position_embeddings
                              if max_length is None else max_length, "max_length")
    self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
    self.add_bos_token = add_bos_token
    self._prefix_token_id = prefix_token_id
    self.seed = _as_int(seed, "seed")

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config=None):
    """As `LM.create_from_arg_string`, but a `batch_size` in the model arguments
    wins over lm_eval's CLI default instead of clashing with it."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config=None):
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  # Tokens.

  @property
  def eot_token_id(self) -> int:
    if self.tokenizer.eos_token_id is not None:
      return self.tokenizer.eos_token_id
    return self.model.cfg.eos_token_ids[0]

  @property
  def prefix_token_id(self) -> int:
    if self._prefix_token_id is not None:
      return self._prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.eot_token_id

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """Token ids of `string` (special tokens as `HFLM.tok_encode` adds them)."""
    del kwargs
    if add_special_tokens is None:
      add_special_tokens = self.add_bos_token
      bos = self.tokenizer.bos_token
      if bos and string.startswith(bos):
        add_special_tokens = False  # The text carries its BOS already.
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    ids = self.tokenizer.encode(string, **kw)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

  # Requests.

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """[(key, context ids, continuation ids)] -> [(logprob, is_greedy)]."""
    del kwargs
    out = lm_scoring.score(self.model, [(c, x) for _, c, x in requests],
                           batch_size=self.batch_size, max_length=self.max_length,
                           desc=None if disable_tqdm else "anyprec loglikelihood")
    for (key, _, _), res in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole text: disjoint windows of `max_length`
    predictions, the first conditioned on `prefix_token_id`."""
    windows, owner = [], []
    for i, req in enumerate(requests):
      tokens = self.tok_encode(req.args[0], add_special_tokens=False)
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((ctx, cont))
        owner.append(i)
    scores = lm_scoring.score(self.model, windows, batch_size=self.batch_size,
                              max_length=self.max_length,
                              desc=None if disable_tqdm else "anyprec rolling")
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, scores):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  def _stop_ids(self, until: list[str]) -> set[int]:
    """EOS ids, plus each stop string that is exactly one token."""
    ids = {self.eot_token_id, *self.model.cfg.eos_token_ids}
    for s in until:
      enc = self.tokenizer.encode(s, add_special_tokens=False)
      if len(enc) == 1 and self.tok_decode(enc, skip_special_tokens=False) == s:
        ids.add(enc[0])
    return ids

  def _generate_group(self, contexts: list[str], gen_kwargs: dict,
                      disable_tqdm: bool) -> list[str]:
    kw = dict(model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    until = model_utils.handle_stop_sequences(
        kw.pop("until"), eos=self.tok_decode([self.eot_token_id], False))
    max_new = int(kw.pop("max_gen_toks"))
    room = self.max_length - max_new
    if room < 1:
      raise errors.UsageError(f"max_gen_toks={max_new} leaves no room for a prompt "
                              f"within max_length={self.max_length}")
    sampling = models.SamplingConfig()
    if kw.pop("do_sample", False) and float(kw.get("temperature", 0.0)) > 0:
      sampling = models.SamplingConfig(float(kw["temperature"]),
                                       int(kw.get("top_k", 0) or 0),
                                       float(kw.get("top_p", 1.0) or 1.0))
    prompts = [self.tok_encode(c, left_truncate_len=room) or [self.prefix_token_id]
               for c in contexts]
    tokens = lm_scoring.generate_tokens(
        self.model, prompts, batch_size=self.batch_size, max_new_tokens=max_new,
        eos_ids=sorted(self._stop_ids(until)), sampling=sampling, seed=self.seed,
        desc=None if disable_tqdm else "anyprec generate_until")
    return [model_utils.postprocess_generated_text(self.tok_decode(t), until, None)
            for t in tokens]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations, generated in groups of equal generation arguments."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      key = json.dumps(req.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    out: list[str | None] = [None] * len(requests)
    for idx in groups.values():
      texts = self._generate_group([requests[i].args[0] for i in idx],
                                   requests[idx[0]].args[1], disable_tqdm)
      for i, text in zip(idx, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out
