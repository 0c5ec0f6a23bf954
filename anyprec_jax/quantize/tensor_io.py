"""Streaming safetensors reading and atomic writing (no pickle, any dtype incl. bf16).

The quantizer copies every unquantized tensor of the source checkpoint byte for byte
and writes shards tensor by tensor, so peak host memory stays about one tensor and the
output does not depend on the numpy dtype support of a framework (bf16, fp8 are kept).
Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {...}} padded with spaces to 8 bytes, then the data.
Every file is written to a temporary name, fsynced and renamed (`atomic_path`), so a
process killed at any point never leaves a truncated file under the final name.

Headers are validated before they are trusted (length against the file size, JSON,
offsets against the data present); a damaged file is an `errors.BadInputError` naming
it, a failed write an `errors.OutputError` naming the file being written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from anyprec_jax import errors

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
METADATA = {"format": "pt"}  # what transformers expects in safetensors headers


def dtype_name(dtype) -> str:
  """safetensors dtype string of a numpy dtype."""
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a safetensors file: where its bytes are."""
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  start: int  # absolute byte offsets in the file
  stop: int

  @property
  def nbytes(self) -> int:
    return self.stop - self.start


MAX_HEADER_BYTES = 100 * 1024 ** 2  # the safetensors format's own limit
_CHUNK = 16 * 1024 ** 2  # bytes per read when streaming a tensor
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _bad(path, what: str) -> errors.BadInputError:
  return errors.BadInputError(f"{path}: {what}",
                              hint="the file is damaged or not a safetensors file; "
                              "copy or convert it again")


