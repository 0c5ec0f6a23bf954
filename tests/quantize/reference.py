"""Independent NumPy (float64) references for the quantizer tests."""

from __future__ import annotations

import numpy as np


def sample_weights(w: np.ndarray, f: np.ndarray) -> np.ndarray:
  """The original release's sample weights: 0 for zero weights, uniform if all 0."""
  s = np.where(w != 0, f, 0.0).astype(np.float64)
  zero = s.sum(axis=-1, keepdims=True) <= 0
  return np.where(zero, 1.0, s)


def weighted_error(w, f, codes, lut) -> np.ndarray:
  """Per-row sum_k s_k (w_k - lut[code_k])^2, float64 [N]."""
  s = sample_weights(w, f)
  deq = np.take_along_axis(np.asarray(lut, np.float64), np.asarray(codes, np.int64), 1)
  return (s * (np.asarray(w, np.float64) - deq) ** 2).sum(-1)


def optimal_error(x: np.ndarray, s: np.ndarray, n: int) -> float:
  """Exact optimum of 1-D weighted k-means with n clusters (dynamic programming).

  Clusters of an optimal 1-D solution are contiguous in sorted order, so
  D_c[j] = min_i D_{c-1}[i] + cost(i, j) over the sorted values; O(n K^2).
  """
  order = np.argsort(x, kind="stable")
  x = np.asarray(x, np.float64)[order]
  s = np.asarray(s, np.float64)[order]
  p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (s, s * x, s * x * x))
  i = np.arange(len(x) + 1)[:, None]
  j = np.arange(len(x) + 1)[None, :]
  w, s1, s2 = p0[j] - p0[i], p1[j] - p1[i], p2[j] - p2[i]
  cost = np.where(w > 0, s2 - s1 ** 2 / np.where(w > 0, w, 1.0), 0.0)
  cost = np.where(j >= i, np.maximum(cost, 0.0), np.inf)
  best = cost[0]
  for _ in range(n - 1):
    best = np.min(best[:, None] + cost, axis=0)
  return float(best[-1])


def cluster_means(w, f, codes, n: int) -> np.ndarray:
  """Per-row weighted mean of each cluster (plain mean if its weight is 0; NaN if empty)."""
  s = sample_weights(w, f)
  out = np.full((w.shape[0], n), np.nan)
  for r in range(w.shape[0]):
    for c in range(n):
      m = codes[r] == c
      if not m.any():
        continue
      ws = s[r, m].sum()
      out[r, c] = (s[r, m] @ w[r, m] / ws) if ws > 0 else w[r, m].mean()
  return out


def random_rows(rng: np.random.Generator, n: int, k: int, kind: str):
  """Test rows: Gaussian / heavy-tailed weights with assorted Fisher distributions."""
  if kind == "gauss_uniform":
    return rng.standard_normal((n, k)), np.ones((n, k))
  if kind == "gauss_rand":
    return rng.standard_normal((n, k)), rng.random((n, k))
  if kind == "gauss_cubed":
    return rng.standard_normal((n, k)), rng.random((n, k)) ** 3
  if kind == "student_heavy":
    return rng.standard_t(3, (n, k)), np.exp(rng.uniform(-12, 0, (n, k)))
  raise ValueError(kind)
