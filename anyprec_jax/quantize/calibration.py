"""Calibration data for the Fisher pass (defaults of the original release).

Two kinds of sources:
- *documents* (C4, local .jsonl / .json / .parquet with a "text" field): as the
  original, documents are drawn at random without replacement (fixed seed), those with
  fewer than `seq_len` tokens are skipped, and the first `seq_len` tokens of each kept
  document form one sample.
- *running text* (WikiText-2, local .txt / .raw): the text is tokenized whole and
  `num_samples` windows of `seq_len` tokens start at random offsets (GPTQ style), since
  its lines are mostly shorter than a sample.

Hub datasets ("c4", "wikitext2") need the `datasets` package and network access; local
files are read with `datasets` when it is installed and with plain Python otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random

import numpy as np

from anyprec_jax import errors
from anyprec_jax.quantize.config import CalibrationConfig

C4_FILE = "en/c4-train.00000-of-01024.json.gz"
TEXT_KEY = "text"
HUB_DATASETS = ("c4", "wikitext2")  # fixed files of the hub: their names identify them
_DOC_SUFFIXES = (".jsonl", ".json", ".parquet")
_TEXT_SUFFIXES = (".txt", ".raw")


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Loaded calibration text: a list of documents, or one running text."""
  documents: tuple[str, ...] = ()
  running_text: str | None = None


def _import_datasets():
  try:
    import datasets  # noqa: PLC0415 (optional dependency, absent on some machines)
  except ImportError:
    return None
  return datasets


def _hub(name: str) -> TextSource:
  datasets = _import_datasets()
  if datasets is None:
    raise errors.UsageError(
        f"calibration dataset {name!r} needs the `datasets` package (not installed); "
        "pass a local .jsonl / .txt / .parquet file instead")
  try:
    if name == "c4":
      data = datasets.load_dataset("allenai/c4", data_files={"train": C4_FILE},
                                   split="train")
      return TextSource(documents=tuple(data[TEXT_KEY]))
    data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    return TextSource(running_text="\n\n".join(data[TEXT_KEY]))
  except Exception as e:  # noqa: BLE001 (hub errors have many types)
    raise errors.BadInputError(
        f"could not load calibration dataset {name!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}); offline? pass a local file, e.g. "
        "--calibration=/path/to/c4_train_sample.jsonl") from e


def _documents_plain(path: pathlib.Path) -> list[str]:
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # noqa: PLC0415
    return [str(t) for t in pq.read_table(path, columns=[TEXT_KEY]).column(TEXT_KEY)]
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".json" and text.lstrip().startswith("["):
    return [row[TEXT_KEY] for row in json.loads(text)]
  docs = []
  for i, line in enumerate(text.splitlines()):
    if line.strip():
      try:
        docs.append(json.loads(line)[TEXT_KEY])
      except json.JSONDecodeError as e:
        raise errors.BadInputError(f"calibration file {path}, line {i + 1}: not JSON "
                                   f"({e})") from e
  return docs


def _documents(path: pathlib.Path) -> list[str]:
  """The "text" field of every row of a .jsonl / .json / .parquet file."""
  datasets = _import_datasets()
  if datasets is None:
    return _documents_plain(path)
  builder = "parquet" if path.suffix == ".parquet" else "json"
  try:
    data = datasets.load_dataset(builder, data_files=str(path), split="train")
  except Exception as e:  # noqa: BLE001 (datasets' reader errors have many types)
    raise errors.BadInputError(
        f"cannot read calibration file {path} ({type(e).__name__}: {e})",
        hint=f"it must be {builder.upper()} with a {TEXT_KEY!r} field per row") from e
  if TEXT_KEY not in data.column_names:
    raise KeyError(TEXT_KEY)
  return list(data[TEXT_KEY])


def _blank(path: pathlib.Path) -> bool:
  """Whether a file holds nothing but white space (read until the first text)."""
  with open(path, "rb") as f:
    while chunk := f.read(1 << 16):
      if chunk.strip():
        return False
  return True


def _local(path: pathlib.Path) -> TextSource:
  try:
    if path.suffix != ".parquet" and _blank(path):
      raise errors.BadInputError(f"calibration file {path} is empty",
                                 hint="pass a file with text in it to --calibration")
    if path.suffix in _TEXT_SUFFIXES:
      return TextSource(running_text=path.read_text(encoding="utf-8"))
    docs = _documents(path)
  except KeyError as e:
    raise errors.BadInputError(f"calibration file {path} has no {TEXT_KEY!r} field") from e
  except UnicodeDecodeError as e:
    raise errors.BadInputError(f"calibration file {path} is not UTF-8 text ({e})") from e
  if not docs:
    raise errors.BadInputError(f"calibration file {path} holds no documents")
  if not all(isinstance(d, str) for d in docs):
    raise errors.BadInputError(f"calibration file {path}: some {TEXT_KEY!r} fields are "
                               "not strings")
  return TextSource(documents=tuple(docs))


