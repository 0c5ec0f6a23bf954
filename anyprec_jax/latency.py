"""Generation latency: timing helpers, random-weight models, plots.

Used by `scripts/demo.py` (real checkpoints) and `scripts/bench_e2e.py` (a
Llama-2-7B-shaped model with random weights built on device; Park et al., 2024, §5.3
measure end-to-end decode throughput the same way: batch 1, tokens/s).

Timing protocol: one warm-up call compiles prefill and the decode loop (excluded), then
`repeats` timed calls; the median is reported. Decode time covers the on-device loop
that produces tokens 2..N (the first new token comes from the prefill logits), so
decode ms/token = decode_s / (N - 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import statistics
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import params as models_params
from anyprec_jax import format as fmt
from anyprec_jax import plane_layout
from anyprec_jax.plane_layout import PlaneLayout
from anyprec_jax import allocation
from anyprec_jax.pallas import backend as pallas_backend
from anyprec_jax import weight as weight_lib
from anyprec_jax.weight import AnyPrecWeight, concat_rows, set_precision


@dataclasses.dataclass(frozen=True)
class Latency:
  """Median timings of a generation call (compile excluded)."""
  prefill_ms: float
  decode_ms_per_token: float
  new_tokens: int

  @property
  def tokens_per_s(self) -> float:
    return 1e3 / self.decode_ms_per_token


def time_generation(run: Callable[[], tuple], repeats: int = 3) -> Latency:
  """Times `run() -> (GenerationResult, models.Timing)` after one warm-up call.

  Args:
    run: one generation (batch 1) that must not stop early (pass eos_token_id=()).
    repeats: timed calls; medians are reported.

  Returns:
    `Latency`.
  """
  run()  # Compile prefill + decode loop.
  prefill, decode, n = [], [], None
  for _ in range(repeats):
    result, timing = run()
    n = int(np.asarray(result.lengths).max())
    prefill.append(timing.prefill_s)
    decode.append(timing.decode_s / max(n - 1, 1))
  return Latency(prefill_ms=1e3 * statistics.median(prefill),
                 decode_ms_per_token=1e3 * statistics.median(decode), new_tokens=n)


class Shape(enum.Enum):
  """Model shapes for the end-to-end benchmark."""
  LLAMA2_7B = "llama-2-7b"
  LLAMA3_8B = "llama-3-8b"  # GQA 32/8 heads, MLP 14336, vocab 128256
  TINY = "tiny"


_SHAPES = {
    Shape.LLAMA2_7B: dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=4096),
    Shape.LLAMA3_8B: dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, max_position_embeddings=8192),
    Shape.TINY: dict(vocab_size=512, hidden_size=128, intermediate_size=352,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=1024),
}


def shape_config(shape: Shape, layers: int | None = None,
                 vocab_size: int | None = None) -> models.ModelConfig:
  """A Llama `ModelConfig` of the given shape (optionally with fewer layers, or another
  vocabulary size, e.g. a tokenizer's)."""
  d = dict(_SHAPES[shape], model_type="llama", rms_norm_eps=1e-5, eos_token_id=2,
           bos_token_id=1, tie_word_embeddings=False)
  if layers is not None:
    d["num_hidden_layers"] = layers
  if vocab_size is not None:
    d["vocab_size"] = vocab_size
  return models.config_from_hf(d)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, shape, scale, dtype):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_dense_params(cfg: models.ModelConfig, dtype=jnp.bfloat16, seed: int = 0,
                        linears: bool = True):
  """Random params on device (normal, std 1/sqrt(fan-in); norms 1).

  `linears=False`: the decoder linears (`models.linear_names`) stay abstract
  (`jax.ShapeDtypeStruct`), for `random_anyprec_params` to replace without a dense
  copy ever being built; the other leaves are the same as with `linears=True`.
  """
  abstract = models.decoder.abstract_params(cfg, dtype)
  skip = set() if linears else {models_params.param_path(abstract, name)
                                for name in models.linear_names(cfg)}
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.key(seed), len(with_paths))
  out = []
  for key, (path, leaf) in zip(keys, with_paths):
    if "/".join(str(getattr(k, "key", k)) for k in path) in skip:
      out.append(leaf)
    elif leaf.ndim == 1:
      out.append(jnp.ones(leaf.shape, dtype))
    else:
      out.append(_normal(key, leaf.shape, float(leaf.shape[-1]) ** -0.5, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("n", "k", "planes", "precisions", "layout"))
def _random_anyprec(key, *, n, k, planes, precisions, layout=PlaneLayout.FORMAT):
  kp, kl = jax.random.split(key)
  words = plane_layout.words_for(layout, k)
  # Drawn flat: XLA:CPU compiles a multi-dimensional draw far slower (seconds).
  bits = jax.random.bits(kp, (planes * n * words,), jnp.uint32).reshape(
      planes, n, words)  # [P, N, W]
  if layout is not PlaneLayout.FORMAT and k % plane_layout.BLOCK:  # padding -> code 0
    bits = plane_layout.to_tc(plane_layout.from_tc(bits, k), k)
  if layout is PlaneLayout.TC_TILED:  # random bits: only the padding needs care
    bits = plane_layout.tile(bits)
  elif k % fmt.WORD_BITS:  # Padding columns hold code 0.
    valid = (jnp.uint32(1) << (k % fmt.WORD_BITS)) - jnp.uint32(1)
    bits = bits.at[:, :, -1].set(bits[:, :, -1] & valid)
  luts = {}
  for b, key_b in zip(precisions, jax.random.split(kl, len(precisions))):
    lut = jax.random.normal(key_b, (n, 1 << b), jnp.float32) * k ** -0.5
    luts[b] = jnp.sort(lut, axis=1).astype(jnp.float16)  # [N, 2^b]
  return bits, luts


def random_anyprec_params(cfg: models.ModelConfig, dense_params,
                          precisions: Sequence[int], seed: int = 1,
                          layout: PlaneLayout = PlaneLayout.FORMAT,
                          fuse: bool = True, fuse_mlp: bool = True):
  """`dense_params` with every decoder linear replaced by a random `AnyPrecWeight`.

  Random parent codes and LUTs (fine for speed); only max(precisions) planes are
  allocated, in `layout`'s bit order. Unquantized leaves are shared with `dense_params`;
  its linears are only read for their shapes (they may be abstract:
  `random_dense_params(..., linears=False)`).
  `fuse`: q/k/v stored as one weight, as `from_quantized` loads them (`fuse_mlp`:
  gate/up too).
  """
  precisions = tuple(sorted(precisions))
  names = models.linear_names(cfg)  # Decoder linears, in layer order.
  keys = jax.random.split(jax.random.key(seed), len(names))
  new = {}
  for key, name in zip(keys, names):
    n, k = models.get_param(dense_params, name).shape
    lay = (PlaneLayout.TC if layout is PlaneLayout.TC_TILED
           and not plane_layout.tileable(n) else layout)  # as `with_layout` does
    planes, luts = _random_anyprec(key, n=n, k=k, planes=max(precisions),
                                   precisions=precisions, layout=lay)
    new[name] = AnyPrecWeight(planes=planes, luts=luts, in_features=k,
                              bits=max(precisions), layout=lay)
  out = models.replace_params(dense_params, new)
  return models_params.fuse_projections(out, concat_rows, mlp=fuse_mlp) if fuse else out


def random_anyprec_model(cfg: models.ModelConfig, precisions: Sequence[int], *,
                         dtype=None, layout: PlaneLayout | None = None,
                         seed: int = 0):
  """An `AnyPrecisionForCausalLM` with random weights, laid out and fused as
  `AnyPrecisionForCausalLM.from_quantized` loads a checkpoint on this backend (the
  planes in `runtime.default_layout()`, q/k/v and gate/up fused), for serving and
  latency benchmarks without a checkpoint.

  Args:
    cfg: model shape (`shape_config`).
    precisions: integer widths to hold (each in format.MIN_BITS..MAX_BITS); one
      random parent of max(precisions) planes serves them all.
    dtype: activations and unquantized weights; None: `runtime.default_dtype()`.
    layout: bit order of the planes; None: `runtime.default_layout()`.
    seed: PRNG seed of the dense leaves (the planes and LUTs use seed + 1).

  Returns:
    The model, active at max(precisions); it has no directory (no tokenizer).

  Raises:
    errors.UsageError: no precision, a fractional one, or one outside
      MIN_BITS..MAX_BITS.
  """
  from anyprec_jax import errors, runtime  # Local: runtime imports this module's users.
  if not precisions:
    raise errors.UsageError("random weights need at least one precision")
  bad = [p for p in precisions if not weight_lib.is_int(p)
         or not fmt.MIN_BITS <= int(p) <= fmt.MAX_BITS]
  if bad:
    raise errors.UsageError(f"random weights take integer precisions in {fmt.MIN_BITS}.."
                     f"{fmt.MAX_BITS}; got {bad}")
  widths = tuple(sorted({int(p) for p in precisions}))
  dtype = runtime.default_dtype() if dtype is None else dtype
  layout = runtime.default_layout() if layout is None else PlaneLayout(layout)
  dense = random_dense_params(cfg, dtype, seed=seed, linears=False)  # linears abstract
  params = random_anyprec_params(cfg, dense, widths, seed=seed + 1, layout=layout,
                                 fuse=True, fuse_mlp=True)
  return runtime.AnyPrecisionForCausalLM(cfg, params, precisions=widths)


def decode_step_bytes(cfg: models.ModelConfig, params, *, batch: int,
                      context: float) -> int:
  """Bytes one decode step must read from memory: every weight at its active width (the
  b planes as stored, padding included, and the b-bit LUT; dense leaves whole), the
  `batch` token rows of an untied embedding table, and K and V of `context` positions
  per sequence (activation dtype of the embedding). The floor of a step is these bytes
  at the copy bandwidth; the activations and logits are left out (KBs at decode).

  Args:
    cfg: the model's config.
    params: its params (dense arrays and `AnyPrecWeight`s at their active width).
    batch: sequences per step; context: mean cached positions attended per sequence.
  """
  total = 0
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, AnyPrecWeight))[0]
  for path, leaf in leaves:
    if isinstance(leaf, AnyPrecWeight):
      b = leaf.bits
      total += (b * math.prod(leaf.planes.shape[1:]) * leaf.planes.dtype.itemsize
                + leaf.luts[b].size * leaf.luts[b].dtype.itemsize)
    elif "embed_tokens" in jax.tree_util.keystr(path) and not cfg.tie_word_embeddings:
      total += batch * leaf.shape[-1] * leaf.dtype.itemsize
    else:
      total += leaf.size * leaf.dtype.itemsize
  itemsize = params["embed_tokens"]["embedding"].dtype.itemsize  # [V, D]
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  return int(total + round(batch * context * kv))


