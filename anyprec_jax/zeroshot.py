"""Zero-shot accuracy of the original model and every width of one checkpoint.

The logic behind `scripts/zeroshot.py`: each model (the dense original, then every
precision of an any-precision checkpoint, loaded once and shared) is wrapped in the
lm_eval model `anyprec` and run through `lm_eval.simple_evaluate` on the same tasks;
the rows hold every metric lm_eval reports (acc, acc_norm, ... with their standard
errors), and `format_table` prints them as one table (the paper's Table 2 layout:
rows model / bits, columns task metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from anyprec_jax import lm_scoring


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
  """What to run on every model.

  Attributes:
    tasks: lm_eval task (or group) names.
    include_path: directory of extra task YAMLs (e.g. tests/data/lm_eval_tasks).
    include_defaults: also index lm_eval's own tasks (about 10 s on start-up).
    num_fewshot: examples in each prompt; None: the task's default (0 for these).
    limit: first N documents of each task (a float < 1: that fraction); None: all.
    batch_size: rows per forward / generate call.
    max_length: context limit; None: the model's.
  """
  tasks: tuple[str, ...]
  include_path: str | None = None
  include_defaults: bool = True
  num_fewshot: int | None = None
  limit: float | None = None
  batch_size: int = 8
  max_length: int | None = None


def model_entries(quantized: str | None = None, precisions: Sequence[int] | None = None,
                  original: str | None = None, dtype=None
                  ) -> Iterator[lm_scoring.EvalModel]:
  """The original model (if given), then each precision of `quantized` (loaded once)."""
  if original:
    yield lm_scoring.load(original, None, dtype)
  if quantized:
    from anyprec_jax.runtime import AnyPrecisionForCausalLM, default_dtype
    model = AnyPrecisionForCausalLM.from_quantized(
        quantized, precisions, default_dtype() if dtype is None else dtype)
    for b in model.supported_precisions:
      yield lm_scoring.from_anyprec(model, b)


def _metrics(task_result: dict) -> dict[str, float]:
  """{"acc": ..., "acc_stderr": ...} from lm_eval's {"acc,none": ..., ...}."""
  out = {}
  for key, value in task_result.items():
    metric, _, filt = key.partition(",")
    if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
      out[metric] = float(value)
  return out


def evaluate(entries: Iterator[lm_scoring.EvalModel], config: ZeroShotConfig,
             progress: bool = True) -> list[dict]:
  """Runs every task on every model.

  Args:
    entries: models (consumed lazily).
    config: tasks and options.
    progress: print each model's row when it is done.

  Returns:
    [{"model", "method", "bits", "results": {task: {metric: value}},
      "samples": {task: number of documents}}].
  """
  import lm_eval
  from lm_eval.tasks import TaskManager
  from anyprec_jax.lm_eval_adapter import AnyPrecLM
  manager = TaskManager(include_path=config.include_path,
                        include_defaults=config.include_defaults)
  rows = []
  for entry in entries:
    lm = AnyPrecLM(model=entry, batch_size=config.batch_size,
                   max_length=config.max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(config.tasks),
                                  num_fewshot=config.num_fewshot, limit=config.limit,
                                  task_manager=manager)
    rows.append({"model": entry.label, "method": entry.method, "bits": entry.bits,
                 "results": {t: _metrics(r) for t, r in out["results"].items()},
                 "samples": {t: r["sample_len"] for t, r in out["results"].items()
                             if "sample_len" in r}})
    if progress:
      print(format_table(rows[-1:], config.tasks, header=not rows[:-1]), flush=True)
  return rows


def _columns(rows: list[dict], tasks: Sequence[str]) -> list[tuple[str, str]]:
  cols = []
  for task in tasks:
    names = []
    for r in rows:
      for m in r["results"].get(task, {}):
        if not m.endswith("_stderr") and m not in names:
          names.append(m)
    cols += [(task, m) for m in names]
  return cols


def format_table(rows: list[dict], tasks: Sequence[str], header: bool = True) -> str:
  """Markdown: one row per model / bits, one column per task metric, in percent
  with the standard error (e.g. `55.00 +- 11.41`)."""
  cols = _columns(rows, tasks)
  lines = []
  if header:
    lines += ["| model | method | bits | " + " | ".join(f"{t} {m}" for t, m in cols)
              + " |", "|---|---|---:|" + "---:|" * len(cols)]
  for r in rows:
    cells = []
    for task, m in cols:
      res = r["results"].get(task, {})
      if m not in res:
        cells.append("-")
        continue
      se = res.get(f"{m}_stderr")
      cells.append(f"{100 * res[m]:.2f}" + ("" if se is None else f" +- {100 * se:.2f}"))
    lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)
