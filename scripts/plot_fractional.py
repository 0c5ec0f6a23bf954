r"""Table and PNG of fractional precisions: allocated vs straight line vs random.

  python scripts/plot_fractional.py --inputs_json=eval_optimal.json,eval_random.json \
      [--latency_json=e2e_fractional.json] --output_png=benchmarks/results/fractional.png

Reads `scripts/evaluate.py --output_json` files (the any-precision rows at integer and
fractional precisions, `--allocation=random` rows) and optionally a
`scripts/bench_e2e.py --output_json` file; adds the straight-line rows
(`eval_runner.interpolated_rows`), prints the markdown table
(`eval_runner.fractional_table`) and writes the PNG: perplexity (and decode ms/token,
if given) against average bits.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from anyprec_jax import cli

_INPUTS = flags.DEFINE_list("inputs_json", None, "evaluate.py JSON files.", required=True)
_LATENCY = flags.DEFINE_string("latency_json", None, "bench_e2e.py JSON file.")
_DATASET = flags.DEFINE_string("dataset", "wikitext2", "Corpus to report.")
_PNG = flags.DEFINE_string("output_png", None, "PNG to write (needs matplotlib).")


def main(argv):
  del argv
  from anyprec_jax import eval_runner, latency  # noqa: PLC0415 (after cli start-up)
  rows = []
  for path in _INPUTS.value:
    rows += json.loads(pathlib.Path(path).read_text())["rows"]
  rows += eval_runner.interpolated_rows(rows, [_DATASET.value])
  print(eval_runner.fractional_table(rows, _DATASET.value))
  if _PNG.value:
    lat = ([] if _LATENCY.value is None else
           json.loads(pathlib.Path(_LATENCY.value).read_text())["rows"])
    latency.plot_latency_and_ppl(lat, {"rows": [r for r in rows if r["bits"] < 16]},
                                 _PNG.value, _DATASET.value)


if __name__ == "__main__":
  cli.run(main)
