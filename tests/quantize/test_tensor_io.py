"""Tests of safetensors streaming I/O (anyprec_jax/quantize/tensor_io.py)."""

import pathlib
import tempfile

import ml_dtypes
import numpy as np
from absl.testing import absltest
from safetensors import safe_open

from anyprec_jax.quantize import tensor_io
from anyprec_jax.quantize.tensor_io import OutTensor


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


if __name__ == "__main__":
  absltest.main()
