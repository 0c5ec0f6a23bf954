"""The any-precision quantized weight pytree (Park et al., 2024).

`AnyPrecWeight` stands in for a dense linear weight W [N = out, K = in] (Hugging Face
layout). `dequantize(w, bits)` is the single source of truth for what it means; every
kernel is tested against it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from anyprec_jax import errors
from anyprec_jax import format as fmt
from anyprec_jax import plane_layout
from anyprec_jax.plane_layout import PlaneLayout


def is_int(value) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_bits(value, what: str = "precision") -> int:
  """`value` as the width of one weight: an int (or numpy integer), nothing else.

  Raises:
    errors.UsageError: naming `what` and the value.
  """
  if not is_int(value):
    raise errors.UsageError(f"{what} must be an int (bits), got {value!r} of type "
                            f"{type(value).__name__}")
  return int(value)


def as_precision(value, what: str = "precision") -> int | float:
  """`value` as a precision: the one rule for every API and flag that takes one.

  An int (or numpy integer) b is the uniform b-bit model; a finite float is an
  average precision (3.5: a per-module allocation, `anyprec_jax.allocation`), and an
  integral float is the int (4.0 is 4). Strings and bools are refused rather than
  guessed at ("4", True).

  Raises:
    errors.UsageError: naming `what` and the value.
  """
  if is_int(value):
    return int(value)
  if isinstance(value, (float, np.floating)) and np.isfinite(value):
    return int(value) if float(value).is_integer() else float(value)
  raise errors.UsageError(f"{what} must be a number of bits (an int, or a float such "
                          f"as 3.5 for a per-layer allocation), got {value!r} of type "
                          f"{type(value).__name__}")


def is_fractional(precision) -> bool:
  """A precision (`as_precision`'s result) that is not a whole number of bits."""
  return isinstance(precision, float)


def as_precisions(value) -> tuple[int | float, ...] | None:
  """None, one precision, or an iterable (list, tuple, set, range) of them; sorted,
  unique (`as_precision`).

  Raises:
    errors.UsageError: a string, bool or other value (e.g. "34" is not (3, 4)).
  """
  if value is None:
    return None
  if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
    return (as_precision(value, "precisions"),)
  return tuple(sorted({as_precision(b, "each of precisions") for b in value}))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["planes", "luts"],
    meta_fields=["in_features", "bits", "layout"],
)
@dataclasses.dataclass(frozen=True)
class AnyPrecWeight:
  """A linear weight stored as bitplanes plus one LUT per precision.

  Invariant:
    planes: uint32 [P, N, W], plane 0 = MSB of the parent code, bits in `layout`'s
      order: FORMAT (format.py, W = ceil(K/32)), TC or TC_TILED (plane_layout.py,
      W = 4 ceil(K/128)).
    luts:   {b: float [N, 2**b]} for every loaded precision b; max(luts) <= P.
    bits:   the active precision (static), one of the keys of `luts`.
    in_features: K (static).
    layout: the planes' bit order (static; kernels are chosen by it).
  The dense weight at precision b is W_b[n, k] = luts[b][n, code_b(n, k)], where code_b
  is read from planes 0..b-1. Because `bits` is static metadata, a pytree holding
  weights at another precision has another treedef, so `jax.jit` compiles exactly one
  program per precision.
  """

  planes: jax.Array
  luts: Mapping[int, jax.Array]
  in_features: int
  bits: int
  layout: PlaneLayout = PlaneLayout.FORMAT

  def __post_init__(self):
    if self.bits not in self.luts:
      raise ValueError(
          f"precision {self.bits} has no LUT; loaded: {sorted(self.luts)}")

  @property
  def out_features(self) -> int:
    return self.planes.shape[1]

  @property
  def shape(self) -> tuple[int, int]:
    """Shape of the dense weight it stands for, [N, K]."""
    return (self.planes.shape[1], self.in_features)

  def with_layout(self, layout: PlaneLayout) -> "AnyPrecWeight":
    """The same weight with its planes re-ordered into `layout` (a device gather).

    TC_TILED needs N % 16 == 0; other weights get TC (the same bit order, rows not
    interleaved), which every kernel also reads.
    """
    layout = PlaneLayout(layout)
    if layout is PlaneLayout.TC_TILED and not plane_layout.tileable(self.out_features):
      layout = PlaneLayout.TC
    if layout is self.layout:
      return self
    k = self.in_features
    planes = self.planes
    if self.layout is PlaneLayout.TC_TILED:
      planes = plane_layout.untile(planes)
    if self.layout is not PlaneLayout.FORMAT:
      planes = plane_layout.from_tc(planes, k)
    if layout is not PlaneLayout.FORMAT:
      planes = plane_layout.to_tc(planes, k)
    if layout is PlaneLayout.TC_TILED:
      planes = plane_layout.tile(planes)
    return dataclasses.replace(self, planes=planes, layout=layout)

  @property
  def precisions(self) -> tuple[int, ...]:
    return tuple(sorted(self.luts))

  def with_bits(self, bits: int) -> "AnyPrecWeight":
    """Same arrays, another active precision (a loaded width)."""
    bits = as_bits(bits)
    if bits not in self.luts:
      raise errors.UsageError(
          f"precision {bits} not supported; supported: {sorted(self.luts)}")
    return dataclasses.replace(self, bits=bits)


