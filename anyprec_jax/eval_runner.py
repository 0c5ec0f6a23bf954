"""Perplexity of the original model, every any-precision width and the baselines.

The logic behind `scripts/evaluate.py`: enumerate the models to evaluate (lazily, one
in memory at a time), run `evaluation.perplexity` on each corpus, and format one table
(rows: model / method / bits; columns: corpora) plus a JSON-able record that keeps
every chunk's NLL, so rows from different runs can be compared paired
(`format_paired_table`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import re
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

import models
from anyprec_jax import errors, evaluation
from anyprec_jax.allocation import Method
from anyprec_jax.runtime import AnyPrecisionForCausalLM


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One row of the table: a model at one width.

  Attributes:
    label: model name (directory name or hub id).
    method: "original", "anyprec" (fractional bits: the optimal allocation),
      "anyprec-random" (the random equal-bytes allocation), "independent" or "rtn".
    bits: weight bits (the original: its dtype's width; fractional: the average).
    tokenizer_dir: directory with the tokenizer files.
    nll_fn: input_ids [B, T] -> [B] mean NLL.
  """
  label: str
  method: str
  bits: int | float
  tokenizer_dir: pathlib.Path
  nll_fn: Callable


def original_entries(path: str, dtype=jnp.float32) -> Iterator[ModelEntry]:
  """The unquantized model (bits: the width of `dtype`, its weights' dtype here)."""
  model_dir = models.resolve_model_dir(models.resolve_alias(path))
  cfg, params = models.load_pretrained(model_dir, dtype)
  yield ModelEntry(model_dir.name, "original", jnp.dtype(dtype).itemsize * 8, model_dir,
                   evaluation.dense_nll_fn(cfg, params))


def anyprec_entries(path: str, precisions=None, dtype=jnp.float32,
                    allocation: Method = Method.OPTIMAL) -> Iterator[ModelEntry]:
  """Every precision of one any-precision checkpoint (loaded once); fractional ones
  with the `allocation` method (method label "anyprec", or "anyprec-random")."""
  model = AnyPrecisionForCausalLM.from_quantized(path, precisions, dtype,
                                                 allocation=allocation)
  method = "anyprec" if allocation is Method.OPTIMAL else f"anyprec-{allocation.value}"
  for b in model.supported_precisions:
    yield ModelEntry(model.model_dir.name, method, b, model.model_dir, model.nll_fn(b))


def interpolated_rows(rows: list[dict], datasets: Sequence[str],
                      method: str = "anyprec") -> list[dict]:
  """Straight-line rows at each fractional precision of `method`'s rows.

  At B between the integer widths lo < hi of the same model (evaluated on the same
  chunks), every chunk's NLL is (hi - B) NLL_lo + (B - lo) NLL_hi (so the perplexity
  is the geometric interpolation, below the linear one: the stricter baseline).

  Returns:
    rows labelled method "interpolated", one per fractional row with both neighbours.
  """
  out = []
  for r in rows:
    b = r["bits"]
    if r["method"] != method or float(b).is_integer():
      continue
    lo, hi = math.floor(b), math.ceil(b)
    ends = [next((q for q in rows if q["method"] == method and q["model"] == r["model"]
                  and q["bits"] == w), None) for w in (lo, hi)]
    if None in ends:
      continue
    results = {}
    for d in datasets:
      a, c = (e["results"].get(d) for e in ends)
      if a is None or c is None or a.get("chunks_sha1") != c.get("chunks_sha1"):
        continue
      nll = (hi - b) * np.asarray(a["chunk_nll"]) + (b - lo) * np.asarray(c["chunk_nll"])
      mean = float(nll.mean())
      results[d] = {"ppl": math.exp(mean), "mean_nll": mean, "num_chunks": len(nll),
                    "chunk_nll": nll.tolist(), "chunks_sha1": a["chunks_sha1"],
                    "source": a.get("source")}
    if results:
      out.append({"model": r["model"], "method": "interpolated", "bits": b,
                  "results": results})
  return out