def loaded_widths(precisions: Sequence) -> tuple[int, ...]:
  """Integer widths a random parent needs for `precisions` (a fractional B needs
  floor(B) and ceil(B))."""
  out = set()
  for p in precisions:
    out |= {math.floor(p), math.ceil(p)}
  return tuple(sorted(out))


def at_precision(params, precision, seed: int = 0):
  """`params` at an integer width, or at a fractional average with the random
  equal-bytes allocation over its weights (`allocation.Method.RANDOM`: the speed of
  a B-bit allocation depends on how many bytes it reads, not on which layers)."""
  precision = weight_lib.as_precision(precision)
  if not weight_lib.is_fractional(precision):
    return set_precision(params, precision)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, AnyPrecWeight))[0]
  shapes = {weight_lib.tree_path(p): (w.in_features, w.out_features) for p, w in leaves
            if isinstance(w, AnyPrecWeight)}
  problem = allocation.make_problem(shapes, loaded_widths([precision]))
  chosen = allocation.allocate(problem, [precision], allocation.Method.RANDOM, seed)[0]
  return weight_lib.set_widths(params, chosen.bits)


def require_matplotlib():
  """matplotlib.pyplot (Agg backend); ImportError with the fix when missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise ImportError("--plot needs matplotlib (optional): pip install matplotlib") from e
  return plt


def plot_latency_and_ppl(latency_rows: Sequence[dict], eval_record: dict | None,
                         out_png: str, dataset: str | None = None) -> None:
  """PNG of decode ms/token (and perplexity, from an evaluate JSON) against bits.

  Args:
    latency_rows: [{"model", "bits", "decode_ms_per_token"}]; bits >= 16: unquantized;
      empty: perplexity only.
    eval_record: the `--output_json` of scripts/evaluate.py, or None.
    out_png: output path.
    dataset: corpus to plot (default: the first one in the record).

  Raises:
    ImportError: matplotlib is not installed (it is optional).
  """
  plt = require_matplotlib()
  n_axes = bool(latency_rows) + bool(eval_record)
  fig, axes = plt.subplots(1, n_axes, figsize=(5 * n_axes, 4), squeeze=False)
  quant = sorted((r["bits"], r["decode_ms_per_token"]) for r in latency_rows
                 if r["bits"] < 16)
  ax = axes[0, 0]
  if quant:
    ax.plot(*zip(*quant), "o-", label="any-precision")
  for r in latency_rows:
    if r["bits"] >= 16:
      ax.axhline(r["decode_ms_per_token"], ls="--", color="gray",
                 label=f"{r['model']} ({r['bits']}-bit)")
  if latency_rows:
    ax.set(xlabel="bits", ylabel="decode ms / token", title="latency")
    ax.legend()
  if eval_record:
    rows = eval_record["rows"]
    dataset = dataset or next(iter(rows[0]["results"]))
    ax = axes[0, n_axes - 1]
    for method in sorted({r["method"] for r in rows if r["bits"] < 16}):
      pts = sorted((r["bits"], r["results"][dataset]["ppl"]) for r in rows
                   if r["method"] == method and dataset in r["results"])
      ax.plot(*zip(*pts), "o-", label=method)
    for r in rows:
      if r["method"] == "original":
        ax.axhline(r["results"][dataset]["ppl"], ls="--", color="gray", label="original")
    ax.set(xlabel="bits", ylabel=f"perplexity ({dataset})", title="quality", yscale="log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def bench_e2e(cfg: models.ModelConfig, precisions: Sequence[int], *, prompt_len: int,
              new_tokens: int, dtype=jnp.bfloat16, repeats: int = 3, batch: int = 1,
              layout: PlaneLayout = PlaneLayout.FORMAT, fuse: bool = True,
              fuse_mlp: bool = True, graph_modes: Sequence[str | None] = (None,),
              copy_tbps: float | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
  """End-to-end batch-1 generation speed: dense baseline, then each precision.

  Args:
    cfg: model config (random weights are built on device).
    precisions: any-precision widths to time (one random parent holds them all);
      fractional ones run the random equal-bytes allocation (`at_precision`).
    prompt_len, new_tokens: prompt length and tokens generated (never stopping early).
    dtype: activation / dense weight dtype of every model.
    repeats: timed runs per model (median).
    batch: sequences decoded together (same prompt length).
    layout: bit order of the random planes (kernels are chosen by it).
    fuse: any-precision q/k/v stored fused, as `from_quantized` does (the dense
      baseline keeps separate weights, as the Hugging Face model has them).
    graph_modes: decode command-buffer modes (`pallas.backend.DecodeGraphs` values;
      None = the environment's) to time every model under, in the same run.
    copy_tbps: the device's copy bandwidth (TB/s, e.g. `pallas.benchmark.copy_case`),
      for each row's share.
    log: progress printer.

  Returns:
    [{"model", "bits", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "speedup",
    "step_mb", "tbps"} (+ "graphs" when a mode is given, "copy_pct" with `copy_tbps`)],
    per mode the dense baseline first (bits = its dtype's width); speedup = decode
    tokens/s over the first mode's baseline; step_mb = `decode_step_bytes` at the mean
    context of the decode (prompt_len + new_tokens / 2), tbps = those bytes per decode
    step time.
  """
  precisions = sorted(weight_lib.as_precision(p) for p in precisions)
  dense = random_dense_params(cfg, dtype)
  quant = random_anyprec_params(cfg, dense, loaded_widths(precisions), layout=layout,
                                fuse=fuse, fuse_mlp=fuse_mlp)
  ids = np.asarray(jax.random.randint(jax.random.key(2), (batch, prompt_len), 3,
                                      cfg.vocab_size), np.int32)

  def run(params):
    return models.timed_generate(cfg, params, ids, max_new_tokens=new_tokens,
                                 eos_token_id=())

  name = jnp.dtype(dtype).name
  rows = []
  runs = [(name, jnp.dtype(dtype).itemsize * 8)] + [("anyprec", b) for b in precisions]
  for mode in graph_modes:
    for label, bits in runs:
      params = dense if label == name else at_precision(quant, bits)
      with (contextlib.nullcontext() if mode is None
            else pallas_backend.use_decode_graphs(mode)):
        lat = time_generation(functools.partial(run, params), repeats)
      nbytes = decode_step_bytes(cfg, params, batch=batch,
                                 context=prompt_len + new_tokens / 2)
      tbps = nbytes / (lat.decode_ms_per_token * 1e-3) / 1e12
      rows.append({"model": label, "bits": bits, "prefill_ms": lat.prefill_ms,
                   "decode_ms_per_token": lat.decode_ms_per_token,
                   "tokens_per_s": lat.tokens_per_s, "new_tokens": lat.new_tokens,
                   "step_mb": nbytes / 1e6, "tbps": tbps})
      if copy_tbps:
        rows[-1]["copy_pct"] = 100 * tbps / copy_tbps
      if mode is not None:
        rows[-1]["graphs"] = mode
      log(f"{label} {bits}b{'' if mode is None else ' graphs ' + mode}: prefill "
          f"{lat.prefill_ms:.1f} ms, decode {lat.decode_ms_per_token:.3f} ms/token "
          f"({lat.tokens_per_s:.1f} tokens/s)")
  base = rows[0]["tokens_per_s"]
  for r in rows:
    r["speedup"] = r["tokens_per_s"] / base
  return rows


def latency_table(rows: Sequence[dict]) -> str:
  """Markdown table of `bench_e2e` / demo rows."""
  graphs = any("graphs" in r for r in rows)
  mb, pct = any("step_mb" in r for r in rows), any("copy_pct" in r for r in rows)
  lines = ["| model | bits |" + (" graphs |" if graphs else "")
           + " prefill ms | decode ms/token | tokens/s | speed-up |"
           + (" MB/step | TB/s |" if mb else "") + (" % copy |" if pct else ""),
           "|---|---:|" + ("---|" if graphs else "") + "---:|---:|---:|---:|"
           + ("---:|---:|" if mb else "") + ("---:|" if pct else "")]
  for r in rows:
    speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
    mode = f" {r.get('graphs', '-')} |" if graphs else ""
    extra = (f" {r['step_mb']:.5g} | {r['tbps']:.3g} |" if "step_mb" in r
             else " - | - |" if mb else "")
    extra += (f" {r['copy_pct']:.0f}% |" if "copy_pct" in r else " - |" if pct else "")
    lines.append(f"| {r['model']} | {r['bits']} |{mode} {r['prefill_ms']:.1f} | "
                 f"{r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {speed} |"
                 + extra)
  return "\n".join(lines)


def demo_rows(prompt_ids: np.ndarray, *, new_tokens: int, original=None, anyprec=None,
              precisions: Sequence[int] | None = None, repeats: int = 3,
              log: Callable[[str], None] = print) -> list[dict]:
  """Times generation of the original model and each precision of an any-precision one.

  Args:
    prompt_ids: [1, T] prompt.
    new_tokens: tokens to generate (EOS ignored, so every run makes the same number).
    original: (cfg, params) of the unquantized model, or None.
    anyprec: an `AnyPrecisionForCausalLM`, or None.
    precisions: its precisions to run (default all loaded).
    repeats, log: see `bench_e2e`.

  Returns:
    [{"model", "bits", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "tokens"}]
    with the generated ids [new_tokens] of the last run.
  """
  runs = []
  if original is not None:
    cfg, params = original
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    runs.append(("original", jnp.dtype(dtype).itemsize * 8, cfg, params))
  if anyprec is not None:
    for b in precisions or anyprec.supported_precisions:
      runs.append(("anyprec", b, anyprec.cfg, anyprec.params_at(b)))
  rows = []
  for label, bits, cfg, params in runs:
    last = {}

    def run(cfg=cfg, params=params, last=last):
      out = models.timed_generate(cfg, params, prompt_ids, max_new_tokens=new_tokens,
                                  eos_token_id=())
      last["tokens"] = np.asarray(out[0].tokens[0])
      return out

    lat = time_generation(run, repeats)
    rows.append({"model": label, "bits": bits, "prefill_ms": lat.prefill_ms,
                 "decode_ms_per_token": lat.decode_ms_per_token,
                 "tokens_per_s": lat.tokens_per_s, "tokens": last["tokens"].tolist()})
    log(f"{label} {bits}b: {lat.decode_ms_per_token:.2f} ms/token")
  return rows


def _profiler(call: str) -> None:
  """cuProfilerStart / cuProfilerStop through the CUDA driver (for ncu)."""
  import ctypes
  rc = getattr(ctypes.CDLL("libcuda.so.1"), call)()
  if rc:
    raise RuntimeError(f"{call} returned CUDA error {rc}")


def profile_decode_step(cfg: models.ModelConfig, models_to_run: Sequence[str], *,
                        batch: int = 1, context: int = 384, iters: int = 50,
                        ncu: bool = False, fuse: bool = True,
                        dtype=jnp.bfloat16, trace_dir: str | None = None,
                        log: Callable[[str], None] = print):
  """Time per decode step, `iters` steps in one jitted on-device loop (no host
  dispatch between steps, as in `models.decode`), per model.

  Args:
    cfg: model shape (random weights).
    models_to_run: "bf16" (the dense baseline) and/or bit widths as strings.
    batch, context: sequences and KV-cache slots (context >= 8 + 2 iters).
    iters: steps per timed loop (one untimed loop first compiles and warms up).
    ncu: run exactly one jitted step between cuProfilerStart and cuProfilerStop
      instead of timing (for `ncu --profile-from-start off`).
    fuse: fused q/k/v any-precision weights, as loading does.
    dtype: activations and dense weights.
    trace_dir: after timing, trace one more loop with `jax.profiler` into
      trace_dir/<label> and log its per-kernel GPU table (`trace_kernel_table`).

  Returns:
    [(label, ms per step)] (empty with `ncu`).
  """
  import time
  if context < 8 + 2 * iters + 1:
    raise ValueError(f"context {context} too short for 2 x {iters} steps")
  bits = sorted(int(b) for b in models_to_run if b != "bf16")
  dense = random_dense_params(cfg, dtype)
  from anyprec_jax import runtime  # Local: runtime imports this module's users.
  quant = (random_anyprec_params(cfg, dense, bits, layout=runtime.default_layout(),
                                 fuse=fuse) if bits else None)
  ids = jnp.full((batch, 8), 5, jnp.int32)
  tokens = jnp.zeros((batch,), jnp.int32)

  def steps(params, state, cache, n):
    body = lambda _, c: models.decode_step(cfg, params, tokens, *c)
    return jax.lax.fori_loop(0, n, body, (state, cache))

  loop = jax.jit(steps, static_argnums=3, donate_argnums=2)
  rows = []
  for label in models_to_run:
    params = dense if label == "bf16" else set_precision(quant, int(label))
    state, cache = models.prefill(cfg, params, ids, jnp.ones_like(ids), cache_len=context)
    if ncu:
      state, cache = loop(params, state, cache, 1)
      jax.block_until_ready(state)
      _profiler("cuProfilerStart")
      state, cache = loop(params, state, cache, 1)
      jax.block_until_ready(state)
      _profiler("cuProfilerStop")
      log(f"{label}: one step recorded")
      continue
    state, cache = loop(params, state, cache, iters)  # compile + warm-up
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, cache = loop(params, state, cache, iters)
    jax.block_until_ready(state)
    ms = (time.perf_counter() - start) * 1e3 / iters
    rows.append((label, ms))
    log(f"{label}: {ms:.3f} ms/step")
    if trace_dir:
      import glob
      import gzip
      import json
      import os
      where = os.path.join(trace_dir, label)
      with jax.profiler.trace(where, create_perfetto_trace=True):
        state, cache = loop(params, state, cache, iters)
        jax.block_until_ready(state)
      path = sorted(glob.glob(os.path.join(where, "**", "perfetto_trace.json.gz"),
                              recursive=True))[-1]
      with gzip.open(path) as f:
        log(f"{label}: kernels of {iters} steps ({path})\n" +
            trace_kernel_table(json.load(f), steps=iters))
  return rows


def kernel_family(name: str) -> str:
  """Coarse family of a CUDA kernel name, for `ncu_kernel_table`."""
  low = name.lower()
  if "mosaic" in low:
    return "mosaic (any-precision GEMV)"
  if "triton" in low:
    return "triton"
  if any(s in low for s in ("gemm", "gemv", "cublas", "nvjet", "cutlass", "dot")):
    return "dense matmul (cuBLAS / XLA)"
  return "other XLA (fusions, copies)"


def _family_table(fam: dict[str, list[float]], byname: dict[str, list[float]],
                  per: int = 1, unit: str = "GPU us") -> list[str]:
  """Markdown rows: kernel families, then the 25 costliest kernel names (times in ns,
  divided by `per`, e.g. the number of decode steps)."""
  total = sum(sum(v) for v in fam.values())
  out = [f"| family | kernels | {unit} | share |", "|---|---:|---:|---:|"]
  for f, v in sorted(fam.items(), key=lambda kv: -sum(kv[1])):
    out.append(f"| {f} | {len(v) / per:g} | {sum(v) / 1e3 / per:.1f} | "
               f"{sum(v) / total:.0%} |")
  out.append(f"| total | {sum(len(v) for v in fam.values()) / per:g} | "
             f"{total / 1e3 / per:.1f} | |")
  out += ["", f"| kernel | count | {unit} | us each |", "|---|---:|---:|---:|"]
  for nm, v in sorted(byname.items(), key=lambda kv: -sum(kv[1]))[:25]:
    out.append(f"| `{nm}` | {len(v) / per:g} | {sum(v) / 1e3 / per:.1f} | "
               f"{sum(v) / len(v) / 1e3:.2f} |")
  return out


def trace_kernel_table(trace_json: dict, steps: int = 1) -> str:
  """Markdown table of the GPU kernels in a `jax.profiler` perfetto trace (CUPTI
  activity): per family and per kernel name, count and GPU time per step, plus the
  GPU's busy share of the traced span (gaps = launch / host latency).

  Args:
    trace_json: the parsed `perfetto_trace.json.gz` (`jax.profiler.trace(...,
      create_perfetto_trace=True)`).
    steps: decode steps inside the trace (times are divided by it).
  """
  from anyprec_jax import gpu_trace
  kern = gpu_trace.kernel_events(trace_json)
  streams = {(e["pid"], e.get("tid")) for e in kern}
  fam: dict[str, list[float]] = {}
  byname: dict[str, list[float]] = {}
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                 for e in kern)
  for e in kern:
    t = float(e.get("dur", 0.0)) * 1e3  # us -> ns
    fam.setdefault(kernel_family(e["name"]), []).append(t)
    byname.setdefault(e["name"][:60], []).append(t)
  busy, cur_s, cur_e = 0.0, *spans[0]
  for s0, e0 in spans[1:]:
    if s0 > cur_e:
      busy += cur_e - cur_s
      cur_s, cur_e = s0, e0
    else:
      cur_e = max(cur_e, e0)
  busy += cur_e - cur_s
  span = spans[-1][1] - spans[0][0]
  out = [f"GPU span {span / steps:.1f} us/step, busy {busy / steps:.1f} us/step "
         f"({busy / span:.0%}), kernels in {len(streams)} stream(s)"]
  # Idle time before each kernel (after the latest end so far), by the kernel's family:
  # launch latency shows as small gaps before every kernel of a family, a per-step host
  # sync as a few long gaps.
  # A kernel that starts before the one before it has ended runs as a programmatic
  # dependent (PDL): its overlap is counted per family.
  gaps: dict[str, list[float]] = {}
  early: dict[str, list[float]] = {}
  end = float(kern[0]["ts"]) + float(kern[0].get("dur", 0.0))
  for e in kern[1:]:
    t0 = float(e["ts"])
    gaps.setdefault(kernel_family(e["name"]), []).append(max(0.0, t0 - end))
    if t0 < end:
      early.setdefault(kernel_family(e["name"]), []).append(end - t0)
    end = max(end, t0 + float(e.get("dur", 0.0)))
  flat = [g for v in gaps.values() for g in v]
  long_gaps = [g for g in flat if g > 20.0]
  out.append(f"idle before kernels: {sum(flat) / steps:.1f} us/step, of which "
             f"{sum(long_gaps) / steps:.1f} in {len(long_gaps) / steps:g} gaps > 20 us "
             f"per step; mean gap before: " + ", ".join(
                 f"{f} {sum(v) / len(v):.2f} us" for f, v in sorted(gaps.items())))
  out.append("kernels started before the previous one ended: " + (", ".join(
      f"{f} {len(v) / steps:g} per step, {sum(v) / len(v):.2f} us early"
      for f, v in sorted(early.items())) or "none"))
  out.append("")
  return "\n".join(out + _family_table(fam, byname, per=steps, unit="GPU us/step"))


def ncu_kernel_table(csv_text: str) -> str:
  """Markdown table of an `ncu --csv --page raw --metrics gpu__time_duration.sum` log:
  kernels grouped by family and by name, count and total GPU microseconds."""
  import csv
  lines = csv_text.splitlines()
  start = next(i for i, l in enumerate(lines) if '"Kernel Name"' in l)
  reader = csv.DictReader(lines[start:])
  fam: dict[str, list[float]] = {}
  byname: dict[str, list[float]] = {}
  scale = 1.0  # to ns
  for row in reader:
    v = row.get("gpu__time_duration.sum", "")
    try:
      t = float(v.replace(",", "")) * scale
    except ValueError:  # the units row
      scale = {"usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(v.strip(), 1.0)
      continue
    name = row["Kernel Name"]
    fam.setdefault(kernel_family(name), []).append(t)
    byname.setdefault(name[:60], []).append(t)
  return "\n".join(_family_table(fam, byname))
