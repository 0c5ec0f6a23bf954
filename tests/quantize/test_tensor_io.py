"""Tests of safetensors streaming I/O (anyprec_jax/quantize/tensor_io.py)."""

import os
import pathlib
import struct
import tempfile

import ml_dtypes
import numpy as np
from absl.testing import absltest
from safetensors import safe_open

from anyprec_jax import errors
from anyprec_jax.quantize import tensor_io
from anyprec_jax.quantize.tensor_io import OutTensor


def damaged_copies(good: pathlib.Path, out: pathlib.Path) -> dict[str, pathlib.Path]:
  """Damaged variants of a safetensors file: {case: path} (shared with test_faults)."""
  data = good.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  cases = {
      "truncated": data[:len(data) - 5],
      "garbage_header": b"\xff" * len(data),
      "garbage_json": data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n:],
      "too_short": data[:5],
  }
  paths = {}
  for name, blob in cases.items():
    paths[name] = out / f"{name}.safetensors"
    paths[name].write_bytes(blob)
  return paths


class TensorIoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = pathlib.Path(tmp.name)

  def test_round_trip_through_the_reference_reader(self):
    rng = np.random.default_rng(0)
    arrays = {
        "a.planes": rng.integers(0, 2 ** 32, (3, 5, 2), dtype=np.uint32),
        "a.lut3": rng.standard_normal((5, 8)).astype(np.float16),
        "b.weight": rng.standard_normal((4, 7)).astype(ml_dtypes.bfloat16),
        "c": rng.standard_normal(3).astype(np.float32),
        "d": np.arange(5, dtype=np.uint8),
    }
    path = self.tmp / "x.safetensors"
    tensor_io.write_safetensors(path, [OutTensor.of_array(n, a) for n, a in arrays.items()])
    import torch
    with safe_open(str(path), framework="pt") as f:
      self.assertEqual(f.metadata(), {"format": "pt"})
      self.assertEqual(sorted(f.keys()), sorted(arrays))
      got = f.get_tensor("b.weight")
      self.assertEqual(got.dtype, torch.bfloat16)
      np.testing.assert_array_equal(got.float().numpy(), arrays["b.weight"].astype(np.float32))
    with safe_open(str(path), framework="numpy") as f:
      for name in ("a.planes", "a.lut3", "c", "d"):
        np.testing.assert_array_equal(f.get_tensor(name), arrays[name])
      np.testing.assert_array_equal(f.get_slice("a.planes")[:2], arrays["a.planes"][:2])
    index = tensor_io.TensorIndex([path])
    for name, arr in arrays.items():
      np.testing.assert_array_equal(index.array(name), arr)
      self.assertEqual(index.raw(name), arr.tobytes())

  def test_failed_write_leaves_no_file(self):
    path = self.tmp / "y.safetensors"

    def boom():
      raise RuntimeError("killed")

    bad = OutTensor("x", "F32", (2,), 8, boom)
    with self.assertRaisesRegex(RuntimeError, "killed"):
      tensor_io.write_safetensors(path, [bad])
    self.assertEqual(list(self.tmp.iterdir()), [])

  def test_duplicates_and_bad_sizes_raise(self):
    a = OutTensor.of_array("x", np.zeros(2, np.float32))
    with self.assertRaisesRegex(ValueError, "duplicate"):
      tensor_io.write_safetensors(self.tmp / "z.safetensors", [a, a])
    short = OutTensor("x", "F32", (2,), 8, lambda: b"1234")
    with self.assertRaisesRegex(ValueError, "4 bytes, expected 8"):
      tensor_io.write_safetensors(self.tmp / "z.safetensors", [short])
    with self.assertRaisesRegex(ValueError, "appears in"):
      p = self.tmp / "p.safetensors"
      tensor_io.write_safetensors(p, [a])
      tensor_io.TensorIndex([p, p])


  def test_damaged_headers_name_the_file_before_reading_data(self):
    good = self.tmp / "good.safetensors"
    tensor_io.write_safetensors(good, [OutTensor.of_array("w", np.ones((4, 8), np.float32))])
    want = {"truncated": "tensor .w. ends at byte 128 .* only 123 data bytes",
            "garbage_header": "header length .* exceeds the file size",
            "garbage_json": "the header is not valid JSON", "too_short": "5 bytes, too short"}
    for case, path in damaged_copies(good, self.tmp).items():
      with self.assertRaisesRegex(errors.BadInputError, f"{path}: {want[case]}"):
        tensor_io.read_header(path)
    with self.assertRaisesRegex(errors.MissingInputError, "nope.safetensors not found"):
      tensor_io.read_header(self.tmp / "nope.safetensors")

  def test_content_digest_streams_and_rejects_non_finite(self):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = self.tmp / "w.safetensors"
    tensor_io.write_safetensors(path, [OutTensor.of_array("w", w)])
    index = tensor_io.TensorIndex([path])
    import hashlib
    self.assertEqual(index.content_digest("w", check_finite=True),
                     hashlib.sha256(w.tobytes()).hexdigest())
    w[1, 2] = np.nan
    tensor_io.write_safetensors(path, [OutTensor.of_array("w", w)])
    index = tensor_io.TensorIndex([path])
    index.content_digest("w")  # not checked: fine
    with self.assertRaisesRegex(errors.BadInputError, f"NaN.*'w' of {path}"):
      index.content_digest("w", check_finite=True)

  def test_full_disk_is_an_output_error_naming_the_file(self):
    path = self.tmp / "out.safetensors"
    # The temporary file the writer opens is /dev/full: every write fails, ENOSPC.
    (self.tmp / f".out.safetensors.tmp{os.getpid()}").symlink_to("/dev/full")
    with self.assertRaisesRegex(errors.OutputError,
                                f"cannot write {path}: No space left on device"):
      tensor_io.write_safetensors(path, [OutTensor.of_array("x", np.zeros(4096, np.float32))])
    self.assertEqual(list(self.tmp.iterdir()), [])

  def test_check_writable_dir(self):
    new = self.tmp / "a" / "b"
    tensor_io.check_writable_dir(new)
    self.assertEqual(list(self.tmp.iterdir()), [])  # created for the check, removed again
    (self.tmp / "file").write_text("x")
    with self.assertRaises(NotADirectoryError):
      tensor_io.check_writable_dir(self.tmp / "file")
    with self.assertRaises(OSError):
      tensor_io.check_writable_dir("/proc/anyprec-test")


if __name__ == "__main__":
  absltest.main()
