"""The quantization cache: what is cached where, keyed by content.

    <cache_dir>/
      fisher-<F>/layer_00000.safetensors ...   Fisher information of each layer's linears
      fisher-<F>/complete.json                 written last: the pass is complete
      <method>-<Q>/layer_00000-<L>.safetensors one quantized layer (planes + LUTs, or codes)

  F = digest(the model's content, the calibration data, the Fisher dtype)
  Q = digest(QuantConfig: method, bit widths, k-means options, LUT dtype)
  L = digest(F, this layer's weights)

The model's content is a sha256 of every tensor's bytes, streamed from the
safetensors files once per run (about as long as reading the model once), plus its
config.json. The calibration data is the sha256 of the local calibration file (the
hub datasets "c4" / "wikitext2" are fixed files, named by their name), `num_samples`,
`seq_len`, the sampling seed, and the sha256 of the model directory's other files
(the tokenizer). File names, paths, sizes and dates are not part of any key: a
changed file is never taken for the old one, and an unchanged model under another
path reuses the cache. When a key does not match, only that stage is recomputed (a
quantization option keeps the Fisher pass; RTN re-quantizes only layers whose
weights changed). Every file is written atomically, so a killed run leaves only
complete files behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import shutil
import sys

from tqdm import tqdm

from anyprec_jax.quantize import calibration as calib
from anyprec_jax.quantize import tensor_io
from anyprec_jax.quantize.config import CalibrationConfig, QuantConfig

VERSION = 2
DONE = "complete.json"


def digest(obj) -> str:
  """Short sha256 of a JSON-able object (sorted keys)."""
  text = json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SourceContent:
  """What a source checkpoint holds, independent of where and how it is stored.

  Attributes:
    tensors: {name: (dtype, shape, sha256 of the bytes)}.
    key: digest of config.json and `tensors`.
  """
  tensors: dict[str, tuple[str, tuple[int, ...], str]]
  key: str


def hash_source(source: tensor_io.TensorIndex, hf_config: dict, finite: set[str],
                progress: bool = True) -> SourceContent:
  """Hashes every tensor of the source as it is streamed.

  Args:
    source: the source checkpoint.
    hf_config: its config.json.
    finite: tensors that must hold no NaN / inf (the weights to quantize).
    progress: show a progress bar.

  Raises:
    errors.BadInputError: a non-finite value in one of `finite` (names it and its file).
  """
  tensors = {}
  total = sum(e.nbytes for e in source.entries.values())
  with tqdm(total=total, desc="Hashing", unit="B", unit_scale=True,
            disable=not progress) as bar:
    for name in source.names():
      e = source.entries[name]
      tensors[name] = (e.dtype, e.shape, source.content_digest(name, name in finite))
      bar.update(e.nbytes)
  return SourceContent(tensors, digest({"version": VERSION, "config": hf_config,
                                        "tensors": tensors}))


def file_sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def calibration_identity(calibration: CalibrationConfig,
                         side_files: list[pathlib.Path]) -> dict:
  """What the calibration tokens depend on: the data's content, the sampling options
  and the tokenizer files (`side_files`: the model directory's non-weight files).

  Raises:
    errors.MissingInputError / errors.UsageError: no such calibration file, or an
      unsupported type (before any work).
  """
  path = calib.local_file(calibration.dataset)
  options = dataclasses.asdict(calibration)
  del options["dataset"]
  return {"data": calibration.dataset if path is None else file_sha256(path),
          **options, "tokenizer": {f.name: file_sha256(f) for f in side_files}}


def fisher_dir(cache: pathlib.Path, content: SourceContent, calibration: dict,
               dtype_name: str) -> pathlib.Path:
  """Directory of the Fisher pass of this model content, calibration and dtype."""
  key = digest({"version": VERSION, "model": content.key, "dtype": dtype_name,
                "calibration": calibration})
  return cache / f"fisher-{key}"


def quant_dir(cache: pathlib.Path, config: QuantConfig) -> pathlib.Path:
  """Directory of the quantized layers of one QuantConfig."""
  key = digest({"version": VERSION, "config": dataclasses.asdict(config)})
  return cache / f"{config.method.value}-{key}"


def layer_file(directory: pathlib.Path, index: int, content: SourceContent | None = None,
               modules=(), fisher: pathlib.Path | None = None) -> pathlib.Path:
  """A layer's cache file: `layer_<i>.safetensors` in a Fisher directory, or
  `layer_<i>-<L>.safetensors` (L: the layer's weights and Fisher key) for results."""
  if content is None:
    return directory / f"layer_{index:05d}.safetensors"
  key = digest({"fisher": None if fisher is None else fisher.name,
                "weights": {m: content.tensors[f"{m}.weight"] for m in modules}})
  return directory / f"layer_{index:05d}-{key}.safetensors"


def is_complete(fisher: pathlib.Path) -> bool:
  return (fisher / DONE).exists()


def say(message: str, quiet: bool = False) -> None:
  """A note about the cache on stderr."""
  if not quiet:
    print(f"cache: {message}", file=sys.stderr, flush=True)


def report_fisher(fisher: pathlib.Path, quiet: bool) -> None:
  """Says whether the Fisher pass is reused, and why it is not when others are cached."""
  if is_complete(fisher):
    say(f"reusing the Fisher pass in {fisher}", quiet)
    return
  others = [d for d in fisher.parent.glob("fisher-*") if d != fisher and is_complete(d)]
  if others:
    say(f"{len(others)} cached Fisher pass(es) in {fisher.parent} are for other weights, "
        "calibration data or dtype: computing a new one", quiet)


def report_layers(files: list[pathlib.Path], quiet: bool) -> None:
  """Says how many quantized layers are reused and how many were cached for other
  weights / Fisher statistics."""
  done = [f for f in files if f.exists()]
  stale = [f for f in files if not f.exists() and any(
      g != f for g in f.parent.glob(f"{f.name.split('-')[0]}-*.safetensors"))]
  if done:
    say(f"reusing {len(done)} of {len(files)} quantized layers in {files[0].parent}", quiet)
  if stale:
    say(f"{len(stale)} layer(s) were cached for other weights or Fisher statistics: "
        "quantizing them again", quiet)


def remove(cache: pathlib.Path, fisher: pathlib.Path | None,
           quantized: pathlib.Path) -> None:
  """Removes this run's Fisher and quantized-layer directories (with entries of
  earlier inputs for the same QuantConfig), and `cache` if that leaves it empty."""
  for d in (quantized, fisher):
    if d is not None:
      shutil.rmtree(d, ignore_errors=True)
  with contextlib.suppress(OSError):
    cache.rmdir()  # only when nothing else is cached there