def local_file(dataset: str) -> pathlib.Path | None:
  """The local file of a calibration dataset; None for the hub names.

  Raises:
    errors.MissingInputError: neither a hub name nor an existing file.
    errors.UsageError: an unsupported file type.
  """
  if dataset in HUB_DATASETS:
    return None
  path = pathlib.Path(dataset).expanduser()
  if not path.is_file():
    raise errors.MissingInputError(
        f"calibration dataset {dataset!r} is neither 'c4', 'wikitext2' nor an existing "
        "local file (--calibration)")
  if path.suffix not in _DOC_SUFFIXES + _TEXT_SUFFIXES:
    raise errors.UsageError(f"unsupported calibration file {path} (--calibration must be "
                            f"one of {', '.join(_DOC_SUFFIXES + _TEXT_SUFFIXES)})")
  return path


def load_source(dataset: str) -> TextSource:
  """Loads "c4", "wikitext2" or a local file.

  Raises:
    errors.MissingInputError: neither a hub name nor an existing file.
    errors.BadInputError: an empty or unreadable file, an unreachable hub dataset.
    errors.UsageError: an unsupported file type.
  """
  path = local_file(dataset)
  return _hub(dataset) if path is None else _local(path)


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, verbose=False)["input_ids"])


def sample_documents(docs, tokenizer, cfg: CalibrationConfig) -> np.ndarray:
  """First `seq_len` tokens of random documents with at least `seq_len` tokens."""
  return np.asarray([ids for _, ids in _drawn_documents(docs, tokenizer, cfg)], np.int32)


def document_indices(docs, tokenizer, cfg: CalibrationConfig) -> list[int]:
  """Indices into `docs` of the documents `sample_documents` takes, in sample order."""
  return [i for i, _ in _drawn_documents(docs, tokenizer, cfg)]


def _drawn_documents(docs, tokenizer, cfg: CalibrationConfig) -> list[tuple[int, list[int]]]:
  """(index, first seq_len tokens) of the documents drawn, in draw order."""
  order = random.Random(cfg.seed).sample(range(len(docs)), len(docs))
  taken = []
  for i in order:
    ids = _encode(tokenizer, docs[i])
    if len(ids) >= cfg.seq_len:
      taken.append((i, ids[:cfg.seq_len]))
      if len(taken) == cfg.num_samples:
        return taken
  raise errors.BadInputError(
      f"calibration {cfg.dataset}: only {len(taken)} of {len(docs)} documents have "
      f">= {cfg.seq_len} tokens; {cfg.num_samples} needed",
      hint="lower --num_samples or --seq_len, or use a larger --calibration file")


def sample_windows(text: str, tokenizer, cfg: CalibrationConfig) -> np.ndarray:
  """`num_samples` random windows of `seq_len` tokens of one tokenized text."""
  ids = _encode(tokenizer, text)
  if len(ids) < cfg.seq_len:
    raise errors.BadInputError(
        f"calibration {cfg.dataset}: the text has {len(ids)} tokens < seq_len {cfg.seq_len}",
        hint="lower --seq_len or use a longer --calibration file")
  rng = random.Random(cfg.seed)
  starts = [rng.randint(0, len(ids) - cfg.seq_len) for _ in range(cfg.num_samples)]
  return np.asarray([ids[s:s + cfg.seq_len] for s in starts], np.int32)


def heldout_documents(cfgs: list[CalibrationConfig], tokenizer) -> list[str]:
  """The documents of a document source that none of the calibration sets `cfgs` (the
  same file, e.g. two seeds) takes, in file order: text to evaluate on that the Fisher
  pass has not seen.

  Raises:
    errors.UsageError: the configs name different sources, or a running-text source
      (its windows overlap any split of the text).
  """
  if not cfgs or len({c.dataset for c in cfgs}) != 1:
    raise errors.UsageError("held-out documents need calibration configs of one source, "
                            f"got {sorted({c.dataset for c in cfgs})}")
  source = load_source(cfgs[0].dataset)
  if source.running_text is not None:
    raise errors.UsageError(f"{cfgs[0].dataset}: held-out documents need a document "
                            "source (.jsonl / .json / .parquet), not running text")
  used = set()
  for c in cfgs:
    used.update(document_indices(source.documents, tokenizer, c))
  return [d for i, d in enumerate(source.documents) if i not in used]


def calibration_tokens(cfg: CalibrationConfig, tokenizer) -> np.ndarray:
  """Token ids [num_samples, seq_len] (int32) of the calibration set.

  Args:
    cfg: CalibrationConfig.
    tokenizer: a Hugging Face tokenizer (callable returning "input_ids").

  Returns:
    int32 [num_samples, seq_len].
  """
  source = load_source(cfg.dataset)
  if source.running_text is not None:
    return sample_windows(source.running_text, tokenizer, cfg)
  return sample_documents(source.documents, tokenizer, cfg)
