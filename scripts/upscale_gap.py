r"""Fisher-weighted error per width of any-precision checkpoints vs independent baselines.

  python scripts/upscale_gap.py --original=/tmp/smollm2-135m-instruct-hf \
      --anyprec=/tmp/q/smol-anyprec,/tmp/q/smol-optimal \
      --baselines=/tmp/q/smol-independent,/tmp/q/smol-squeezellm \
      --fisher_dir=/tmp/q/cache/fisher-<key>

Reads the source weights, the any-precision planes + LUTs, the dense baseline
checkpoints <baseline>/w{b} and the cached Fisher sums (the `fisher-*` folder of the
quantizer's --cache_dir). Prints, per width, sum F (W - Q)^2 / sum F W^2 over all
quantized modules for each, and the ratio of each any-precision checkpoint's error to
each baseline's: the cost of nesting the codes ("-" where a baseline lacks the width).
A `--fisher_dir` of another calibration sample (`quantize.py --calibration_seed`) scores
the same codes on held-out sensitivities.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import flags

from anyprec_jax import cli
from safetensors.numpy import load_file

from anyprec_jax import format as fmt
from anyprec_jax.quantize.baselines import dequantize_codes

_ORIGINAL = flags.DEFINE_string("original", None, "Source HF directory.", required=True)
_ANYPREC = flags.DEFINE_list("anyprec", None, "Any-precision directories.", required=True)
_BASELINES = flags.DEFINE_list("baselines", [], "Directories holding w{b}/ (optional: "
                               "without them, only the errors).")
_FISHER = flags.DEFINE_string("fisher_dir", None, "Cached Fisher folder.", required=True)


def _load_dir(path: str) -> dict[str, np.ndarray]:
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  out = {}
  for f in files:
    out.update(load_file(f))
  return out


def _name(path: str) -> str:
  return os.path.basename(os.path.normpath(path))


def main(argv):
  del argv
  src, fisher = _load_dir(_ORIGINAL.value), _load_dir(_FISHER.value)
  aps = {_name(d): (_load_dir(d), json.load(open(os.path.join(d, "config.json")))["anyprec"])
         for d in _ANYPREC.value}
  widths = sorted({b for _, c in aps.values() for b in range(c["seed_bits"],
                                                              c["parent_bits"] + 1)})
  bases = {_name(d): {b: _load_dir(os.path.join(d, f"w{b}")) for b in widths
                      if os.path.isdir(os.path.join(d, f"w{b}"))} for d in _BASELINES.value}
  err = {n: {} for n in [*aps, *bases]}
  energy = 0.0
  first = next(iter(aps.values()))[0]
  for name in (k[:-len(".planes")] for k in first if k.endswith(".planes")):
    w = src[name + ".weight"].astype(np.float64)
    f = fisher[name].astype(np.float64)
    energy += float(np.sum(f * w * w))
    for n, (ap, cfg) in aps.items():
      parent = cfg["parent_bits"]
      codes = fmt.unpack_codes_np(ap[name + ".planes"], parent, w.shape[1]).astype(np.int64)
      for b in range(cfg["seed_bits"], parent + 1):
        up = dequantize_codes(codes >> (parent - b), ap[f"{name}.lut{b}"].astype(np.float64))
        err[n][b] = err[n].get(b, 0.0) + np.sum(f * (w - up) ** 2)
    for n, per in bases.items():
      for b, tensors in per.items():
        q = tensors[name + ".weight"].astype(np.float64)
        err[n][b] = err[n].get(b, 0.0) + np.sum(f * (w - q) ** 2)
  ratios = [(a, b) for a in aps for b in bases]
  print("| bits | " + " | ".join(err) + " | " +
        " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
  print("|---:|" + "---:|" * (len(err) + len(ratios)))
  for b in widths:
    cells = [f"{err[n][b] / energy:.4g}" if b in err[n] else "-" for n in err]
    cells += [f"{err[a][b] / err[c][b]:.3f}" if b in err[a] and b in err[c] else "-"
              for a, c in ratios]
    print(f"| {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  cli.run(main)
