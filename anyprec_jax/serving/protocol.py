"""The OpenAI wire format: request schemas, their checks, and response bodies.

Bad requests raise `ApiError`, rendered by the app as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON and values
out of range, 404 for a model id that is not served, 422 for a body that does not
match the schema (a missing field, a wrong type: the schema is strict, "5" is not an
int). Fields the server does not implement (logprobs, user, ...) are ignored, as
OpenAI-compatible servers do; `n` must be 1.

Extra fields beyond OpenAI's: `precision` (bits; the model id suffix `@b` does the
same) and `ignore_eos` (as vLLM: generate exactly max_tokens, for load tests).
Responses say which precision served them in `model` (`name@b`), in
`system_fingerprint` (`anyprec-<b>bit`) and in an extra `precision` field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict


class ApiError(Exception):
  """A request the server refuses; becomes an OpenAI error body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type_ or ("not_found_error" if status == 404 else "invalid_request_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class StreamOptions(BaseModel):
  model_config = ConfigDict(strict=True, extra="ignore")
  include_usage: bool = False


class _Sampling(BaseModel):
  """Fields shared by completions and chat completions."""
  model_config = ConfigDict(strict=True, extra="ignore")
  model: str
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  stop: Union[str, list[str], None] = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  precision: int | None = None
  ignore_eos: bool = False


class CompletionRequest(_Sampling):
  prompt: Union[str, list[int], list[str]]


class TextPart(BaseModel):
  model_config = ConfigDict(strict=True, extra="ignore")
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(strict=True, extra="ignore")
  role: str
  content: Union[str, list[TextPart], None] = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(p.text for p in self.content)
    return self.content or ""


class ChatRequest(_Sampling):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
  """The request body as `schema`.

  Raises:
    ApiError: 400 for malformed JSON or a non-object; 422 for a schema mismatch
      (`param` names the first bad field).
  """
  try:
    data = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ApiError(400, f"the body is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ApiError(400, "the body must be a JSON object")
  try:
    return schema.model_validate(data)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    param = str(err["loc"][0]) if err["loc"] else None
    raise ApiError(422, f"{where or 'body'}: {err['msg']}", param=param) from None


def check_sampling(req: _Sampling) -> None:
  """Range checks of the shared fields (400, naming the field)."""
  if req.n != 1:
    raise ApiError(400, f"n={req.n} is not supported; only n=1", param="n")
  if not 0 <= req.temperature <= 2:
    raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}",
                   param="temperature")
  if not 0 < req.top_p <= 1:
    raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
  stops = stop_list(req)
  if len(stops) > 4 or not all(stops):
    raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")


def stop_list(req: _Sampling) -> tuple[str, ...]:
  if req.stop is None:
    return ()
  return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def _now() -> int:
  return int(time.time())


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def served(model: str, precision: int) -> dict:
  """The fields saying who served a response."""
  return {"model": f"{model}@{precision}", "system_fingerprint": f"anyprec-{precision}bit",
          "precision": precision}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, precision: int, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
  return {"id": rid, "object": "text_completion", "created": _now(),
          **served(model, precision),
          "choices": [{"index": 0, "text": text, "logprobs": None,
                       "finish_reason": finish}],
          "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(rid: str, model: str, precision: int, text: str, finish: str,
              prompt_tokens: int, completion_tokens: int) -> dict:
  return {"id": rid, "object": "chat.completion", "created": _now(),
          **served(model, precision),
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": finish}],
          "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, precision: int, text: str,
                     finish: str | None) -> dict:
  return {"id": rid, "object": "text_completion", "created": _now(),
          **served(model, precision),
          "choices": [{"index": 0, "text": text, "logprobs": None,
                       "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, precision: int, delta: dict,
               finish: str | None) -> dict:
  return {"id": rid, "object": "chat.completion.chunk", "created": _now(),
          **served(model, precision),
          "choices": [{"index": 0, "delta": delta, "logprobs": None,
                       "finish_reason": finish}]}


def usage_chunk(rid: str, obj: str, model: str, precision: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
  return {"id": rid, "object": obj, "created": _now(), **served(model, precision),
          "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: Any) -> str:
  """One server-sent event."""
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
