"""Which precision serves a request that does not pin one (the paper's serving
scenarios: per-query latency needs, load that changes over time).

`FixedPolicy` always answers the default precision. `AdaptivePolicy` keeps, per
(precision, batch bucket), an exponential moving average of the measured per-token
decode latency (ms per step of a batch of that bucket, as the batcher reports it) and
picks the highest precision whose estimate at the current load meets the target.
The load is the number of requests queued or running, the new one included, mapped
to the batch bucket it would run in (`engine.batch_bucket`). A (precision, bucket)
never measured, or last measured more than `stale_s` ago, counts as meeting the
target: the policy tries it and learns, so it recovers a precision whose slowness
was transient. When nothing meets the target it answers the lowest precision.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from anyprec_jax.serving.engine import batch_bucket


class FixedPolicy:
  """Always `precision`."""

  def __init__(self, precision: int):
    self.precision = precision
    self.last_choice = precision

  def choose(self, load: int) -> int:
    del load
    return self.precision

  def record(self, precision: int, batch: int, ms_per_token: float) -> None:
    del precision, batch, ms_per_token

  def estimates(self) -> dict[tuple[int, int], float]:
    return {}


class AdaptivePolicy:
  """The highest precision whose recent per-token latency at this load meets a target.

  Attributes:
    precisions: candidates, ascending.
    target_ms: per-token latency target.
    last_choice: the precision answered last (for /metrics).
  """

  def __init__(self, precisions: Sequence[int], target_ms: float, max_batch: int, *,
               stale_s: float = 30.0, alpha: float = 0.5,
               clock: Callable[[], float] = time.monotonic):
    """Args:
      precisions: the served precisions.
      target_ms: per-token latency target (ms), > 0.
      max_batch: the batcher's largest batch (loads above it map to it).
      stale_s: measurements older than this are ignored.
      alpha: weight of a new measurement in the moving average, in (0, 1].
      clock: seconds, monotonic (injected in tests).
    """
    if not target_ms > 0 or not 0 < alpha <= 1:
      raise ValueError(f"need target_ms > 0 and alpha in (0, 1], got {target_ms}, {alpha}")
    self.precisions = tuple(sorted(precisions))
    self.target_ms = float(target_ms)
    self.max_batch = max_batch
    self.stale_s, self.alpha, self._clock = stale_s, alpha, clock
    self._ema: dict[tuple[int, int], tuple[float, float]] = {}  # -> (ms, when)
    self._lock = threading.Lock()
    self.last_choice = self.precisions[-1]

  def record(self, precision: int, batch: int, ms_per_token: float) -> None:
    """Adds one measurement: a batch of `batch` rows decoded at `ms_per_token`."""
    key = (precision, batch_bucket(batch, self.max_batch))
    now = self._clock()
    with self._lock:
      old = self._ema.get(key)
      fresh = old is not None and now - old[1] <= self.stale_s
      ms = (self.alpha * ms_per_token + (1 - self.alpha) * old[0]) if fresh else ms_per_token
      self._ema[key] = (ms, now)

  def estimate(self, precision: int, load: int) -> float | None:
    """The recent ms/token of `precision` at `load`; None: unknown or stale."""
    key = (precision, batch_bucket(max(load, 1), self.max_batch))
    with self._lock:
      got = self._ema.get(key)
    if got is None or self._clock() - got[1] > self.stale_s:
      return None
    return got[0]

  def choose(self, load: int) -> int:
    """The precision for a new request while `load` requests (it included) are active."""
    choice = self.precisions[0]
    for b in reversed(self.precisions):
      est = self.estimate(b, load)
      if est is None or est <= self.target_ms:
        choice = b
        break
    self.last_choice = choice
    return choice

  def estimates(self) -> dict[tuple[int, int], float]:
    """{(precision, batch bucket): ms/token} of the fresh measurements."""
    now = self._clock()
    with self._lock:
      return {k: ms for k, (ms, t) in self._ema.items() if now - t <= self.stale_s}