def _entry(path: pathlib.Path, name: str, h, base: int, data_bytes: int) -> Entry:
  """Checks one header entry before trusting it (dtype, shape, offsets in the file)."""
  if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
    raise _bad(path, f"header entry of tensor {name!r} lacks dtype / shape / data_offsets")
  shape, offsets = h["shape"], h["data_offsets"]
  if (not isinstance(shape, list) or
      not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
    raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
  if (not isinstance(offsets, list) or len(offsets) != 2 or
      not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or
      not 0 <= offsets[0] <= offsets[1]):
    raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
  if offsets[1] > data_bytes:
    raise _bad(path, f"tensor {name!r} ends at byte {offsets[1]} of the data, but the "
               f"file holds only {data_bytes} data bytes (truncated?)")
  dtype = DTYPES.get(h["dtype"])
  if dtype is not None and offsets[1] - offsets[0] != int(np.prod(shape)) * dtype.itemsize:
    raise _bad(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape "
               f"{shape} of {h['dtype']}")
  return Entry(path, str(h["dtype"]), tuple(shape), base + offsets[0], base + offsets[1])


def read_header(path: pathlib.Path) -> dict[str, Entry]:
  """{name: Entry} of one safetensors file (reads only the header).

  The header is validated before it is trusted: its length against the file size,
  its JSON, and every tensor's offsets against the data actually present.

  Raises:
    errors.MissingInputError: no such file.
    errors.BadInputError: naming the file, for a truncated or damaged file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingInputError(f"{path} not found (or not a file)")
  size = path.stat().st_size
  with open(path, "rb") as f:
    if size < 8:
      raise _bad(path, f"{size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(size - 8, MAX_HEADER_BYTES):
      raise _bad(path, f"header length {length} exceeds the file size {size} "
                 "(truncated, or garbage where the header should be)")
    raw = f.read(length)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _bad(path, f"the header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise _bad(path, "the header is not a JSON object")
  header.pop("__metadata__", None)
  base = 8 + length
  return {name: _entry(path, name, h, base, size - base) for name, h in header.items()}


class TensorIndex:
  """All tensors of a list of safetensors files, readable one at a time."""

  def __init__(self, files: Iterable[pathlib.Path]):
    self.entries: dict[str, Entry] = {}
    for file in files:
      for name, entry in read_header(file).items():
        if name in self.entries:
          raise errors.BadInputError(
              f"tensor {name!r} appears in {self.entries[name].file} and {file}")
        self.entries[name] = entry

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def names(self) -> list[str]:
    return sorted(self.entries)

  def chunks(self, name: str) -> Iterator[bytes]:
    """The stored bytes of a tensor, in pieces of at most 16 MiB (a multiple of 8)."""
    e = self.entries[name]
    try:
      with open(e.file, "rb") as f:
        f.seek(e.start)
        left = e.nbytes
        while left:
          data = f.read(min(left, _CHUNK))
          if not data:
            raise _bad(e.file, f"truncated inside tensor {name!r} (changed while read?)")
          left -= len(data)
          yield data
    except OSError as e2:
      raise errors.BadInputError(f"cannot read tensor {name!r} from {e.file}: "
                                 f"{e2.strerror or e2}") from e2

  def raw(self, name: str) -> bytes:
    """The stored bytes of a tensor."""
    return b"".join(self.chunks(name))

  def content_digest(self, name: str, check_finite: bool = False) -> str:
    """sha256 of a tensor's bytes, streamed (one pass, bounded memory).

    Args:
      name: the tensor.
      check_finite: also reject NaN / inf values of a floating tensor.

    Raises:
      errors.BadInputError: a non-finite value (naming the tensor and file).
    """
    e = self.entries[name]
    finite = check_finite and e.dtype in _FLOATS
    h = hashlib.sha256()
    for data in self.chunks(name):
      h.update(data)
      if finite and not np.isfinite(np.frombuffer(data, DTYPES[e.dtype])).all():
        raise errors.BadInputError(
            f"non-finite (NaN/inf) values in tensor {name!r} of {e.file}",
            hint="a model with NaN or inf weights cannot be quantized; check its source")
    return h.hexdigest()

  def array(self, name: str) -> np.ndarray:
    """A tensor as a numpy array of its stored dtype (bf16 via ml_dtypes)."""
    e = self.entries[name]
    if e.dtype not in DTYPES:
      raise errors.BadInputError(f"tensor {name!r} of {e.file} has unsupported dtype "
                                 f"{e.dtype}")
    return np.frombuffer(self.raw(name), DTYPES[e.dtype]).reshape(e.shape)


@dataclasses.dataclass(frozen=True)
class OutTensor:
  """A tensor to write: its header fields and a function producing its bytes."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  nbytes: int
  data: Callable[[], bytes]

  @staticmethod
  def of_array(name: str, arr: np.ndarray) -> "OutTensor":
    arr = np.ascontiguousarray(arr)
    return OutTensor(name, dtype_name(arr.dtype), tuple(arr.shape), arr.nbytes,
                     lambda: arr.tobytes())

  @staticmethod
  def copy_of(index: TensorIndex, name: str, new_name: str | None = None) -> "OutTensor":
    e = index.entries[name]
    return OutTensor(new_name or name, e.dtype, e.shape, e.nbytes, lambda: index.raw(name))


def storage_order(tensors: list[OutTensor]) -> list[OutTensor]:
  """Data order of the reference implementation: larger alignment first, then name."""
  size = {k: v.itemsize for k, v in DTYPES.items()}
  return sorted(tensors, key=lambda t: (-size.get(t.dtype, 1), t.name))


@contextlib.contextmanager
def writing(path: pathlib.Path) -> Iterator[None]:
  """Turns an OSError raised while writing `path` into `errors.OutputError` naming it
  (the OS names no file for a full disk)."""
  try:
    yield
  except OSError as e:
    raise errors.OutputError(
        f"cannot write {path}: {e.strerror or e}",
        hint="free some space or choose another directory; a rerun resumes from the "
        "finished steps") from e


@contextlib.contextmanager
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; on success fsyncs and renames it."""
  path = pathlib.Path(path)
  with writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    yield tmp
    with writing(path):
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.replace(tmp, path)
  finally:
    if tmp.is_symlink() or tmp.exists():
      with contextlib.suppress(OSError):
        tmp.unlink()


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes a small file atomically."""
  with atomic_path(path) as tmp, writing(path):
    tmp.write_bytes(data)


def check_writable_dir(path: pathlib.Path) -> None:
  """Checks that files can be written in directory `path`, before any work.

  Creates it (with its parents), writes and removes a probe file, and removes the
  directories it created again.

  Raises:
    OSError: from the OS (no permission, read-only, not a directory, ...).
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
  created, p = [], path
  while not p.exists() and p != p.parent:
    created.append(p)
    p = p.parent
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".anyprec-probe-{os.getpid()}"
    probe.write_bytes(b"probe")
    probe.unlink()
  finally:
    for d in created:  # deepest first
      with contextlib.suppress(OSError):
        d.rmdir()


def write_safetensors(path: pathlib.Path, tensors: list[OutTensor],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes one safetensors file atomically, one tensor's bytes at a time.

  Args:
    path: output file.
    tensors: tensors to store (any order; stored in `storage_order`).
    metadata: string metadata (default {"format": "pt"}).
  """
  ordered = storage_order(tensors)
  names = [t.name for t in ordered]
  if len(set(names)) != len(names):
    raise ValueError("duplicate tensor names")
  header: dict = {"__metadata__": dict(METADATA if metadata is None else metadata)}
  offset = 0
  for t in ordered:
    header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic_path(path) as tmp, writing(path), open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in ordered:
      data = t.data()
      if len(data) != t.nbytes:
        raise ValueError(f"tensor {t.name!r}: {len(data)} bytes, expected {t.nbytes}")
      f.write(data)
