"""GPU kernel events from a `jax.profiler` trace (CUPTI activity), for benchmarks.

Wall-clock timing of one small kernel per call is bounded below by the host launch
path (~11-20 us on the H200, kernels_tc.md step 4 T14); the trace gives each kernel's
GPU duration instead.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import tempfile
from typing import Callable, Iterator


def kernel_events(trace_json: dict) -> list[dict]:
  """The X events of GPU stream threads (kernels, memsets, copies), in time order.

  Args:
    trace_json: a parsed `perfetto_trace.json.gz` of `jax.profiler.trace(...,
      create_perfetto_trace=True)`.
  Raises:
    ValueError: the trace holds no GPU kernel (no CUPTI, or a CPU run).
  """
  events = trace_json["traceEvents"] if isinstance(trace_json, dict) else trace_json
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu = {pid for pid, nm in procs.items() if "GPU" in nm or "gpu" in nm}
  streams = {key for key, nm in threads.items() if key[0] in gpu and
             nm.lower().startswith("stream")}
  kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and
          ((e["pid"], e.get("tid")) in streams or not streams)]
  if not kern:
    raise ValueError(f"no GPU kernel events in the trace (processes: "
                     f"{sorted(procs.values())})")
  return sorted(kern, key=lambda e: float(e["ts"]))


@contextlib.contextmanager
def traced(directory: str | None = None) -> Iterator[list]:
  """Traces the block; on exit the yielded list holds its `kernel_events`."""
  import jax
  out: list = []
  with contextlib.ExitStack() as stack:
    where = directory or stack.enter_context(tempfile.TemporaryDirectory())
    with jax.profiler.trace(where, create_perfetto_trace=True):
      yield out
    path = sorted(glob.glob(os.path.join(where, "**", "perfetto_trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as f:
      out.extend(kernel_events(json.load(f)))


def gpu_us_per_call(fn: Callable[[], object], calls: int) -> float:
  """Summed GPU duration (us) of every kernel `fn` launches, per call, over `calls`
  calls (after one untraced warm-up call)."""
  import jax
  jax.block_until_ready(fn())
  with traced() as events:
    out = None
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
  return sum(float(e.get("dur", 0.0)) for e in events) / calls
