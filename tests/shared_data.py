"""Access to ../shared (real models and text) for tests; everything skips without it.

Converted Hugging Face directories are cached under $ANYPREC_TEST_CACHE (default
/tmp/anyprec_test_cache) so the conversion runs once per machine.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys
import unittest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ANYPREC_SHARED", REPO.parent / "shared"))
CACHE = pathlib.Path(os.environ.get("ANYPREC_TEST_CACHE", "/tmp/anyprec_test_cache"))

SMOLLM2_GGUF = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"


def shared_path(rel: str) -> pathlib.Path:
  """Path inside ../shared; raises unittest.SkipTest when it is absent."""
  path = SHARED / rel
  if not path.exists():
    raise unittest.SkipTest(f"{path} not available (../shared missing)")
  return path


def _convert(name: str, cmd: list[str]) -> pathlib.Path:
  out = CACHE / name
  CACHE.mkdir(parents=True, exist_ok=True)
  with open(CACHE / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "model.safetensors").exists():
      subprocess.run([sys.executable, *cmd, str(out)], check=True,
                     stdout=subprocess.DEVNULL)
  return out


def smollm2_dir() -> pathlib.Path:
  """SmolLM2-135M-Instruct converted to an HF directory (float32)."""
  gguf = shared_path(SMOLLM2_GGUF)
  try:
    import gguf as _  # noqa: F401
  except ImportError as e:
    raise unittest.SkipTest("package gguf missing") from e
  tool = shared_path("tools/gguf_to_hf.py")
  return _convert("smollm2-135m-instruct-hf",
                  [str(tool), str(gguf), "--tokenizer_dir", str(gguf.parent)])


def stories260k_dir() -> pathlib.Path:
  """llama2.c stories260K converted to an HF directory (float32)."""
  model = shared_path("models/stories260k/stories260K.bin")
  tok = shared_path("models/stories260k/tok512.bin")
  tool = shared_path("tools/llama2c_to_hf.py")
  return _convert("stories260k-hf", [str(tool), str(model), str(tok)])
