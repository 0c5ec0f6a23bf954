"""What `scripts/serve.py` is told: the served name, batching and the precision policy."""

from __future__ import annotations

import dataclasses
import enum


class PolicyKind(enum.Enum):
  """How a request that does not pin a precision gets one."""
  FIXED = "fixed"        # the default precision (the highest loaded)
  ADAPTIVE = "adaptive"  # the highest precision meeting the latency target at this load


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Server settings.

  Attributes:
    model_name: the bare model id; `name@b` selects precision b.
    max_batch: most requests run in one batched generation (>= 1).
    policy: `PolicyKind`.
    latency_target_ms: per-token latency target of the adaptive policy (ms).
    stale_s: the adaptive policy forgets a latency measurement this old (seconds).
    default_max_tokens: chat completions' `max_tokens` when the request gives none
      (capped by the context; completions default to 16, as OpenAI's).
    decode_chunk: decode steps per device call (1, 2, 4, 8 or 16): streams get tokens
      in bursts of this many; a disconnect or stop string is acted on within it.
  """
  model_name: str
  max_batch: int = 8
  policy: PolicyKind = PolicyKind.FIXED
  latency_target_ms: float | None = None
  stale_s: float = 30.0
  default_max_tokens: int = 256
  decode_chunk: int = 8

  def __post_init__(self):
    if self.decode_chunk not in (1, 2, 4, 8, 16):
      raise ValueError(f"decode_chunk must be 1, 2, 4, 8 or 16, got {self.decode_chunk}")
    if self.max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
    if self.policy is PolicyKind.ADAPTIVE and not (self.latency_target_ms or 0) > 0:
      raise ValueError("the adaptive policy needs latency_target_ms > 0")
    if "@" in self.model_name or not self.model_name:
      raise ValueError(f"model name {self.model_name!r} must be non-empty, without '@'")
