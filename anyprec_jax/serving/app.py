"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions,
plus /health and /metrics, over one `Engine` and its `Batcher`.

    app = create_app(Engine.load("out/smol-anyprec"), ServeConfig("smol-anyprec"))
    uvicorn.run(app)            # what scripts/serve.py does

A request's precision: the model id suffix (`smol-anyprec@4`) or the `precision`
field pins it; otherwise the policy picks (`--policy=fixed`: the highest loaded,
`adaptive`: see `policy.AdaptivePolicy`). Handlers only parse, check and wait on
their job's events; the batcher thread generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import (JSONResponse, PlainTextResponse, Response,
                               StreamingResponse)
from starlette.exceptions import HTTPException as StarletteHTTPException

from anyprec_jax.serving import protocol as proto
from anyprec_jax.serving.batcher import Batcher, Delta, Done, Failed, Job
from anyprec_jax.serving.config import PolicyKind, ServeConfig
from anyprec_jax.serving.engine import Engine, RowSpec
from anyprec_jax.serving.metrics import Metrics
from anyprec_jax.serving.policy import AdaptivePolicy, FixedPolicy
from anyprec_jax.serving.text import TextStream

log = logging.getLogger(__name__)
ApiError = proto.ApiError


def make_policy(engine: Engine, config: ServeConfig):
  """The policy `config` asks for."""
  if config.policy is PolicyKind.ADAPTIVE:
    return AdaptivePolicy(engine.precisions, config.latency_target_ms, config.max_batch,
                          stale_s=config.stale_s)
  return FixedPolicy(engine.default_precision)


class Server:
  """What the handlers share: engine, config, policy, metrics and batcher."""

  def __init__(self, engine: Engine, config: ServeConfig, policy=None,
               metrics: Metrics | None = None):
    self.engine, self.config = engine, config
    self.policy = make_policy(engine, config) if policy is None else policy
    self.metrics = Metrics() if metrics is None else metrics
    self.batcher = Batcher(engine, config.max_batch, self.metrics, self.policy,
                           chunk=config.decode_chunk)
    self.created = int(time.time())

  def pinned_precision(self, model: str, precision: int | None) -> int | None:
    """The precision a request pins (model suffix or field), or None; checked."""
    name, at, suffix = model.partition("@")
    loaded = list(self.engine.precisions)
    if name != self.config.model_name or (at and suffix not in map(str, loaded)):
      raise ApiError(404, f"the model {model!r} is not served; served: "
                     f"{[m['id'] for m in self.model_list()]}", param="model",
                     code="model_not_found")
    pinned = int(suffix) if at else None
    if precision is not None:
      if precision not in loaded:
        raise ApiError(400, f"precision {precision} is not loaded; loaded: {loaded}",
                       param="precision")
      if pinned is not None and pinned != precision:
        raise ApiError(400, f"model {model!r} and precision={precision} disagree",
                       param="precision")
      pinned = precision
    return pinned

  def model_list(self) -> list[dict]:
    name = self.config.model_name
    ids = [(name, self.engine.default_precision)] + [
        (f"{name}@{b}", b) for b in self.engine.precisions]
    return [{"id": i, "object": "model", "created": self.created,
             "owned_by": "anyprec-jax", "precision": b} for i, b in ids]

  def row(self, req: proto._Sampling, prompt: list[int], max_tokens: int | None,
          default_max: int, prompt_param: str) -> RowSpec:
    """The generation a checked request asks for (context limits checked)."""
    ctx, vocab = self.engine.context_length, self.engine.cfg.vocab_size
    if not prompt:
      raise ApiError(400, "the prompt has no tokens", param=prompt_param)
    if any(not 0 <= t < vocab for t in prompt):
      raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param=prompt_param)
    if len(prompt) >= ctx:
      raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context is {ctx}, "
                     "leaving no room to generate", param=prompt_param)
    if max_tokens is None:
      max_tokens = min(default_max, ctx - len(prompt))
    if max_tokens < 1:
      raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}",
                     param="max_tokens")
    if len(prompt) + max_tokens > ctx:
      raise ApiError(400, f"{len(prompt)} prompt tokens + max_tokens={max_tokens} exceed "
                     f"the context of {ctx}", param="max_tokens")
    tok = self.engine.tokenizer
    eos = () if req.ignore_eos else tuple(sorted(
        set(self.engine.cfg.eos_token_ids) | ({tok.eos_token_id} - {None})))
    seed = secrets.randbits(32) if req.seed is None else req.seed & 0xFFFFFFFF
    return RowSpec(tuple(prompt), max_tokens, req.temperature, req.top_p, seed, eos)

  def submit(self, req: proto._Sampling, row: RowSpec, pinned: int | None) -> Job:
    if pinned is None:
      precision = self.policy.choose(self.batcher.load() + 1)
      self.metrics.inc("anyprec_policy_choices_total", precision=precision)
    else:
      precision = pinned
    job = Job(precision, row, TextStream(self.engine.tokenizer, proto.stop_list(req)),
              asyncio.get_running_loop(), self.batcher.clock())
    try:
      self.batcher.submit(job)
    except RuntimeError as e:
      raise ApiError(503, str(e), type_="server_error") from None
    return job

  def gauges(self) -> dict:
    waiting, running = self.batcher.waiting(), self.batcher.running()
    est = self.policy.estimates()
    return {
        "anyprec_queue_length": ("Requests waiting for a batch.",
                                 {(("precision", b),): n for b, n in waiting.items()}),
        "anyprec_running_requests": ("Requests being decoded.",
                                     {(("precision", b),): n for b, n in running.items()}),
        "anyprec_policy_precision": ("Precision the policy chose last.",
                                     {(): self.policy.last_choice}),
        "anyprec_policy_latency_estimate_ms": (
            "The adaptive policy's recent ms/token per (precision, batch bucket).",
            {(("batch", k[1]), ("precision", k[0])): v for k, v in est.items()}),
    }


