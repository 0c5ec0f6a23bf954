"""Bit orders of the bitplanes in memory: the format's and the tensor-core one.

`PlaneLayout.FORMAT` is the checkpoint format's order (format.py: bit j of word w =
column 32w + j). `PlaneLayout.TC` is the order the Mosaic GPU kernels read best
(`pallas/mosaic/gemv_tc.py`); checkpoints are converted to it once, at load time.
`PlaneLayout.TC_TILED` is the TC bit order with the rows of each 16-row tile interleaved
(`tile`), so that one warp load of the tensor-core GEMV reads 256 contiguous bytes.

The m16n8k16 MMA gives lane (g, q) = (lane // 4, lane % 4) the A elements of rows g and
g + 8 at columns 16 s + 2q + {0, 1, 8, 9} of each k16 step s. Over a block of 128
columns (8 steps) that is 32 columns per row, so each lane reads exactly one 32-bit word
per plane and row if the planes are re-ordered once (offline or at load time):

  word 4 beta + q of a row holds, at bit pi = 16 h + 4 t + s (h < 2, t < 4, s < 4),
  column 128 beta + 16 (2 s + h) + 2 q + (t & 1) + 8 (t >> 1).

Then the nibble fields C_s of `bitops.field_words` carry in nibbles 4h .. 4h + 3 the codes
of step 2 s + h in A-register order (v(2q), v(2q+1), v(2q+8), v(2q+9)), which `prmt`
table look-ups turn straight into the A registers. K is padded to a multiple of 128
(padding columns hold code 0 and meet zero activations).
"""

from __future__ import annotations

import enum
import functools

import jax.numpy as jnp
import numpy as np

class PlaneLayout(enum.Enum):
  FORMAT = "format"
  TC = "tc"
  TC_TILED = "tc_tiled"


BLOCK = 128  # columns per block
WORD_BITS = 32


@functools.cache
def block_columns() -> np.ndarray:
  """int32 [4, 32]: column within a 128-block of (word q, bit pi)."""
  out = np.zeros((4, 32), np.int32)
  for q in range(4):
    for pi in range(32):
      h, t, s = pi // 16, (pi // 4) % 4, pi % 4
      out[q, pi] = 16 * (2 * s + h) + 2 * q + (t & 1) + 8 * (t >> 1)
  assert sorted(out.ravel().tolist()) == list(range(BLOCK))
  return out


def num_words(in_features: int) -> int:
  """Words per row in the tensor-core order: K padded to a multiple of 128."""
  return -(-in_features // BLOCK) * (BLOCK // WORD_BITS)


def _bits(planes):  # [P, N, W] uint32 -> [P, N, W * 32] uint32 in {0, 1}
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  b = (planes[..., None] >> shifts) & jnp.uint32(1)
  return b.reshape(*planes.shape[:-1], -1)


def _pack(bits):  # [..., 32 * W] -> [..., W]
  b = bits.reshape(*bits.shape[:-1], -1, WORD_BITS).astype(jnp.uint32)
  return jnp.sum(b << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1,
                 dtype=jnp.uint32)


def to_tc(planes: jnp.ndarray, in_features: int) -> jnp.ndarray:
  """Format planes [P, N, ceil(K/32)] (bit j of word w = column 32w + j) -> [P, N, W_tc]."""
  p, n, _ = planes.shape
  w_tc = num_words(in_features)
  cols = _bits(planes)[..., :in_features]  # [P, N, K]
  cols = jnp.pad(cols, ((0, 0), (0, 0), (0, w_tc * WORD_BITS - in_features)))
  blocks = cols.reshape(p, n, -1, BLOCK)  # [P, N, KB, 128]
  tc = blocks[..., jnp.asarray(block_columns().ravel())]  # [P, N, KB, 4*32]
  return _pack(tc.reshape(p, n, -1))


def from_tc(planes_tc: jnp.ndarray, in_features: int) -> jnp.ndarray:
  """Inverse of `to_tc`: [P, N, W_tc] -> format planes [P, N, ceil(K/32)]."""
  p, n, _ = planes_tc.shape
  bits = _bits(planes_tc).reshape(p, n, -1, BLOCK)  # [P, N, KB, 128] in tc order
  inv = np.argsort(block_columns().ravel())
  cols = bits[..., jnp.asarray(inv)].reshape(p, n, -1)[..., :in_features]
  w = -(-in_features // WORD_BITS)
  cols = jnp.pad(cols, ((0, 0), (0, 0), (0, w * WORD_BITS - in_features)))
  return _pack(cols)


def tc_column(word, bit):
  """Column held by (word, bit) in the TC order (ints or int arrays)."""
  cols = block_columns()
  return BLOCK * (word // 4) + cols[word % 4, bit]


def words_for(layout: PlaneLayout, in_features: int) -> int:
  """Words per row of planes in `layout`."""
  if layout in (PlaneLayout.TC, PlaneLayout.TC_TILED):
    return num_words(in_features)
  return -(-in_features // WORD_BITS)


TILE_ROWS = 16  # rows of one MMA tile


def tile(planes_tc: jnp.ndarray) -> jnp.ndarray:
  """TC planes [P, N, W_tc] -> TC_TILED planes of the same shape (N % 16 == 0).

  Per plane, the words are stored in the order [N/16 tile][KB block][8 g][4 q][2 h]:
  word 4 * block + q of row 16 * tile + 8 h + g. Lane 4 g + q of a warp then finds its
  two words of a (tile, block) - rows g and g + 8, word q - side by side, and the 32
  lanes' 64 words are one contiguous 256-byte run.
  """
  p, n, w = planes_tc.shape
  if n % TILE_ROWS or w % 4:
    raise ValueError(f"tiled planes need N % {TILE_ROWS} == 0 and whole blocks, got "
                     f"{planes_tc.shape}")
  t = planes_tc.reshape(p, n // TILE_ROWS, 2, 8, w // 4, 4)  # [P, T, h, g, KB, q]
  return t.transpose(0, 1, 4, 3, 5, 2).reshape(p, n, w)


def untile(planes_tiled: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `tile`: TC_TILED planes -> TC planes [P, N, W_tc]."""
  p, n, w = planes_tiled.shape
  t = planes_tiled.reshape(p, n // TILE_ROWS, w // 4, 8, 4, 2)  # [P, T, KB, g, q, h]
  return t.transpose(0, 1, 5, 3, 2, 4).reshape(p, n, w)


def tileable(out_features: int) -> bool:
  """Whether a weight with N rows can take the TC_TILED layout."""
  return out_features % TILE_ROWS == 0


def x_to_tc(x: jnp.ndarray, in_features: int) -> jnp.ndarray:
  """[M, K] activations -> [M, 32 * W_tc] in the TC planes' natural word order.

  Column 32w + j of the result is the activation that meets bit j of word w of TC
  planes (0 for padding), so a kernel written for format planes runs on TC planes
  with these activations.
  """
  w_tc = num_words(in_features)
  word = np.arange(w_tc)[:, None]
  bit = np.arange(WORD_BITS)[None, :]
  src = tc_column(word, bit).reshape(-1)  # [32 W_tc]
  xp = jnp.pad(x, ((0, 0), (0, w_tc * WORD_BITS - in_features)))
  return xp[:, jnp.asarray(src)]
