"""Self-speculative decoding on random weights: per-round costs and decode tokens/s.

  PYTHONPATH=. python3 scripts/bench_speculative.py                       # 7B shape, GPU
  PYTHONPATH=. python3 scripts/bench_speculative.py --acceptance_json=acc.json
  PYTHONPATH=. python3 scripts/bench_speculative.py --shape=tiny --new_tokens=16 \
      --e2e_pairs=3:2 --num_draft=2 --output_md=''                        # CPU smoke test

Three tables:
  1. costs: one cached forward of M tokens per sequence (jitted loop of --repeats
     forwards, median of --timed_runs): the target at M = 1 (a plain decode step) and
     M = k + 1 (a verify), each draft precision at M = 1 and 2 (draft steps);
  2. the modelled round cost draft(2) + (k - 1) draft(1) + verify(k + 1), the break-even
     tokens per round, and with --acceptance_json (scripts/speculative_acceptance.py
     --output_json on a real checkpoint) the modelled speed-up at the measured
     acceptance;
  3. end to end: plain decoding at --target vs speculative for each --e2e_pairs
     draft:k, timed like bench_e2e.py. Random weights make the draft agree with the
     target far less than a real checkpoint does, so read its tokens/round with it.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import flags

from anyprec_jax import cli

from anyprec_jax import latency, ops, runtime, speculative_bench
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax.weight import set_precision

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_SHAPE = flags.DEFINE_enum("shape", "llama-2-7b", [s.value for s in latency.Shape],
                           "Model shape.")
_LAYERS = flags.DEFINE_integer("layers", None, "Override the number of layers.")
_TARGET = flags.DEFINE_integer("target", 8, "Verifying precision.")
_DRAFTS = flags.DEFINE_list("drafts", ["3", "4", "5"], "Draft precisions.")
_NUM_DRAFT = flags.DEFINE_list("num_draft", [str(k) for k in range(1, 8)],
                               "Values of k for the verify costs and the model.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Cache slots before the timed tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 16, "Forwards per timed call.")
_TIMED_RUNS = flags.DEFINE_integer("timed_runs", 3, "Timed calls (median).")
_PAIRS = flags.DEFINE_list("e2e_pairs", ["3:4", "4:4", "4:6"],
                           "draft:k pairs timed end to end ('' for none).")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "End to end: prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "End to end: generated tokens.")
_E2E_REPEATS = flags.DEFINE_integer("e2e_repeats", 2, "End to end: timed runs (median).")
_ACCEPTANCE = flags.DEFINE_string("acceptance_json", "",
                                  "speculative_acceptance.py --output_json rows.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(_DTYPES), "Activation dtype.")
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", "format", "tc"],
                            "Bit order of the planes (auto: as from_quantized).")
_BACKEND = flags.DEFINE_enum("backend", "auto", [b.value for b in ops.Backend],
                             "Kernel backend of the quantized linears.")
_OUTPUT = flags.DEFINE_string("output_md", "benchmarks/results/speculative_bench.md",
                              "Markdown output ('' to skip).")


def main(argv):
  del argv
  cfg = latency.shape_config(latency.Shape(_SHAPE.value), _LAYERS.value)
  drafts, ks = [int(b) for b in _DRAFTS.value], [int(k) for k in _NUM_DRAFT.value]
  pairs = [tuple(int(x) for x in p.split(":")) for p in _PAIRS.value if p]
  precisions = sorted(set(drafts) | {b for b, _ in pairs} | {_TARGET.value})
  dtype = _DTYPES[_DTYPE.value]
  layout = (runtime.default_layout() if _LAYOUT.value == "auto"
            else PlaneLayout(_LAYOUT.value))
  quant = latency.random_anyprec_params(cfg, latency.random_dense_params(cfg, dtype),
                                        precisions, layout=layout)
  params_at = lambda b: set_precision(quant, b)
  tau = None
  if _ACCEPTANCE.value:
    rows = json.loads(pathlib.Path(_ACCEPTANCE.value).read_text())
    tau = {(r["draft"], r["k"]): r["tokens_per_round"] for r in rows
           if r["target"] == _TARGET.value}
  with ops.use_backend(_BACKEND.value):
    costs = speculative_bench.round_costs(
        cfg, params_at, target=_TARGET.value, drafts=drafts, num_drafts=ks,
        batch=_BATCH.value, context=_CONTEXT.value, repeats=_REPEATS.value,
        timed_runs=_TIMED_RUNS.value, dtype=dtype)
    e2e = speculative_bench.bench_decode(
        cfg, params_at, target=_TARGET.value, pairs=pairs, prompt_len=_PROMPT.value,
        new_tokens=_NEW.value, batch=_BATCH.value, repeats=_E2E_REPEATS.value)
    backend = ops.get_backend().value
  cost_lines = ["| forward | M | ms |", "|---|---:|---:|",
                f"| target {_TARGET.value} (plain step) | 1 | {costs['plain']:.3f} |"]
  cost_lines += [f"| target {_TARGET.value} (verify, k = {k}) | {k + 1} | {ms:.3f} |"
                 for k, ms in costs["verify"].items()]
  cost_lines += [f"| draft {b} | {m} | {ms:.3f} |" for b, d in costs["draft"].items()
                 for m, ms in d.items()]
  device = jax.devices()[0]
  header = (f"device: {getattr(device, 'device_kind', device.platform)} "
            f"({device.platform}); date: {datetime.date.today().isoformat()}; "
            f"jax {jax.__version__}; kernel backend: {backend}; planes: {layout.value} "
            f"order; dtype {jnp.dtype(dtype).name}\n"
            f"shape: {_SHAPE.value}, layers {cfg.num_layers}; batch {_BATCH.value}; costs "
            f"after {_CONTEXT.value} cached slots, {_REPEATS.value} forwards per call, "
            f"median of {_TIMED_RUNS.value}; end to end: prompt {_PROMPT.value}, "
            f"{_NEW.value} new tokens, median of {_E2E_REPEATS.value} after a warm-up\n"
            f"command: `{' '.join(['python3'] + sys.argv)}`")
  body = ("## Per-forward costs\n\n" + "\n".join(cost_lines)
          + "\n\n## Round model\n\n" + speculative_bench.projection_table(
              costs, drafts=drafts, num_drafts=ks, tokens_per_round=tau)
          + "\n\n## End to end (random weights)\n\n"
          + speculative_bench.decode_table(e2e, _TARGET.value))
  print("\n" + header + "\n\n" + body)
  if _OUTPUT.value:
    speculative_bench.write_report(
        _OUTPUT.value, "Self-speculative decoding: per-round costs and decode speed",
        header, body)


if __name__ == "__main__":
  cli.run(main)