def _prompt_ids(server: Server, prompt) -> list[int]:
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
    if len(prompt) != 1:
      raise ApiError(400, "one prompt per request (a list of strings must have one)",
                     param="prompt")
    prompt = prompt[0]
  if isinstance(prompt, str):
    return list(server.engine.tokenizer(prompt).input_ids)
  return list(prompt)


def _chat_ids(server: Server, req: proto.ChatRequest) -> list[int]:
  tok = server.engine.tokenizer
  if not getattr(tok, "chat_template", None):
    raise ApiError(400, "this model's tokenizer has no chat template; use "
                   "/v1/completions", param="messages")
  if not req.messages:
    raise ApiError(400, "messages must not be empty", param="messages")
  messages = [{"role": m.role, "content": m.text()} for m in req.messages]
  try:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  except Exception as e:  # The template rejects the conversation (roles, order).
    raise ApiError(400, f"the chat template rejects these messages: {e}",
                   param="messages") from None
  return list(tok(text, add_special_tokens=False).input_ids)


async def _collect(request: Request, job: Job, poll_s: float = 0.25
                   ) -> tuple[str, Done] | None:
  """Waits for the job's end: (text, Done); None (the job cancelled) if the client
  disconnects first (checked every `poll_s`, events or not)."""
  parts, get = [], None
  loop = asyncio.get_running_loop()
  check_at = loop.time() + poll_s
  try:
    while True:
      get = get or asyncio.ensure_future(job.events.get())
      done, _ = await asyncio.wait({get}, timeout=max(check_at - loop.time(), 0))
      if loop.time() >= check_at:
        if await request.is_disconnected():
          return None
        check_at = loop.time() + poll_s
      if not done:
        continue
      event, get = get.result(), None
      if isinstance(event, Delta):
        parts.append(event.text)
      elif isinstance(event, Done):
        return "".join(parts), event
      else:
        raise ApiError(503, event.message, type_="server_error")
  finally:
    if get is not None:
      get.cancel()
    if not job.finished:
      job.cancel()