def _baseline_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  """`path` itself when it is one baseline model, else its `w{b}` subdirectories."""
  if (path / "config.json").is_file():
    return [path]
  found = [d for d in path.iterdir() if re.fullmatch(r"w\d+", d.name) and d.is_dir()]
  if not found:
    raise errors.MissingInputError(f"no config.json and no w{{b}}/ directories in {path} "
                                   "(--baselines)")
  return sorted(found, key=lambda d: int(d.name[1:]))


def baseline_entries(path: str, dtype=jnp.float32) -> Iterator[ModelEntry]:
  """Fake-quantized baselines (`--method=independent|rtn` output), one per width."""
  if not pathlib.Path(path).is_dir():
    raise errors.MissingInputError(f"{path} is not a directory (--baselines)")
  for d in _baseline_dirs(pathlib.Path(path)):
    meta = models.hf_loader.read_hf_config(d).get("anyprec") or {}
    cfg, params = models.load_pretrained(d, dtype)
    bits = int(meta.get("bits", d.name[1:] if d.name[1:].isdigit() else 0))
    yield ModelEntry(d.parent.name if d.name.startswith("w") else d.name,
                     str(meta.get("method", "baseline")), bits, d,
                     evaluation.dense_nll_fn(cfg, params))
    del params


def _tokenizer_key(model_dir: pathlib.Path) -> str:
  path = pathlib.Path(model_dir) / "tokenizer.json"
  if path.is_file():
    return hashlib.sha1(path.read_bytes()).hexdigest()
  return str(model_dir)


class TokenCache:
  """Tokenized corpora, shared by models with the same tokenizer."""

  def __init__(self, data_dir=None):
    self.data_dir = data_dir
    self._ids: dict[tuple[str, str], tuple[np.ndarray, str]] = {}

  def get(self, model_dir: pathlib.Path, name: str) -> tuple[np.ndarray, str]:
    """(token ids [L], source description) of corpus `name` for this model's tokenizer."""
    key = (_tokenizer_key(model_dir), name)
    if key not in self._ids:
      text = evaluation.load_eval_text(name, self.data_dir)
      tok = evaluation.load_tokenizer(model_dir)
      self._ids[key] = (evaluation.tokenize(tok, text.text), text.source)
    return self._ids[key]


def evaluate_entries(entries: Iterator[ModelEntry], datasets: Sequence[str], *,
                     data_dir=None, seq_len: int = 2048, max_chunks: int | None = None,
                     batch_size: int = 1, progress: bool = True) -> list[dict]:
  """Perplexity of every entry on every corpus.

  Args:
    entries: models to evaluate (consumed lazily).
    datasets: corpus names or file paths.
    data_dir, seq_len, max_chunks, batch_size, progress: see `evaluation.perplexity`.

  Returns:
    [{"model", "method", "bits", "results": {dataset: {ppl, mean_nll, ...}}}].
  """
  cache = TokenCache(data_dir)
  rows = []
  for e in entries:
    results = {}
    for name in datasets:
      ids, source = cache.get(e.tokenizer_dir, name)
      res = evaluation.perplexity(e.nll_fn, ids, seq_len=seq_len, max_chunks=max_chunks,
                                  batch_size=batch_size, progress=progress,
                                  desc=f"{e.method} {e.bits}b {name}")
      chunks = evaluation.make_chunks(ids, seq_len, max_chunks)
      results[name] = {**res.to_dict(), "source": source, "chunk_nll": list(res.chunk_nll),
                       "chunks_sha1": hashlib.sha1(chunks.tobytes()).hexdigest()[:16]}
    rows.append({"model": e.label, "method": e.method, "bits": e.bits,
                 "results": results})
    if progress:
      print(format_table(rows[-1:], datasets, header=not rows[:-1]), flush=True)
  return rows


def format_table(rows: list[dict], datasets: Sequence[str], header: bool = True) -> str:
  """Markdown table: one row per model/method/bits, one ppl column per corpus."""
  lines = []
  if header:
    lines += ["| model | method | bits | " + " | ".join(datasets) + " |",
              "|---|---|---:|" + "---:|" * len(datasets)]
  for r in rows:
    cells = [f"{r['results'][d]['ppl']:.3f}" if d in r["results"] else "-"
             for d in datasets]
    lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def _is_reference(row: dict, reference: str) -> bool:
  return row["method"] == reference or row["model"] == reference


