"""Perplexity evaluation, GPTQ style (Frantar et al., 2023; as used by Park et al., 2024).

The evaluation split of a corpus is joined into one text, tokenized whole, and cut
into non-overlapping chunks of `seq_len` tokens (the remainder is dropped). Each chunk
is one batch row with no context from the previous chunk; its loss is the mean
negative log-likelihood of its `seq_len - 1` next-token predictions, and

    ppl = exp(mean over chunks of the chunk loss)

(equal to GPTQ's `exp(sum(loss * seq_len) / (n_chunks * seq_len))`).

Two models evaluated on the same chunks are compared *paired* (`paired_difference`):
the mean over chunks of the per-chunk NLL difference and its standard error. Chunk
difficulty varies far more than the difference between two close models, so the
paired standard error is much smaller than what two separate perplexities suggest;
exp(mean difference) is exactly the ratio of the two perplexities.

Text comes from Hugging Face `datasets` hub names (imported lazily: the GPU machine has
no `datasets`) or from local files (`data_dir`, plain text or JSON Lines), normalised
as ../shared/README.md ("Text files") prescribes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import models
from anyprec_jax import errors


class EvalDataset(enum.Enum):
  WIKITEXT2 = "wikitext2"
  C4 = "c4"
  PTB = "ptb"
  TINYSTORIES = "tinystories"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a corpus lives and how its rows become one text.

  Attributes:
    local_files: candidate paths relative to `data_dir`, first existing wins (the
      layout of ../shared/data first).
    joiner: string placed between rows (documents / lines / sentences).
    hub: (path, config name, split, column, max rows) for `datasets.load_dataset`,
      or None when the corpus is local only.
    hub_data_files: `data_files` argument for the hub load (C4 shards), or None.
  """
  local_files: tuple[str, ...]
  joiner: str
  hub: tuple[str, str | None, str, str, int | None] | None
  hub_data_files: dict | None = None


