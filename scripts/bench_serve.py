"""Bounded load against a running `scripts/serve.py`: for each precision and
concurrency, `--requests` completions of exactly `--max_tokens` tokens; prints (and
with --output writes) p50 / p99 latency and generated tokens/s per row. A warm-up of
2 x concurrency requests per row runs first, so compilation is not measured.

  python scripts/serve.py --model=/tmp/smol-anyprec --max_batch=16 &
  python scripts/bench_serve.py --model=smol-anyprec --precisions=3,4,8 \
      --concurrency=1,4,16 --requests=64 --max_tokens=32 --output=serve.md
"""

from __future__ import annotations

from absl import flags

from anyprec_jax import cli

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "Server address.")
_MODEL = flags.DEFINE_string("model", None, "Served model id (without @b).", required=True)
_PRECISIONS = flags.DEFINE_list("precisions", ["3", "4", "8"], "Precisions to load-test.")
_CONCURRENCY = flags.DEFINE_list("concurrency", ["1", "4", "16"], "In-flight requests.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests per row.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens per request (EOS ignored).")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Prompt text.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file to write the table to.")


def main(argv):
  del argv
  import logging
  from anyprec_jax.serving import loadtest
  logging.getLogger("httpx").setLevel(logging.WARNING)  # One line per request otherwise.
  results = []
  for b in _PRECISIONS.value:
    for c in map(int, _CONCURRENCY.value):
      kw = dict(concurrency=c, max_tokens=_MAX_TOKENS.value, prompt=_PROMPT.value)
      loadtest.run_load(_URL.value, f"{_MODEL.value}@{b}", requests=2 * c, **kw)
      results.append(loadtest.run_load(_URL.value, f"{_MODEL.value}@{b}",
                                       requests=_REQUESTS.value, **kw))
      print(loadtest.markdown_table(results[-1:]).splitlines()[-1], flush=True)
  table = loadtest.markdown_table(results)
  print(table)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(table)


if __name__ == "__main__":
  cli.run(main)
