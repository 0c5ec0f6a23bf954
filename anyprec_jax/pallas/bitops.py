"""Word-wide bit manipulation shared by the kernels of both backends (DESIGN.md §3).

Any-Precision LLM (Park et al., ICML 2024, §4) rebuilds b-bit codes from b bitplanes
with mask-and-shift on whole words rather than bit by bit. Two word-wide transposes:

* `field_words` (b <= 4): for a field width F = 4 and a shift s in [0, 4),
  C_s = OR_i ((P_i >> s) & R) << j_i (R = bit 0 of every nibble) puts bit j_i of the
  code of column 4t + s into nibble t. Two integer ops per plane per 8 codes.
* `transpose8` (b >= 5): the 8x8 bit-matrix transpose by three rounds of delta swaps
  (Hacker's Delight §7-3) on all four byte lanes at once; ~60 ops per 32 codes. Word
  B_s then holds in byte t the code of column 8t + s.

Either way codes come out in "kernel order" q = s * (32/F) + t, not in column order.
Kernels never un-permute the weights: they read activations permuted the same way
(`permute_columns`), which is free since a dot product does not care about order.

`prmt` models PTX's byte permute in jnp (one instruction: four 3-bit table look-ups
into an 8-byte table, or a byte shuffle). On a GPU the kernels emit the instruction
itself (`triton/ptx.py`, `mosaic/ptx.py`); the Triton kernels run this model on the
Pallas interpreter, and the tests replay the Mosaic kernels' lane decode with it.

Pure jnp, no backend: shared by the Triton kernels (`triton/`), the Mosaic GPU
kernels' MLIR twins (`mosaic/ptx.py`), `kernels.py` and the tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def field_width(bits: int) -> int:
  """Bits per code field of the transposed words: 4 for b <= 4, else 8."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in 1..8, got {bits}")
  return 4 if bits <= 4 else 8


@functools.cache
def kernel_order(bits: int) -> np.ndarray:
  """int [32]: column within a word of the code at kernel position q."""
  f = field_width(bits)
  fields = WORD_BITS // f
  return np.array([f * (q % fields) + q // fields for q in range(WORD_BITS)], np.int32)


def permute_columns(x: jnp.ndarray, bits: int, padded_words: int) -> jnp.ndarray:
  """Zero-pads and reorders activations to the kernels' column order.

  Args:
    x: [M, K] activations.
    bits: precision b (decides the order).
    padded_words: Wp >= ceil(K / 32); columns K..32*Wp-1 are zero.

  Returns:
    [M, 32, Wp]: out[m, q, w] = x[m, 32 * w + kernel_order(bits)[q]] (0 past K).
  """
  m, k = x.shape
  xp = jnp.pad(x, ((0, 0), (0, WORD_BITS * padded_words - k)))  # [M, 32 Wp]
  xp = xp.reshape(m, padded_words, WORD_BITS)  # [M, Wp, 32]
  xp = xp[:, :, kernel_order(bits)]  # [M, Wp, 32] in kernel order
  return jnp.transpose(xp, (0, 2, 1))  # [M, 32, Wp]


def shift(v, amount: int):
  """v >> amount for amount >= 0, v << -amount otherwise (static amount)."""
  if amount > 0:
    return v >> jnp.uint32(amount)
  if amount < 0:
    return v << jnp.uint32(-amount)
  return v


def field_words(planes: list, places: list[int], s: int) -> jax.Array:
  """C_s for nibble fields: bit `places[i]` of nibble t = bit (4t + s) of planes[i].

  Args:
    planes: uint32 tiles of one shape.
    places: bit position (0..3) of each plane inside a nibble.
    s: column offset 0..3 within each group of 4 columns.

  Returns:
    uint32 tile: nibble t holds the bits of column 4t + s.
  """
  acc = None
  for plane, j in zip(planes, places):
    term = shift(plane, s - j) & jnp.uint32(0x11111111 << j)
    acc = term if acc is None else acc | term
  return acc


def transpose8_with(planes: list, shr, shl, band, bxor) -> list:
  """The delta-swap rounds of `transpose8` over any word type.

  Args:
    planes: b <= 8 words (plane 0 = MSB of the code).
    shr, shl: (word, static amount) -> word; band: (word, static mask) -> word;
    bxor: (word, word) -> word. jnp tiles here, MLIR values in `mosaic/ptx.py`.

  Returns:
    8 words B_0..B_7 (byte t of B_s = code of column 8t + s); None for a word that
    stays zero (only when b is small).
  """
  b = len(planes)
  # Word i carries code bit i (LSB first); missing high bits are zero words (None).
  rows = [planes[b - 1 - i] if i < b else None for i in range(8)]
  for k, mask in ((4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
    for i in range(8):
      if i & k:
        continue
      lo, hi = rows[i], rows[i + k]
      if lo is None and hi is None:
        continue
      lo_s = None if lo is None else shr(lo, k)
      if lo_s is None:
        t = band(hi, mask)
      elif hi is None:
        t = band(lo_s, mask)
      else:
        t = band(bxor(lo_s, hi), mask)
      rows[i + k] = t if hi is None else bxor(hi, t)
      t_up = shl(t, k)
      rows[i] = t_up if lo is None else bxor(lo, t_up)
  return rows


def transpose8(planes: list) -> list:
  """Byte-field codes from up to 8 planes (plane 0 = MSB of the code).

  Args:
    planes: b <= 8 uint32 tiles of one shape.

  Returns:
    8 uint32 tiles B_0..B_7: byte t of B_s is the b-bit code of column 8t + s.
  """
  return transpose8_with(planes, lambda v, k: v >> jnp.uint32(k),
                         lambda v, k: v << jnp.uint32(k),
                         lambda v, m: v & jnp.uint32(m), lambda a, b: a ^ b)


def prmt(a, b, c):
  """PTX prmt.b32 (default mode) in jnp: byte i of the result = byte (c's nibble i & 7)
  of the pair {b:a}; a nibble with bit 3 set replicates the sign bit of that byte.

  Args:
    a, b: uint32 tiles (bytes 0-3 and 4-7 of the table); broadcastable.
    c: uint32 selector tile (its low 16 bits are read) or a static int.

  Returns:
    uint32 tile of the broadcast shape.
  """
  if isinstance(c, int):  # static selector: plain byte moves
    a, b = jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32)
    out = None
    for i in range(4):
      nib = (c >> (4 * i)) & 0xF
      src = a if (nib & 7) < 4 else b
      byte = (src >> jnp.uint32(8 * (nib & 3))) & jnp.uint32(0xFF)
      if nib & 8:
        byte = jnp.where(byte >= 0x80, jnp.uint32(0xFF), jnp.uint32(0))
      byte = byte << jnp.uint32(8 * i)
      out = byte if out is None else out | byte
    return out
  a, b, c = (jnp.asarray(v).astype(jnp.uint32) for v in (a, b, c))
  out = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, c.shape), jnp.uint32)
  for i in range(4):
    nib = (c >> jnp.uint32(4 * i)) & jnp.uint32(0xF)
    sel = nib & jnp.uint32(7)
    src = jnp.where(sel < 4, a, b)
    byte = (src >> ((sel & jnp.uint32(3)) * jnp.uint32(8))) & jnp.uint32(0xFF)
    sign = jnp.where(byte >= 0x80, jnp.uint32(0xFF), jnp.uint32(0))
    byte = jnp.where(nib >= 8, sign, byte)
    out = out | (byte << jnp.uint32(8 * i))
  return out
