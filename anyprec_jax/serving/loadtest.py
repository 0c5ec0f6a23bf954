"""A bounded load run against a running server: `requests` completions at a fixed
`concurrency` (a thread pool of that size, so at most that many in flight), each
generating exactly `max_tokens` (`ignore_eos`). Reports per-request latency
percentiles and total generated tokens per wall-clock second.

    result = run_load("http://127.0.0.1:8000", "smol-anyprec@4", requests=64,
                      concurrency=4, max_tokens=32)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class LoadResult:
  """One load run.

  Attributes:
    model: model id asked for; precision: the precision that answered (last response).
    concurrency, requests: the run's shape.
    latencies_s: per request, send to last byte.
    completion_tokens: tokens generated over all requests.
    wall_s: first send to last response.
  """
  model: str
  precision: int
  concurrency: int
  requests: int
  latencies_s: tuple[float, ...]
  completion_tokens: int
  wall_s: float

  def percentile(self, q: float) -> float:
    """The q-th percentile (0..100) of the latencies, nearest rank."""
    xs = sorted(self.latencies_s)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
    return xs[k]

  @property
  def tokens_per_s(self) -> float:
    return self.completion_tokens / self.wall_s


def run_load(url: str, model: str, *, requests: int, concurrency: int, max_tokens: int,
             prompt: str = "The capital of France is", timeout: float = 600.0
             ) -> LoadResult:
  """Runs the load; raises RuntimeError on any non-200 answer."""
  import httpx  # The `serve` / `test` extras.
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
          "temperature": 0, "ignore_eos": True}
  with httpx.Client(base_url=url, timeout=timeout,
                    limits=httpx.Limits(max_connections=concurrency)) as client:

    def one(_):
      start = time.perf_counter()
      r = client.post("/v1/completions", json=body)
      if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text}")
      got = r.json()
      return time.perf_counter() - start, got["usage"]["completion_tokens"], got["precision"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
      got = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
  return LoadResult(model, got[-1][2], concurrency, requests, tuple(g[0] for g in got),
                    sum(g[1] for g in got), wall)


def markdown_table(results: Sequence[LoadResult]) -> str:
  """| precision | concurrency | requests | p50 ms | p99 ms | tokens/s | rows."""
  lines = ["| precision | concurrency | requests | tokens/request | p50 latency (ms) | "
           "p99 latency (ms) | generated tokens/s |", "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r.precision} | {r.concurrency} | {r.requests} | "
                 f"{r.completion_tokens // r.requests} | {1e3 * r.percentile(50):.0f} | "
                 f"{1e3 * r.percentile(99):.0f} | {r.tokens_per_s:.1f} |")
  return "\n".join(lines) + "\n"
