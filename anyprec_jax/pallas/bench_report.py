"""Runs the kernel benchmark plan (tile sweep, then the table) and formats the report.

Kept apart from `benchmark.py` (cases and timing) so each stays small; the entry point
is `scripts/bench_kernels.py`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax

from anyprec_jax.pallas import benchmark as bm
from anyprec_jax.pallas.triton import decode

SWEEP_SHAPE = bm.SHAPES[0]
# (block_n, block_w, num_warps) candidates at M = 1 (sweep on the 4096 x 4096 shape).
SWEEP_TILES = ((16, 32, 4), (32, 32, 4), (64, 32, 8), (32, 64, 8), (16, 128, 4))


def sweep_cases(bits_list) -> list[bm.Case]:
  cases = []
  for bits in bits_list:
    for tiles in SWEEP_TILES:
      cases.append(bm.gemv_case(SWEEP_SHAPE, bits, 1, tiles=tiles))
    if bits <= 4:  # the gather path as a variant at low widths
      cases.append(bm.gemv_case(SWEEP_SHAPE, bits, 1, tiles=(16, 32, 4),
                                lookup=decode.Lookup.GATHER))
  return cases


def best_tiles(results: dict, bits: int):
  """Fastest correct register/default-lookup tiles of the sweep for `bits`."""
  best = None
  for key, res in results.items():
    if key[0] != "gemv" or key[2] != bits or key[5:] != (None, None, None):
      continue
    if res["err"] is None or res["err"] > 1e-3:
      continue
    if best is None or res["us"] < best[1]:
      best = (key[4], res["us"])
  return None if best is None else best[0]


# (prefetch, num_stages) variants of the GEMV timed by `variant_cases`.
VARIANTS = ((True, None), (False, None), (False, 3))


def variant_cases(shapes, bits_list, ms) -> list[bm.Case]:
  """fp16 and every `VARIANTS` entry per shape, width and M (tuned tiles)."""
  cases = []
  for shape in shapes:
    for m in ms:
      cases.append(bm.fp16_case(shape, m))
      for bits in bits_list:
        for prefetch, stages in VARIANTS:
          cases.append(bm.gemv_case(shape, bits, m, prefetch=prefetch, stages=stages))
  return cases


def format_variants(results, shapes, bits_list, ms) -> str:
  """µs of each variant and its speed-up over fp16, one row per shape / M / width."""
  names = [f"prefetch={p}, stages={s or 1}" for p, s in VARIANTS]
  lines = ["| shape | M | b | fp16 µs | " + " | ".join(names) + " | best |",
           "|---|---|---|---|" + "---|" * (len(names) + 1)]
  for shape in shapes:
    for m in ms:
      base = results.get(("fp16", shape.name, m), {}).get("us", float("nan"))
      for bits in bits_list:
        cells, best = [], None
        for (p, s), name in zip(VARIANTS, names):
          res = results.get(("gemv", shape.name, bits, m, None, None, p, s), {})
          us, ok = res.get("us", float("nan")), (res.get("err") or 0) <= 1e-3
          cells.append(f"{us:.1f} ({base / us:.2f}×)" + ("" if ok else " WRONG"))
          if ok and us == us and (best is None or us < best[0]):
            best = (us, name)
        lines.append(f"| {shape.name} | {m} | {bits} | {base:.1f} | " + " | ".join(cells)
                     + f" | {best[1] if best else '-'} |")
  return "\n".join(lines)


def table_cases(shapes, bits_list, ms, tiles_by_bits) -> list[bm.Case]:
  cases = []
  for shape in shapes:
    for m in ms:
      cases.append(bm.fp16_case(shape, m))
      for bits in bits_list:
        cases.append(bm.gemv_case(shape, bits, m, tiles=tiles_by_bits.get(bits)))
  return cases


def run_cases(cases, results: dict, log, *, samples: int = 25, gpu_time: bool = False,
              threads: int = 8) -> None:
  """Compiles `cases` ahead (in threads), then checks and times each into `results`
  (`bm.time_case`); a case that fails is reported and the others go on."""
  t0 = time.time()
  bm.compile_all(cases, threads=threads)
  log(f"compiled {len(cases)} programs in {time.time() - t0:.0f} s")
  for case in cases:
    try:
      results[case.key] = bm.time_case(case, samples=samples, gpu_time=gpu_time)
    except Exception as e:  # noqa: BLE001 - report and go on with the others
      results[case.key] = dict(us=float("nan"), err=float("inf"), error=repr(e)[:300])
    case.compiled = None
    log(f"{case.key}: {results[case.key]}")


def format_table(results, shapes, bits_list, ms, copy_tbps, tiles_by_bits) -> str:
  lines = []
  for shape in shapes:
    lines += [f"\n### {shape.name}: N={shape.n} (out), K={shape.k} (in)\n",
              "| b | M | µs | TB/s | % copy BW | fp16 µs | speed-up | target (paper) "
              "| goal 0.85·16/b | max rel err | tiles |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
      base = results.get(("fp16", shape.name, m), {})
      lines.append(f"| fp16 | {m} | {base.get('us', float('nan')):.1f} "
                   f"| {base.get('tbps', float('nan')):.2f} "
                   f"| {100 * base.get('tbps', float('nan')) / copy_tbps:.0f} | | | | | | |")
      for bits in bits_list:
        tiles = tiles_by_bits.get(bits)
        res = results.get(("gemv", shape.name, bits, m, tiles, None, None, None), {})
        us = res.get("us", float("nan"))
        speed = base.get("us", float("nan")) / us
        lines.append(
            f"| {bits} | {m} | {us:.1f} | {res.get('tbps', float('nan')):.2f} "
            f"| {100 * res.get('tbps', float('nan')) / copy_tbps:.0f} "
            f"| {base.get('us', float('nan')):.1f} | {speed:.2f}× "
            f"| {bm.PAPER_SPEEDUP[bits]:.2f}× | {0.85 * 16 / bits:.2f}× "
            f"| {res.get('err', float('nan')):.1e} | {tiles or 'default'} |")
  return "\n".join(lines)


def header(command: str, copy_tbps: float) -> str:
  dev = jax.devices()[0]
  return (f"device: {dev.device_kind} ({jax.default_backend()}), date: "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}, jax {jax.__version__},"
          f" python {platform.python_version()}\n\ncommand: `{command}`\n\n"
          f"copy bandwidth (x+1 over 1 GiB uint32, read+write): {copy_tbps:.2f} TB/s\n\n"
          f"timing: median of 25 samples x {bm.PIPELINE} pipelined calls, each over R "
          f"distinct weights and activations (R*bytes >= {bm.MIN_BYTES / 1e6:.0f} MB);"
          f" bytes = planes read + LUT + x + y.\n")


def save(out_dir: str, name: str, text: str, results: dict) -> None:
  if not out_dir:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, name + ".md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, name + ".json"), "w") as f:
    json.dump({repr(k): v for k, v in results.items()}, f, indent=1)
