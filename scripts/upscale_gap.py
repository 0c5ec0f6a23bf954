r"""Fisher-weighted error of an any-precision checkpoint vs independent k-means, per width.

  python scripts/upscale_gap.py --original=/tmp/smollm2-135m-instruct-hf \
      --anyprec=/tmp/q/smol-anyprec --independent=/tmp/q/smol-independent \
      --fisher_dir=/tmp/q/cache/fisher-<key>

Reads the source weights, the any-precision planes + LUTs, the dense independent
checkpoints <independent>/w{b} and the cached Fisher sums (the `fisher-*` folder of the
quantizer's --cache_dir). Prints, per width, sum F (W - Q)^2 / sum F W^2 over all
quantized modules for both, and their ratio: the cost of nesting the codes.
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
_ANYPREC = flags.DEFINE_string("anyprec", None, "Any-precision directory.", required=True)
_INDEPENDENT = flags.DEFINE_string("independent", None, "Directory holding w{b}/.",
                                   required=True)
_FISHER = flags.DEFINE_string("fisher_dir", None, "Cached Fisher folder.", required=True)


def _load_dir(path: str) -> dict[str, np.ndarray]:
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  out = {}
  for f in files:
    out.update(load_file(f))
  return out


def main(argv):
  del argv
  src, ap, fisher = _load_dir(_ORIGINAL.value), _load_dir(_ANYPREC.value), _load_dir(_FISHER.value)
  cfg = json.load(open(os.path.join(_ANYPREC.value, "config.json")))["anyprec"]
  seed, parent = cfg["seed_bits"], cfg["parent_bits"]
  widths = range(seed, parent + 1)
  ind = {b: _load_dir(os.path.join(_INDEPENDENT.value, f"w{b}")) for b in widths}
  err = {b: np.zeros(2) for b in widths}
  energy = 0.0
  for name in (k[:-len(".planes")] for k in ap if k.endswith(".planes")):
    w = src[name + ".weight"].astype(np.float64)
    f = fisher[name].astype(np.float64)
    codes = fmt.unpack_codes_np(ap[name + ".planes"], parent, w.shape[1]).astype(np.int64)
    energy += float(np.sum(f * w * w))
    for b in widths:
      up = dequantize_codes(codes >> (parent - b), ap[f"{name}.lut{b}"].astype(np.float64))
      err[b] += [np.sum(f * (w - up) ** 2),
                 np.sum(f * (w - ind[b][name + ".weight"].astype(np.float64)) ** 2)]
  print("| bits | upscaled | independent | upscaled / independent |")
  print("|---:|---:|---:|---:|")
  for b in widths:
    u, i = err[b] / energy
    print(f"| {b} | {u:.4g} | {i:.4g} | {u / i:.3f} |")


if __name__ == "__main__":
  cli.run(main)
