"""Counters, gauges and histograms of the server, rendered as Prometheus text
(exposition format 0.0.4) for `GET /metrics`. Thread-safe: the batcher thread and the
event loop both write.

Series (label `precision` on all but the error counter):
  anyprec_requests_total, anyprec_requests_cancelled_total, anyprec_request_errors_total{code}
  anyprec_prompt_tokens_total, anyprec_generation_tokens_total
  anyprec_batches_total, anyprec_batch_rows_total (rows = requests per batch, summed)
  anyprec_queue_length, anyprec_running_requests (gauges, read from the batcher)
  anyprec_request_latency_seconds, anyprec_time_per_output_token_seconds (histograms)
  anyprec_policy_choices_total, anyprec_policy_precision (last choice),
  anyprec_policy_latency_estimate_ms{precision,batch}
"""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

_COUNTERS = {
    "anyprec_requests_total": "Requests answered, per precision.",
    "anyprec_requests_cancelled_total": "Requests whose client went away first.",
    "anyprec_request_errors_total": "Requests refused, per HTTP status code.",
    "anyprec_prompt_tokens_total": "Prompt tokens of answered requests.",
    "anyprec_generation_tokens_total": "Tokens generated.",
    "anyprec_batches_total": "Batched generations run.",
    "anyprec_batch_rows_total": "Requests over all batches (divide by batches for the mean).",
    "anyprec_policy_choices_total": "Precisions the policy chose for unpinned requests.",
}
_HISTOGRAMS = {
    "anyprec_request_latency_seconds": ("Arrival to last token.", LATENCY_BUCKETS),
    "anyprec_time_per_output_token_seconds": (
        "Decode time per generated token after the first.", TOKEN_BUCKETS),
}


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
  inner = ",".join(f'{k}="{v}"' for k, v in pairs)
  return "{" + inner + "}" if inner else ""


class _Histogram:

  def __init__(self, bounds):
    self.bounds = tuple(bounds)
    self.counts = [0] * (len(self.bounds) + 1)
    self.sum = 0.0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.bounds, value)] += 1
    self.sum += value

  def lines(self, name: str, labels: tuple) -> list[str]:
    out, total = [], 0
    for bound, count in zip(self.bounds + (float("inf"),), self.counts):
      total += count
      le = "+Inf" if bound == float("inf") else repr(float(bound))
      out.append(f"{name}_bucket{_labels(labels + (('le', le),))} {total}")
    out.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
    out.append(f"{name}_count{_labels(labels)} {total}")
    return out


class Metrics:
  """The server's metrics; `render` gives the /metrics page."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counters: dict[str, dict[tuple, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float))
    self._hists: dict[str, dict[tuple, _Histogram]] = collections.defaultdict(dict)

  def inc(self, name: str, value: float = 1, **labels) -> None:
    """Adds `value` to counter `name` at `labels`."""
    assert name in _COUNTERS, name
    with self._lock:
      self._counters[name][tuple(sorted(labels.items()))] += value

  def observe(self, name: str, value: float, **labels) -> None:
    """Adds one observation to histogram `name` at `labels`."""
    key = tuple(sorted(labels.items()))
    with self._lock:
      hist = self._hists[name].get(key)
      if hist is None:
        hist = self._hists[name][key] = _Histogram(_HISTOGRAMS[name][1])
      hist.observe(value)

  def value(self, name: str, **labels) -> float:
    """A counter's current value (0 if never incremented)."""
    with self._lock:
      return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

  def render(self, gauges: dict[str, tuple[str, dict[tuple, float]]] | None = None
             ) -> str:
    """Prometheus text.

    Args:
      gauges: {name: (help, {label pairs: value})} read at render time (queue
        lengths, the policy's state).
    """
    lines = []
    with self._lock:
      for name, help_ in _COUNTERS.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        for key, v in sorted(self._counters[name].items()):
          lines.append(f"{name}{_labels(key)} {_num(v)}")
      for name, (help_, _) in _HISTOGRAMS.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for key, hist in sorted(self._hists[name].items()):
          lines += hist.lines(name, key)
    for name, (help_, series) in (gauges or {}).items():
      lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
      for key, v in sorted(series.items()):
        lines.append(f"{name}{_labels(key)} {_num(v)}")
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
  return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse(text: str) -> dict[str, float]:
  """{'name{labels}': value} of a Prometheus text page (comments skipped); for tests
  and clients that read /metrics."""
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      key, _, value = line.rpartition(" ")
      out[key] = float(value)
  return out
