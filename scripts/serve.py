"""Serve an any-precision checkpoint (or a dense Hugging Face model, as one precision)
over the OpenAI HTTP API, with FastAPI + uvicorn (`pip install -e ".[serve]"`).

  python scripts/serve.py --model=/tmp/smol-anyprec --precisions=3,4,8
  python scripts/serve.py --model=/tmp/smol-anyprec --policy=adaptive --latency_target_ms=40
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"model": "smol-anyprec@4", "prompt": "The capital of France is", "max_tokens": 16}'

Benchmarks without a checkpoint: --random_shape serves random any-precision weights of a
model shape (the planes, LUTs, layout and q/k/v fusion a loaded checkpoint would have on
this backend) with a built-in character tokenizer; the text is noise, the speed is the
shape's:

  python scripts/serve.py --random_shape=llama-2-7b --precisions=3,4,8 --max_batch=16

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
"stream": true), GET /health, GET /metrics. See anyprec_jax/serving/.
"""

from __future__ import annotations

from absl import app, flags

from anyprec_jax import cli

_DTYPES = ("bfloat16", "float16", "float32")

_MODEL = flags.DEFINE_string("model", None, "Any-precision or dense HF directory "
                             "(or --random_shape).")
_RANDOM = flags.DEFINE_string("random_shape", None,
                              "Serve random any-precision weights of this shape "
                              "(latency.Shape: llama-2-7b, llama-3-8b, tiny) instead "
                              "of --model (benchmarks only).")
_LAYERS = flags.DEFINE_integer("random_layers", None,
                               "With --random_shape: override its number of layers.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "With --random_shape: a Hugging Face tokenizer "
                                 "directory (the model's vocabulary becomes its size); "
                                 "default a built-in character tokenizer.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", None, "Precisions to load (any-precision only); default all "
    "(--random_shape: 3..8).")
_NAME = flags.DEFINE_string("served_model_name", None,
                            "Model id clients use; default the directory's name "
                            "(--random_shape: random-<shape>).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_POLICY = flags.DEFINE_enum("policy", "fixed", ["fixed", "adaptive"],
                            "Precision of requests that pin none: the highest loaded, "
                            "or the highest meeting --latency_target_ms at the load.")
_TARGET = flags.DEFINE_float("latency_target_ms", None,
                             "Per-token latency target of --policy=adaptive (ms).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Most requests per batched generation.")
_MAX_TOKENS = flags.DEFINE_integer("default_max_tokens", 256,
                                   "Chat max_tokens when a request gives none.")
_CHUNK = flags.DEFINE_integer("decode_chunk", 8,
                              "Decode steps per device call (1, 2, 4, 8, 16); streams "
                              "get tokens in bursts of this many.")
_WARMUP = flags.DEFINE_list(
    "warmup", None, "PROMPT_TOKENS,MAX_TOKENS: before listening, compile every "
    "precision x batch bucket for prompts of up to that many tokens and that many new "
    "tokens, so greedy requests of those sizes pay no compilation.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(_DTYPES),
                           "Activation dtype (default: bfloat16 on GPU, float32 on CPU).")


def main(argv):
  del argv
  import jax.numpy as jnp
  import uvicorn  # noqa: PLC0415 (the optional `serve` extra)
  from anyprec_jax import errors
  from anyprec_jax.serving import PolicyKind, ServeConfig
  from anyprec_jax.serving.app import create_app
  from anyprec_jax.serving.engine import Engine, model_name
  if (_MODEL.value is None) == (_RANDOM.value is None):
    raise app.UsageError("give exactly one of --model and --random_shape")
  if _RANDOM.value is None and (_LAYERS.value is not None or _TOKENIZER.value):
    raise app.UsageError("--random_layers and --tokenizer go with --random_shape")
  default_name = (model_name(_MODEL.value) if _RANDOM.value is None
                  else f"random-{_RANDOM.value}")
  try:
    precisions = None if _PRECISIONS.value is None else [int(b) for b in _PRECISIONS.value]
    warmup = None if _WARMUP.value is None else [int(n) for n in _WARMUP.value]
    if warmup is not None and (len(warmup) != 2 or min(warmup) < 1):
      raise ValueError(f"--warmup takes PROMPT_TOKENS,MAX_TOKENS (both >= 1), got "
                       f"{','.join(_WARMUP.value)}")
    config = ServeConfig(_NAME.value or default_name, _MAX_BATCH.value,
                         PolicyKind(_POLICY.value), _TARGET.value,
                         default_max_tokens=_MAX_TOKENS.value,
                         decode_chunk=_CHUNK.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  dtype = None if _DTYPE.value is None else getattr(jnp, _DTYPE.value)
  try:
    if _RANDOM.value is None:
      engine = Engine.load(_MODEL.value, precisions, dtype=dtype)
    else:
      from anyprec_jax import evaluation
      tok = None if _TOKENIZER.value is None else evaluation.load_tokenizer(
          _TOKENIZER.value)
      engine = Engine.random(_RANDOM.value, precisions, dtype=dtype, tokenizer=tok,
                             layers=_LAYERS.value)
  except errors.AnyPrecError:
    raise
  except ValueError as e:  # Precisions outside the checkpoint's range.
    raise app.UsageError(str(e)) from None
  what = "" if _RANDOM.value is None else (
      f" (random weights, num_layers={engine.cfg.num_layers}, "
      f"vocab_size={engine.cfg.vocab_size})")
  if warmup is not None:
    if sum(warmup) > engine.context_length:
      raise app.UsageError(f"--warmup={warmup[0]},{warmup[1]} exceeds the context of "
                           f"{engine.context_length}")
    took = engine.warm_up(config.max_batch, *warmup, chunk=config.decode_chunk,
                          log=lambda line: print(line, flush=True))
    print(f"warm-up: {took:.1f} s in all", flush=True)
  print(f"serving {config.model_name}{what} at precisions {list(engine.precisions)} on "
        f"http://{_HOST.value}:{_PORT.value}", flush=True)
  uvicorn.run(create_app(engine, config), host=_HOST.value, port=_PORT.value,
              log_level="warning")


if __name__ == "__main__":
  cli.run(main)
