"""In-kernel decoding of bitplane words to LUT values, shared by the GEMV and dequant.

Two ways to turn codes into values (Park et al., 2024, §4 keeps the LUT in shared
memory; Pallas-Triton has no shared-memory gathers, so we choose between):

* `Lookup.REGISTERS` (b <= 4): each row's LUT lives in registers as byte tables (the
  low and the high bytes of 8 fp16/bf16 entries take 2 + 2 words); PTX `prmt` looks up
  four 3-bit codes per instruction, and two more `prmt` interleave the bytes back into
  half pairs. At 4 bits a third `prmt` per half picks, per byte, the table of entries
  0-7 or 8-15 by the code's top bit. About 2 (b=3) / 3.3 (b=4) integer ops per weight,
  no memory traffic.
* `Lookup.GATHER`: the flat LUT index row * 2^b + code goes to `lut_ref[idx]`, a
  gather load served by L1 (~6 integer ops per weight, mostly index and 64-bit address
  arithmetic, plus one load).

Both return the 32 values of every word of a [BW, BN] plane tile in kernel order.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from anyprec_jax.pallas import bitops
from anyprec_jax.pallas.triton import ptx


class Lookup(enum.Enum):
  REGISTERS = "registers"
  GATHER = "gather"


def default_lookup(bits: int) -> Lookup:
  return Lookup.REGISTERS if bits <= 4 else Lookup.GATHER


def _to_u32(v: jax.Array) -> jax.Array:
  """16-bit float tile -> its bit pattern in the low half of a uint32 tile."""
  return jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)


def register_tables(lut_ref, rows: jax.Array, bits: int) -> list:
  """Byte tables of each row's LUT: [(loA, loB, hiA, hiB)] per block of 8 entries.

  Args:
    lut_ref: [N * 2^b] flat LUT ref (16-bit floats).
    rows: int32 [BN] row ids.
    bits: b <= 4.

  Returns:
    ceil(2^b / 8) tuples of four uint32 [1, BN] tiles; byte e of loA/loB is the low
    byte of entry e / e + 4 of the block, hiA/hiB likewise for the high bytes.
  """
  n_entries = 1 << bits
  entries = [_to_u32(lut_ref[rows * n_entries + e])[None, :] for e in range(n_entries)]
  tables = []
  for block in range(-(-n_entries // 8)):
    words = []
    for high in (False, True):
      for half in range(2):
        word = jnp.zeros_like(entries[0])
        for e in range(4):
          idx = 8 * block + 4 * half + e
          if idx < n_entries:
            byte = (entries[idx] >> jnp.uint32(8)) if high else entries[idx]
            word = word | ((byte & jnp.uint32(0xFF)) << jnp.uint32(8 * e))
        words.append(word)
    tables.append((words[0], words[1], words[2], words[3]))
  return tables


def _lookup4(tables, sel, bsel, interpret):
  """Low and high bytes of the 4 entries selected by the 4 low nibbles of `sel`."""
  lo_a, lo_b, hi_a, hi_b = tables[0]
  lo = ptx.prmt(lo_a, lo_b, sel, interpret)
  hi = ptx.prmt(hi_a, hi_b, sel, interpret)
  if bsel is not None:  # 4 bits: byte t from table 1 where the code's top bit is set.
    lo1_a, lo1_b, hi1_a, hi1_b = tables[1]
    lo = ptx.prmt(lo, ptx.prmt(lo1_a, lo1_b, sel, interpret), bsel, interpret)
    hi = ptx.prmt(hi, ptx.prmt(hi1_a, hi1_b, sel, interpret), bsel, interpret)
  return lo, hi


def register_values(planes: list, bits: int, tables: list, dtype,
                    interpret: bool) -> list:
  """Values of every code of b <= 4 plane tiles through `prmt` byte-table look-ups.

  Args:
    planes: b uint32 tiles [BW, BN] (plane 0 = MSB).
    bits: b <= 4.
    tables: `register_tables(...)`.
    dtype: LUT dtype (fp16 or bf16).
    interpret: emulate `prmt` in jnp.

  Returns:
    32 float32 tiles [BW, BN] in kernel order (q = 8 s + t: column 4 t + s).
  """
  low = planes[1:] if bits == 4 else planes  # planes giving the 3 low code bits
  places = [len(low) - 1 - i for i in range(len(low))]
  vals = [None] * bitops.WORD_BITS
  for s in range(4):
    sel_word = bitops.field_words(low, places, s)
    bsel_word = None
    if bits == 4:  # nibble t of bsel = t + 4 * top bit
      bsel_word = ((bitops.shift(planes[0], s - 2) & jnp.uint32(0x44444444))
                   | jnp.uint32(0x32103210))
    for half in range(2):
      sel = bitops.shift(sel_word, 16 * half)
      bsel = None if bsel_word is None else bitops.shift(bsel_word, 16 * half)
      lo, hi = _lookup4(tables, sel, bsel, interpret)
      for pair, pattern in enumerate((0x5140, 0x7362)):
        v = ptx.prmt(lo, hi, pattern, interpret)  # two halves
        t = 4 * half + 2 * pair
        vals[8 * s + t], vals[8 * s + t + 1] = ptx.halves_to_f32(v, dtype, interpret)
  return vals


def gather_values(planes: list, bits: int, lut_ref, row_base: jax.Array) -> list:
  """Values of every code of b plane tiles through LUT gathers.

  Args:
    planes: b uint32 tiles [BW, BN] (plane 0 = MSB).
    bits: b.
    lut_ref: [N * 2^b] flat LUT ref.
    row_base: int32 [1, BN], row * 2^b.

  Returns:
    32 float32 tiles [BW, BN] in kernel order (`bitops.kernel_order(bits)`).
  """
  f = bitops.field_width(bits)
  fields = bitops.WORD_BITS // f
  if f == 4:
    places = [bits - 1 - i for i in range(bits)]
    words = [bitops.field_words(planes, places, s) for s in range(4)]
  else:
    words = bitops.transpose8(planes)
  mask = jnp.uint32((1 << bits) - 1)
  vals = []
  for q in range(bitops.WORD_BITS):
    s, t = divmod(q, fields)
    code = bitops.shift(words[s], f * t)
    if t != fields - 1:  # the top field has nothing above the code
      code = code & mask
    vals.append(lut_ref[code.astype(jnp.int32) | row_base].astype(jnp.float32))
  return vals
