"""Groups concurrent requests at one precision into batched generations, run on a
worker thread so the event loop stays free while the device decodes.

Requests wait in one FIFO queue per precision. The worker takes the precision whose
oldest request has waited longest and runs up to `max_batch` of its requests as one
`Engine.run_batch` (static batching: requests arriving meanwhile wait for the next
batch). Each step's tokens are detokenized on the worker (`TextStream`, stop strings)
and posted to each request's asyncio queue as `Delta` / `Done` / `Failed` events.

A cancelled request (its client went away) is dropped from the queue before it runs;
once running, its row is no longer live from the next step on: it stops counting as
running, and a batch whose rows are all finished or cancelled ends at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, NamedTuple

from anyprec_jax.serving.engine import Engine, RowSpec
from anyprec_jax.serving.metrics import Metrics
from anyprec_jax.serving.text import TextStream

log = logging.getLogger(__name__)


class Delta(NamedTuple):
  text: str


class Done(NamedTuple):
  finish_reason: str  # "stop" (EOS or a stop string) or "length"
  completion_tokens: int


class Failed(NamedTuple):
  message: str


@dataclasses.dataclass(eq=False)
class Job:
  """One request inside the server.

  Attributes:
    precision: bits it runs at.
    row: what to generate.
    text: its detokenizer (holds the stop strings).
    loop: the event loop that awaits `events`.
    arrived: clock time of arrival.
  """
  precision: int
  row: RowSpec
  text: TextStream
  loop: asyncio.AbstractEventLoop
  arrived: float
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  finished: bool = False
  completion_tokens: int = 0
  first_token_at: float | None = None

  def post(self, event) -> None:
    """Hands `event` to the awaiting coroutine (thread-safe)."""
    try:
      self.loop.call_soon_threadsafe(self.events.put_nowait, event)
    except RuntimeError:  # The loop is closed: nobody is waiting any more.
      pass

  def cancel(self) -> None:
    self.cancelled.set()


class Batcher:
  """The queue and the worker thread."""

  def __init__(self, engine: Engine, max_batch: int, metrics: Metrics, policy, *,
               chunk: int = 8, clock: Callable[[], float] = time.perf_counter):
    """Args:
      engine: runs the batches.
      max_batch: most requests per batch.
      chunk: decode steps per device call (`Engine.run_batch`).
      metrics: where counts and latencies go.
      policy: gets `record(precision, batch, ms_per_token)` after each batch.
      clock: seconds (for latencies).
    """
    self.engine, self.max_batch, self.metrics, self.policy = (engine, max_batch,
                                                              metrics, policy)
    self.clock, self.chunk = clock, chunk
    self._queues: dict[int, collections.deque[Job]] = {
        b: collections.deque() for b in engine.precisions}
    self._running: list[Job] = []
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    self._thread = threading.Thread(target=self._work, name="anyprec-batcher",
                                    daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Stops after the running batch; queued requests fail with 'shutting down'."""
    with self._cond:
      self._stopping = True
      left = [j for q in self._queues.values() for j in q]
      for q in self._queues.values():
        q.clear()
      self._cond.notify_all()
    for job in left:
      job.finished = True
      job.post(Failed("the server is shutting down"))
    if self._thread is not None:
      self._thread.join(timeout)

  def submit(self, job: Job) -> None:
    with self._cond:
      if self._stopping:
        raise RuntimeError("the server is shutting down")
      self._queues[job.precision].append(job)
      self._cond.notify()

  def waiting(self) -> dict[int, int]:
    """{precision: requests queued} (cancelled ones not yet dropped excluded)."""
    with self._cond:
      return {b: sum(not j.cancelled.is_set() for j in q) for b, q in self._queues.items()}

  def running(self) -> dict[int, int]:
    """{precision: requests being decoded}."""
    with self._cond:
      out = dict.fromkeys(self._queues, 0)
      for j in self._running:
        if not (j.finished or j.cancelled.is_set()):
          out[j.precision] += 1
      return out

  def load(self) -> int:
    """Requests queued or running."""
    return sum(self.waiting().values()) + sum(self.running().values())

  def _take(self) -> list[Job] | None:
    """The next batch (blocks); None when stopping."""
    with self._cond:
      while True:
        for q in self._queues.values():
          while q and q[0].cancelled.is_set():
            self._cancelled(q.popleft())
        heads = [q for q in self._queues.values() if q]
        if self._stopping:
          return None
        if heads:
          q = min(heads, key=lambda q: q[0].arrived)
          jobs = []
          while q and len(jobs) < self.max_batch:
            job = q.popleft()
            if job.cancelled.is_set():
              self._cancelled(job)
            else:
              jobs.append(job)
          if jobs:
            self._running = jobs
            return jobs
          continue
        self._cond.wait()

  def _cancelled(self, job: Job) -> None:
    job.finished = True
    self.metrics.inc("anyprec_requests_cancelled_total", precision=job.precision)

  def _work(self) -> None:
    while (jobs := self._take()) is not None:
      try:
        self._run(jobs)
      except Exception as e:  # A bug or a device failure: fail the batch, keep serving.
        log.exception("batch at %d bits failed", jobs[0].precision)
        for job in jobs:
          if not job.finished:
            job.finished = True
            job.post(Failed(f"generation failed: {type(e).__name__}: {e}"))
      finally:
        with self._cond:
          self._running = []

  def _run(self, jobs: list[Job]) -> None:
    precision = jobs[0].precision
    self.metrics.inc("anyprec_batches_total", precision=precision)
    self.metrics.inc("anyprec_batch_rows_total", len(jobs), precision=precision)

    def live():
      for job in jobs:
        if job.cancelled.is_set() and not job.finished:
          self._cancelled(job)
      return [not job.finished for job in jobs]

    last, decode_s, steps = None, 0.0, 0
    for tokens in self.engine.run_batch(precision, [j.row for j in jobs],
                                        self.max_batch, live, self.chunk):
      now = self.clock()
      if last is not None:
        decode_s, steps = decode_s + now - last, steps + 1
      last = now
      for job, tok in zip(jobs, tokens):
        if tok >= 0 and not job.finished:
          self._push(job, int(tok), now)
    for job in jobs:  # Rows the engine ended (all others cancelled) without a reason.
      if not job.finished:
        self._finish(job, "length", self.clock())
    if steps:
      self.policy.record(precision, len(jobs), 1e3 * decode_s / steps)

  def _push(self, job: Job, tok: int, now: float) -> None:
    job.completion_tokens += 1
    if job.first_token_at is None:
      job.first_token_at = now
    delta = job.text.push(tok)
    if delta:
      job.post(Delta(delta))
    if job.text.stopped or tok in job.row.eos:
      self._finish(job, "stop", now)
    elif job.completion_tokens >= job.row.max_tokens:
      self._finish(job, "length", now)

  def _finish(self, job: Job, reason: str, now: float) -> None:
    job.finished = True
    if not job.text.stopped:
      rest = job.text.flush()
      if rest:
        job.post(Delta(rest))
    job.post(Done(reason, job.completion_tokens))
    b, m = job.precision, self.metrics
    m.inc("anyprec_requests_total", precision=b)
    m.inc("anyprec_prompt_tokens_total", len(job.row.prompt), precision=b)
    m.inc("anyprec_generation_tokens_total", job.completion_tokens, precision=b)
    m.observe("anyprec_request_latency_seconds", now - job.arrived, precision=b)
    if job.completion_tokens > 1:
      m.observe("anyprec_time_per_output_token_seconds",
                (now - job.first_token_at) / (job.completion_tokens - 1), precision=b)
