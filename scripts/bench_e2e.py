"""End-to-end decode throughput: dense baseline vs any-precision 3..8 bits, one run.

  PYTHONPATH=. python3 scripts/bench_e2e.py                      # Llama-2-7B shape, GPU
  PYTHONPATH=. python3 scripts/bench_e2e.py --shape=llama-3-8b --batch=8
  PYTHONPATH=. python scripts/bench_e2e.py --shape=tiny --new_tokens=16   # CPU smoke test
  PYTHONPATH=. python3 scripts/bench_e2e.py --decode_graphs=all,auto   # same-run A/B
  PYTHONPATH=. python3 scripts/bench_e2e.py --precisions=3,3.25,3.5,3.75,4 \
      --output_md=benchmarks/results/e2e_fractional.md   # fractional precisions

A fractional precision (3.5) runs a random allocation at that byte budget (a random set
of weights at ceil, the rest at floor: `latency.at_precision`); its speed depends on the
bytes read, not on which layers get the wider codes.

`ANYPREC_GPU_BACKEND=triton|mosaic` forces the GEMV lowering (default: Mosaic GPU on
compute capability >= 9.0).

Random weights built on device (no checkpoint): `--batch` sequences, `--prompt_len` prompt tokens,
`--new_tokens` generated with the decode loop in one jitted program. Prints a table last
and writes it as markdown (device, date, jax version, command) to `--output_md`.
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

from anyprec_jax import latency, ops, runtime
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax.pallas import backend as pallas_backend

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

_SHAPE = flags.DEFINE_enum("shape", "llama-2-7b", [s.value for s in latency.Shape],
                           "Model shape.")
_LAYERS = flags.DEFINE_integer("layers", None, "Override the number of layers.")
_PRECISIONS = flags.DEFINE_list("precisions", ["3", "4", "5", "6", "7", "8"],
                                "Bits (fractional: a random allocation at that budget).")
_JSON = flags.DEFINE_string("output_json", None, "Also write the rows as JSON (for "
                            "scripts/plot_fractional.py).")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Generated tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(_DTYPES), "Baseline / activation dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per model (median).")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", "format", "tc", "tc_tiled"],
                            "Bit order of the planes (auto: tc where the Mosaic GPU "
                            "kernels run, as from_quantized does).")
_BACKEND = flags.DEFINE_enum("backend", "auto", [b.value for b in ops.Backend],
                             "Kernel backend of the quantized linears.")
_FUSE = flags.DEFINE_bool("fuse", True, "Any-precision q/k/v stored fused (one GEMV "
                          "launch), as from_quantized loads them.")
_FUSE_MLP = flags.DEFINE_bool("fuse_mlp", True, "Also fuse gate/up, as loading does.")
_GRAPHS = flags.DEFINE_list(
    "decode_graphs", [], "Decode command-buffer modes (all, no_custom_calls, auto) to "
    "time every model under, in this run (default: ANYPREC_DECODE_GRAPHS's one).")
_COPY = flags.DEFINE_integer("copy_mb", None, "Measure the copy bandwidth over buffers of "
                             "this many MB for the '% copy' column (default: 1024 on a "
                             "GPU, 64 elsewhere; 0: skip).")
_OUTPUT = flags.DEFINE_string("output_md", "benchmarks/results/e2e.md",
                              "Markdown output ('' to skip).")


def main(argv):
  del argv
  cfg = latency.shape_config(latency.Shape(_SHAPE.value), _LAYERS.value)
  layout = (runtime.default_layout() if _LAYOUT.value == "auto"
            else PlaneLayout(_LAYOUT.value))
  copy_mb = _COPY.value if _COPY.value is not None else (
      1024 if jax.default_backend() == "gpu" else 64)
  copy = None
  if copy_mb:  # the kernel benchmarks' copy case and timing rule
    from anyprec_jax.pallas import benchmark as bm
    copy = bm.time_case(bm.copy_case(copy_mb << 20), samples=10)["tbps"]
  with ops.use_backend(_BACKEND.value):
    rows = latency.bench_e2e(cfg, cli.parse_precisions(_PRECISIONS.value, "--precisions"),
                             prompt_len=_PROMPT.value, new_tokens=_NEW.value,
                             dtype=_DTYPES[_DTYPE.value], repeats=_REPEATS.value,
                             batch=_BATCH.value, layout=layout, fuse=_FUSE.value,
                             fuse_mlp=_FUSE_MLP.value,
                             graph_modes=_GRAPHS.value or (None,), copy_tbps=copy)
  table = latency.latency_table(rows)
  device = jax.devices()[0]
  with ops.use_backend(_BACKEND.value):
    backend = ops.get_backend().value
  header = (f"device: {getattr(device, 'device_kind', device.platform)} "
            f"({device.platform}); date: {datetime.date.today().isoformat()}; "
            f"jax {jax.__version__}; kernel backend: {backend} (Mosaic GPU kernels: "
            f"{pallas_backend.mosaic_available()}; planes: {layout.value} order; fused "
            f"q/k/v: {_FUSE.value}; fused gate/up: {_FUSE_MLP.value}; decode graphs: "
            f"{','.join(_GRAPHS.value) or pallas_backend.decode_graphs().value})\n"
            f"shape: {_SHAPE.value}, layers {cfg.num_layers}; batch {_BATCH.value}, prompt "
            f"{_PROMPT.value} tokens, {_NEW.value} new tokens; median of {_REPEATS.value} "
            "runs after a warm-up; decode ms/token excludes prefill; speed-up = decode "
            "tokens/s over the dense baseline; MB/step = what a decode step must read "
            "(weights at the width: planes + LUT; dense leaves; K and V at the mean "
            f"context of {_PROMPT.value + _NEW.value / 2:g} positions), TB/s = MB/step "
            "per decode step time"
            + (f", % copy = TB/s over the copy bandwidth measured in this run "
               f"({copy:.3g} TB/s)" if copy else "") + ".\n"
            f"command: `{' '.join(['python3'] + sys.argv)}`")
  print("\n" + header + "\n\n" + table)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps({"header": header, "rows": rows},
                                                    indent=1))
  if _OUTPUT.value:
    path = pathlib.Path(_OUTPUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# End-to-end decode throughput\n\n" + header.replace("\n", "\n\n")
                    + "\n\n" + table + "\n")


if __name__ == "__main__":
  cli.run(main)