SPECS: dict[EvalDataset, DatasetSpec] = {
    # GPTQ: "\n\n".join(test["text"]). The local raw file is that text without the
    # split's empty rows; it is only CRLF-normalised (../shared/README.md).
    EvalDataset.WIKITEXT2: DatasetSpec(
        local_files=("wikitext2/wiki.test.raw", "wiki.test.raw", "wikitext2.txt",
                     "wikitext2.jsonl"),
        joiner="\n\n",
        hub=("wikitext", "wikitext-2-raw-v1", "test", "text", None)),
    # Any-precision release: "\n\n".join of the sentences; locally the Mikolov
    # validation file (the test split is not in ../shared).
    EvalDataset.PTB: DatasetSpec(
        local_files=("ptb/ptb.test.txt", "ptb.test.txt", "ptb/ptb.valid.txt",
                     "ptb.valid.txt", "ptb.txt", "ptb.jsonl"),
        joiner="\n\n",
        hub=("ptb_text_only", "penn_treebank", "test", "sentence", None)),
    # GPTQ ("c4_new"): " ".join of the first 1100 validation documents of shard 0.
    # Locally only a *train* sample exists (calibration text): results on it are not
    # C4-validation perplexities.
    EvalDataset.C4: DatasetSpec(
        local_files=("c4/c4_validation.jsonl", "c4_validation.jsonl", "c4.jsonl",
                     "c4/c4_train_sample1000.jsonl", "c4_train_sample1000.jsonl"),
        joiner=" ",
        hub=("allenai/c4", None, "validation", "text", 1100),
        hub_data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    EvalDataset.TINYSTORIES: DatasetSpec(
        local_files=("tinystories/tinystories_val_head.txt", "tinystories_val_head.txt",
                     "tinystories.txt"),
        joiner="\n\n",
        hub=None),
}


@dataclasses.dataclass(frozen=True)
class EvalText:
  """A joined evaluation text and where it came from (file path or hub id/split)."""
  name: str
  text: str
  source: str


def _read_jsonl(path: pathlib.Path) -> list[str]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          obj = json.loads(line)
          rows.append(obj["text"] if "text" in obj else obj["sentence"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise errors.BadInputError(f"{path}, line {i + 1}: not a JSON object with a "
                                     f"'text' or 'sentence' field ({e})") from e
  return rows


def read_local_text(path: str | pathlib.Path, dataset: EvalDataset | None = None) -> str:
  """One local file as the joined evaluation text.

  Args:
    path: a .jsonl file (key "text" or "sentence" per row) or a plain text file.
    dataset: which corpus it holds (selects the normalisation); None: generic text.

  Returns:
    The text: JSON Lines rows joined with the corpus joiner ("\\n\\n" if generic);
    plain text CRLF-normalised, and for PTB re-joined GPTQ style,
    "\\n\\n".join(line.strip() for line in text.split("\\n")).
  """
  path = pathlib.Path(path)
  if path.suffix == ".jsonl":
    joiner = SPECS[dataset].joiner if dataset is not None else "\n\n"
    return joiner.join(_read_jsonl(path))
  text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
  if dataset is EvalDataset.PTB:
    text = "\n\n".join(line.strip() for line in text.split("\n"))
  return text


def _hub_text(dataset: EvalDataset) -> EvalText:
  spec = SPECS[dataset]
  if spec.hub is None:
    raise errors.MissingInputError(f"{dataset.value} is local only: pass --data_dir")
  try:
    import datasets  # Lazy: not installed on every machine.
  except ImportError as e:
    raise ImportError(f"loading {dataset.value} from the hub needs `datasets`; "
                      "or pass data_dir with local files") from e
  path, name, split, column, max_rows = spec.hub
  kwargs = {"data_files": spec.hub_data_files} if spec.hub_data_files else {}
  data = datasets.load_dataset(path, name, split=split, **kwargs)
  if max_rows is not None:
    data = data.select(range(min(max_rows, len(data))))
  return EvalText(dataset.value, spec.joiner.join(data[column]),
                  f"hub:{path}/{name or ''}:{split}")


def load_eval_text(name: str, data_dir: str | pathlib.Path | None = None) -> EvalText:
  """The evaluation text of a corpus.

  Args:
    name: a corpus name ("wikitext2", "c4", "ptb", "tinystories") or a path to a
      .txt / .raw / .jsonl file (generic text).
    data_dir: directory searched for the corpus' local files (e.g. ../shared/data);
      None: the Hugging Face hub (needs `datasets` and network).

  Returns:
    `EvalText`.

  Raises:
    errors.MissingInputError (a FileNotFoundError): no local file for the corpus in
      `data_dir`.
    errors.UsageError (a ValueError): unknown corpus name.
  """
  if pathlib.Path(name).is_file():
    return EvalText(pathlib.Path(name).stem, read_local_text(name), str(name))
  try:
    dataset = EvalDataset(name.lower())
  except ValueError:
    raise errors.UsageError(f"unknown dataset {name!r}; known: "
                     f"{[d.value for d in EvalDataset]} or a file path") from None
  if data_dir is None:
    return _hub_text(dataset)
  for rel in SPECS[dataset].local_files:
    path = pathlib.Path(data_dir) / rel
    if path.is_file():
      return EvalText(dataset.value, read_local_text(path, dataset), str(path))
  raise errors.MissingInputError(f"no {dataset.value} file in {data_dir}; looked for "
                          f"{list(SPECS[dataset].local_files)}")


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids [L] int32 of the whole text (special tokens as the tokenizer adds them,
  e.g. one BOS for Llama-2 tokenizers, none for SmolLM2)."""
  ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
  return np.asarray(ids, np.int32)


def load_tokenizer(model_dir: str | pathlib.Path):
  """The Hugging Face tokenizer of a model directory (lazy `transformers` import)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(model_dir))


def make_chunks(token_ids: np.ndarray, seq_len: int,
                max_chunks: int | None = None) -> np.ndarray:
  """Non-overlapping chunks [C, seq_len] (the remainder dropped; first `max_chunks`)."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  n = len(token_ids) // seq_len
  if max_chunks is not None:
    n = min(n, max_chunks)
  if n == 0:
    raise ValueError(f"text has {len(token_ids)} tokens, fewer than seq_len={seq_len}")
  return np.asarray(token_ids[:n * seq_len], np.int32).reshape(n, seq_len)


def token_nll(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """Mean next-token NLL per row.

  Args:
    logits: [B, T, V] float.
    input_ids: [B, T] int.

  Returns:
    [B] float32: mean over the T - 1 predictions of -log p(x[t+1] | x[:t+1]).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
  picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  return -jnp.mean(picked, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def chunk_nll(cfg: models.ModelConfig, params, input_ids: jax.Array) -> jax.Array:
  """[B] mean next-token NLL of each chunk [B, T] (one program per precision/shape)."""
  return token_nll(models.forward(cfg, params, input_ids), input_ids)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Perplexity over `len(chunk_nll)` chunks of `seq_len` tokens."""
  ppl: float
  chunk_nll: tuple[float, ...]
  seq_len: int
  total_tokens: int  # Tokens in the whole text (before chunking).

  @property
  def mean_nll(self) -> float:
    return float(np.mean(self.chunk_nll))

  def to_dict(self) -> dict:
    return {"ppl": self.ppl, "mean_nll": self.mean_nll, "num_chunks": len(self.chunk_nll),
            "seq_len": self.seq_len, "total_tokens": self.total_tokens}


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Per-chunk NLL difference of a model and a reference on the same chunks.

  Attributes:
    mean: mean over chunks of nll_model - nll_reference (nats per token).
    stderr: its standard error, std(differences, ddof=1) / sqrt(n) (nan for n = 1).
    n: number of chunks.
  """
  mean: float
  stderr: float
  n: int

  @property
  def ppl_ratio(self) -> float:
    """ppl_model / ppl_reference = exp(mean)."""
    return math.exp(self.mean)

  def to_dict(self) -> dict:
    return {"mean_nll_diff": self.mean, "stderr": self.stderr, "num_chunks": self.n,
            "ppl_ratio": self.ppl_ratio}


def paired_difference(nll, reference) -> PairedDifference:
  """Paired comparison of per-chunk NLLs [C] of a model and a reference.

  Raises:
    ValueError: different or zero numbers of chunks.
  """
  a, b = np.asarray(nll, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"paired chunks must match: {a.shape} vs {b.shape}")
  d = a - b
  se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
  return PairedDifference(float(d.mean()), se, int(d.size))


def _progress(iterable, enabled: bool, desc: str):
  if not enabled:
    return iterable
  try:
    from tqdm import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, desc=desc, leave=False)


def perplexity(nll_fn: Callable[[jax.Array], jax.Array], token_ids: np.ndarray, *,
               seq_len: int = 2048, max_chunks: int | None = None, batch_size: int = 1,
               progress: bool = False, desc: str = "ppl") -> PerplexityResult:
  """GPTQ-style perplexity of a token stream.

  Args:
    nll_fn: input_ids [B, seq_len] -> [B] mean NLL per chunk, e.g.
      `functools.partial(chunk_nll, cfg, params)`.
    token_ids: [L] ids of the whole tokenized text.
    seq_len: chunk length.
    max_chunks: evaluate only the first N chunks; None: all.
    batch_size: chunks per call (the last batch may be smaller).
    progress: show a tqdm bar.
    desc: progress bar label.

  Returns:
    `PerplexityResult` with ppl = exp(mean chunk NLL).
  """
  chunks = make_chunks(token_ids, seq_len, max_chunks)  # [C, T]
  nll: list[float] = []
  starts = range(0, len(chunks), batch_size)
  for s in _progress(starts, progress, desc):
    out = nll_fn(jnp.asarray(chunks[s:s + batch_size]))
    nll.extend(float(v) for v in np.asarray(out))
  return PerplexityResult(ppl=math.exp(float(np.mean(nll))), chunk_nll=tuple(nll),
                          seq_len=seq_len, total_tokens=int(len(token_ids)))


def dense_nll_fn(cfg: models.ModelConfig, params) -> Callable[[jax.Array], jax.Array]:
  """`nll_fn` for a params tree (dense, fake-quantized or holding `AnyPrecWeight`s)."""
  return functools.partial(chunk_nll, cfg, params)
