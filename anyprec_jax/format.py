"""Bitplane format of any-precision weights (Park et al., 2024, §3.2; DESIGN.md §2).

A parent code c[n, k] of P bits is stored as P bitplanes::

    planes: uint32 [P, N, ceil(K / 32)]
    plane p holds bit (P - 1 - p) of the code  (plane 0 = most significant bit)
    bit j of word w of a row holds column 32 * w + j

The b-bit code of a weight is the top b bits of its parent code, i.e. it is read from
planes 0..b-1 only:  code_b = sum_{p < b} plane_p << (b - 1 - p).  Padding columns
(K not a multiple of 32) hold code 0; they must never contribute to a product.

This module is the single owner of that layout: packing (numpy, for the quantizer) and
unpacking (jnp, traceable, the reference for the kernels).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

WORD_BITS = 32
MIN_BITS = 2
MAX_BITS = 8


def num_words(in_features: int) -> int:
  """Number of uint32 words per row for K = in_features columns."""
  return -(-in_features // WORD_BITS)


def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs integer codes into bitplanes.

  Args:
    codes: integer array [N, K] with values in [0, 2**bits).
    bits: number of bits P of the codes (1..8).

  Returns:
    uint32 array [P, N, ceil(K/32)], plane 0 = most significant bit.
  """
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be [N, K], got shape {codes.shape}")
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
  if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
    raise ValueError(f"codes out of range for {bits} bits: "
                     f"[{codes.min()}, {codes.max()}]")
  n, k = codes.shape
  w = num_words(k)
  padded = np.zeros((n, w * WORD_BITS), np.uint32)
  padded[:, :k] = codes.astype(np.uint32)
  padded = padded.reshape(n, w, WORD_BITS)  # [N, W, 32]
  weights = (np.uint32(1) << np.arange(WORD_BITS, dtype=np.uint32))  # [32]
  planes = np.empty((bits, n, w), np.uint32)
  for p in range(bits):
    bit = (padded >> np.uint32(bits - 1 - p)) & np.uint32(1)  # [N, W, 32]
    # Sum of distinct powers of two: exact in uint64, then narrowed.
    planes[p] = (bit.astype(np.uint64) * weights).sum(-1).astype(np.uint32)
  return planes


def unpack_codes(planes: jnp.ndarray, bits: int, in_features: int) -> jnp.ndarray:
  """Reads the b-bit codes from the top b bitplanes (pure jnp, traceable).

  Args:
    planes: uint32 [P, N, W] with P >= bits.
    bits: precision b to read (static).
    in_features: K, number of real columns (static).

  Returns:
    int32 [N, K] codes in [0, 2**bits).
  """
  if bits > planes.shape[0]:
    raise ValueError(f"asked for {bits} bits but only {planes.shape[0]} planes")
  top = planes[:bits]  # [b, N, W]
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)  # [32]
  bit = (top[..., None] >> shifts) & jnp.uint32(1)  # [b, N, W, 32]
  bit = bit.reshape(bits, top.shape[1], -1)[:, :, :in_features]  # [b, N, K]
  place = jnp.left_shift(
      jnp.uint32(1), jnp.arange(bits - 1, -1, -1, dtype=jnp.uint32))  # [b]
  codes = jnp.sum(bit * place[:, None, None], axis=0)  # [N, K]
  return codes.astype(jnp.int32)


def unpack_codes_np(planes: np.ndarray, bits: int, in_features: int) -> np.ndarray:
  """NumPy twin of `unpack_codes` (for host-side checks and tools)."""
  top = np.asarray(planes[:bits], np.uint32)
  shifts = np.arange(WORD_BITS, dtype=np.uint32)
  bit = (top[..., None] >> shifts) & np.uint32(1)
  bit = bit.reshape(bits, top.shape[1], -1)[:, :, :in_features]
  place = np.uint32(1) << np.arange(bits - 1, -1, -1, dtype=np.uint32)
  return (bit * place[:, None, None]).sum(0).astype(np.int32)