async def _stream(job: Job, chunk, first: list[dict], finish_chunk, usage_chunk):
  """The SSE body: `first` chunks, a chunk per Delta, the finish, usage, [DONE]."""
  try:
    for c in first:
      yield proto.sse(c)
    while True:
      event = await job.events.get()
      if isinstance(event, Delta):
        yield proto.sse(chunk(event.text))
      elif isinstance(event, Done):
        yield proto.sse(finish_chunk(event.finish_reason))
        if usage_chunk is not None:
          yield proto.sse(usage_chunk(event.completion_tokens))
        break
      else:
        yield proto.sse(ApiError(503, event.message, type_="server_error").body())
        break
    yield proto.sse("[DONE]")
  finally:
    if not job.finished:
      job.cancel()


async def _answer(server: Server, request: Request, req, prompt: list[int], job: Job,
                  chat: bool):
  name, b = server.config.model_name, job.precision
  rid = proto.new_id("chatcmpl" if chat else "cmpl")
  if not req.stream:
    got = await _collect(request, job)
    if got is None:
      return Response(status_code=499)  # Nobody reads it: the client has gone.
    text, done = got
    body = proto.chat_body if chat else proto.completion_body
    return JSONResponse(body(rid, name, b, text, done.finish_reason, len(prompt),
                             done.completion_tokens))
  include_usage = req.stream_options is not None and req.stream_options.include_usage
  obj = "chat.completion.chunk" if chat else "text_completion"
  usage = (lambda n: proto.usage_chunk(rid, obj, name, b, len(prompt), n)
           ) if include_usage else None
  if chat:
    chunk = lambda t: proto.chat_chunk(rid, name, b, {"content": t}, None)
    first = [proto.chat_chunk(rid, name, b, {"role": "assistant", "content": ""}, None)]
    finish = lambda r: proto.chat_chunk(rid, name, b, {}, r)
  else:
    chunk = lambda t: proto.completion_chunk(rid, name, b, t, None)
    first = []
    finish = lambda r: proto.completion_chunk(rid, name, b, "", r)
  return StreamingResponse(_stream(job, chunk, first, finish, usage),
                           media_type="text/event-stream")


def _error_response(server: Server, e: ApiError) -> JSONResponse:
  server.metrics.inc("anyprec_request_errors_total", code=e.status)
  return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, config: ServeConfig, *, policy=None,
               metrics: Metrics | None = None) -> FastAPI:
  """The app; its lifespan starts and stops the batcher thread.

  Args:
    engine: the loaded model.
    config: server settings.
    policy: a policy object (tests inject one); None: from `config`.
    metrics: a `Metrics` (tests inject one); None: a fresh one.
  """
  server = Server(engine, config, policy, metrics)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.batcher.start()
    yield
    server.batcher.stop()

  app = FastAPI(title="anyprec-jax", lifespan=lifespan)
  app.state.server = server

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return _error_response(server, e)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e):
    return _error_response(server, ApiError(e.status_code, str(e.detail)))

  @app.exception_handler(Exception)
  async def _bug(request, e):
    log.exception("unhandled error")
    return _error_response(server, ApiError(500, f"internal error: {type(e).__name__}",
                                            type_="server_error"))

  @app.get("/health")
  async def health():
    return {"status": "ok", "precisions": list(engine.precisions)}

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": server.model_list()}

  @app.get("/metrics")
  async def metrics_page():
    return PlainTextResponse(server.metrics.render(server.gauges()),
                             media_type="text/plain; version=0.0.4")

  @app.post("/v1/completions")
  async def completions(request: Request):
    req = proto.parse_body(await request.body(), proto.CompletionRequest)
    proto.check_sampling(req)
    pinned = server.pinned_precision(req.model, req.precision)
    prompt = _prompt_ids(server, req.prompt)
    row = server.row(req, prompt, req.max_tokens, 16, "prompt")
    return await _answer(server, request, req, prompt, server.submit(req, row, pinned),
                         chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    req = proto.parse_body(await request.body(), proto.ChatRequest)
    proto.check_sampling(req)
    pinned = server.pinned_precision(req.model, req.precision)
    prompt = _chat_ids(server, req)
    max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    row = server.row(req, prompt, max_tokens, config.default_max_tokens, "messages")
    return await _answer(server, request, req, prompt, server.submit(req, row, pinned),
                         chat=True)

  return app