def paired_rows(rows: list[dict], datasets: Sequence[str], reference: str) -> list[dict]:
  """Paired differences of every row against a reference row on the same chunks.

  Args:
    rows: `evaluate_entries` rows (with "chunk_nll").
    datasets: corpora to compare.
    reference: "original" (the one unquantized row), or a method / model label whose
      row of the *same bits* is the reference (e.g. "squeezellm").

  Returns:
    [{"model", "method", "bits", "reference", "paired": {dataset: PairedDifference
    dict}}] for every row that has a reference row and is not one.

  Raises:
    ValueError: a row and its reference were evaluated on different chunks.
  """
  out = []
  for r in rows:
    if _is_reference(r, reference):
      continue
    refs = [q for q in rows if _is_reference(q, reference) and
            (reference == "original" or q["bits"] == r["bits"])]
    if not refs:
      continue
    ref = refs[0]
    paired = {}
    for d in datasets:
      if d not in r["results"] or d not in ref["results"]:
        continue
      a, b = r["results"][d], ref["results"][d]
      if a.get("chunks_sha1") != b.get("chunks_sha1"):
        raise ValueError(f"{r['model']} {r['bits']}b and {ref['model']} were evaluated "
                         f"on different {d} chunks")
      paired[d] = evaluation.paired_difference(a["chunk_nll"], b["chunk_nll"]).to_dict()
    out.append({"model": r["model"], "method": r["method"], "bits": r["bits"],
                "reference": f"{ref['model']} ({ref['method']} {ref['bits']}b)",
                "paired": paired})
  return out


def format_paired_table(rows: list[dict], datasets: Sequence[str], reference: str) -> str:
  """Markdown: ppl change vs the reference, and mean NLL difference +- standard error."""
  lines = [f"| model | method | bits | " + " | ".join(
               f"{d}: ppl vs {reference}, dNLL +- se" for d in datasets) + " |",
           "|---|---|---:|" + "---:|" * len(datasets)]
  for p in paired_rows(rows, datasets, reference):
    cells = []
    for d in datasets:
      q = p["paired"].get(d)
      cells.append("-" if q is None else
                   f"{100 * (q['ppl_ratio'] - 1):+.2f}% ({q['mean_nll_diff']:+.4f} "
                   f"+- {q['stderr']:.4f})")
    lines.append(f"| {p['model']} | {p['method']} | {p['bits']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def fractional_table(rows: list[dict], dataset: str, method: str = "anyprec",
                     baselines: Sequence[str] = ("interpolated", "anyprec-random")) -> str:
  """Markdown: `method`'s perplexity at every width it was evaluated at (integer:
  uniform; fractional: allocated), each baseline's at the same bits, and the paired
  change of `method` against each (same chunks; +- 1 s.e. in % of ppl)."""
  paired = {ref: {p["bits"]: p["paired"].get(dataset) for p in
                  paired_rows(rows, [dataset], ref) if p["method"] == method}
            for ref in baselines}
  ppl = {(r["method"], r["bits"]): r["results"][dataset]["ppl"] for r in rows
         if dataset in r["results"]}
  lines = [f"| bits | {method} | " + " | ".join(baselines) + " | " +
           " | ".join(f"{method} vs {b}" for b in baselines) + " |",
           "|---:|" + "---:|" * (1 + 2 * len(baselines))]
  for bits in sorted(b for m, b in ppl if m == method):
    cells = [f"{ppl[method, bits]:.3f}"]
    cells += [f"{ppl[b, bits]:.3f}" if (b, bits) in ppl else "" for b in baselines]
    for b in baselines:
      q = paired[b].get(bits)
      cells.append("" if q is None else
                   f"{100 * (q['ppl_ratio'] - 1):+.2f} +- {100 * q['stderr']:.2f}%")
    lines.append(f"| {bits} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
