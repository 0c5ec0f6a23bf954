"""An OpenAI-compatible HTTP server over one any-precision checkpoint.

Modules, each with one job: `config` (ServeConfig, PolicyKind), `engine` (weights at
every precision, the batched step-by-step generation; `Engine.random`: random weights
for benchmarks), `char_tokenizer` (the built-in tokenizer of random weights), `text`
(incremental detokenizing, stop strings), `policy` (fixed / load-adaptive precision),
`metrics` (Prometheus text), `batcher` (queues and the worker thread), `protocol`
(OpenAI schemas, errors, bodies), `app` (the FastAPI routes) and `loadtest` (a
bounded load run against a server). Only `app` imports FastAPI, and `loadtest` httpx
(the optional `serve` extra).
"""

from anyprec_jax.serving.config import PolicyKind, ServeConfig
from anyprec_jax.serving.engine import Engine, RowSpec
from anyprec_jax.serving.policy import AdaptivePolicy, FixedPolicy

__all__ = ["AdaptivePolicy", "Engine", "FixedPolicy", "PolicyKind", "RowSpec",
           "ServeConfig"]