def from_codes(codes: np.ndarray, luts: Mapping[int, np.ndarray], parent_bits: int,
               bits: int | None = None) -> AnyPrecWeight:
  """Builds an `AnyPrecWeight` from parent codes [N, K] and per-precision LUTs."""
  planes = fmt.pack_bitplanes(codes, parent_bits)
  return AnyPrecWeight(
      planes=jnp.asarray(planes),
      luts={int(b): jnp.asarray(v) for b, v in luts.items()},
      in_features=int(np.shape(codes)[1]),
      bits=int(max(luts) if bits is None else bits))


def concat_rows(weights) -> AnyPrecWeight | None:
  """One weight whose rows are those of `weights` in order ([sum N_i, K]), or None
  where they cannot share one: other K, active precision, loaded precisions or layout,
  or TC_TILED rows that do not fill whole 16-row tiles (`plane_layout.tileable`).

  Every layout keeps whole rows, so the planes and LUTs just concatenate along N; the
  result runs one kernel launch where the parts ran one each (q/k/v, gate/up).
  """
  first = weights[0]
  for w in weights:
    if (not isinstance(w, AnyPrecWeight) or w.in_features != first.in_features
        or w.bits != first.bits or w.precisions != first.precisions
        or w.layout is not first.layout or w.planes.shape[0] != first.planes.shape[0]
        or (w.layout is PlaneLayout.TC_TILED
            and not plane_layout.tileable(w.out_features))):
      return None
  planes = jnp.concatenate([w.planes for w in weights], axis=1)  # [P, sum N, W]
  luts = {b: jnp.concatenate([w.luts[b] for w in weights], axis=0)
          for b in first.precisions}  # [sum N, 2^b]
  return dataclasses.replace(first, planes=planes, luts=luts)


def dequantize(w: AnyPrecWeight, bits: int | None = None,
               dtype=jnp.float32) -> jax.Array:
  """Dense weight [N, K] at precision `bits` (default: the active one). Pure jnp."""
  bits = w.bits if bits is None else as_bits(bits)
  if bits not in w.luts:
    raise errors.UsageError(
        f"precision {bits} not supported; supported: {sorted(w.luts)}")
  planes = w.planes
  if w.layout is PlaneLayout.TC_TILED:
    planes = plane_layout.untile(planes[:bits])
  if w.layout is not PlaneLayout.FORMAT:
    planes = plane_layout.from_tc(planes[:bits], w.in_features)
  codes = fmt.unpack_codes(planes, bits, w.in_features)  # [N, K]
  lut = w.luts[bits].astype(dtype)  # [N, 2^b]
  return jnp.take_along_axis(lut, codes, axis=1)  # [N, K]


def set_precision(tree, bits: int):
  """Returns `tree` with every `AnyPrecWeight` switched to precision `bits`."""
  return jax.tree_util.tree_map(
      lambda x: x.with_bits(bits) if isinstance(x, AnyPrecWeight) else x,
      tree, is_leaf=lambda x: isinstance(x, AnyPrecWeight))


def min_bits(tree) -> int | None:
  """The lowest active precision of the `AnyPrecWeight`s in `tree` (None: none)."""
  bits = [x.bits for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, AnyPrecWeight)) if isinstance(x, AnyPrecWeight)]
  return min(bits) if bits else None


def tree_path(key_path) -> str:
  """"layers_0/attn/qkv_proj/weight" of a `jax.tree_util` key path of a dict tree."""
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def weight_paths(tree) -> list[str]:
  """Paths (`tree_path`) of every `AnyPrecWeight` in `tree`, in leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, AnyPrecWeight))[0]
  return [tree_path(p) for p, x in leaves if isinstance(x, AnyPrecWeight)]


def set_widths(tree, widths: Mapping[str, int]):
  """Returns `tree` with each `AnyPrecWeight` at its own width: `widths[path]` (a
  per-module allocation; one jit program per allocation, as per precision).

  Raises:
    KeyError: an `AnyPrecWeight` whose path is not in `widths`.
  """
  def visit(key_path, x):
    if not isinstance(x, AnyPrecWeight):
      return x
    path = tree_path(key_path)
    if path not in widths:
      raise KeyError(f"no width for the quantized weight {path}")
    return x.with_bits(widths[path])

  return jax.tree_util.tree_map_with_path(
      visit, tree, is_leaf=lambda x: isinstance(x, AnyPrecWeight))
