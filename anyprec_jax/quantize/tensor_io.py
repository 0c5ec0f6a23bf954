"""Streaming safetensors reading and atomic writing (no pickle, any dtype incl. bf16).

The quantizer copies every unquantized tensor of the source checkpoint byte for byte
and writes shards tensor by tensor, so peak host memory stays about one tensor and the
output does not depend on the numpy dtype support of a framework (bf16, fp8 are kept).
Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {...}} padded with spaces to 8 bytes, then the data.
Every file is written to a temporary name, fsynced and renamed (`atomic_path`), so a
process killed at any point never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

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


def read_header(path: pathlib.Path) -> dict[str, Entry]:
  """{name: Entry} of one safetensors file (reads only the header)."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  base = 8 + size
  return {name: Entry(path, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0],
                      base + h["data_offsets"][1]) for name, h in header.items()}


class TensorIndex:
  """All tensors of a list of safetensors files, readable one at a time."""

  def __init__(self, files: Iterable[pathlib.Path]):
    self.entries: dict[str, Entry] = {}
    for file in files:
      for name, entry in read_header(file).items():
        if name in self.entries:
          raise ValueError(f"tensor {name!r} appears in {self.entries[name].file} and {file}")
        self.entries[name] = entry

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def names(self) -> list[str]:
    return sorted(self.entries)

  def raw(self, name: str) -> bytes:
    """The stored bytes of a tensor."""
    e = self.entries[name]
    with open(e.file, "rb") as f:
      f.seek(e.start)
      data = f.read(e.nbytes)
    if len(data) != e.nbytes:
      raise ValueError(f"{e.file} is truncated (tensor {name!r})")
    return data

  def array(self, name: str) -> np.ndarray:
    """A tensor as a numpy array of its stored dtype (bf16 via ml_dtypes)."""
    e = self.entries[name]
    if e.dtype not in DTYPES:
      raise ValueError(f"tensor {name!r} has unsupported dtype {e.dtype}")
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
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; on success fsyncs and renames it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes a small file atomically."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


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
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in ordered:
      data = t.data()
      if len(data) != t.nbytes:
        raise ValueError(f"tensor {t.name!r}: {len(data)} bytes, expected {t.nbytes}")
      f.write(data)
