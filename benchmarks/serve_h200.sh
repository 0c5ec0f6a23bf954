#!/usr/bin/env bash
# Issue 10: a bounded load run of the OpenAI-compatible server (scripts/serve.py) on one
# GPU, with a Llama-2-7B-shaped model of RANDOM any-precision weights (no checkpoint is
# needed: serve.py --random_shape; the text is noise, the speed is the shape's).
#
#   OUT=/tmp/out bash benchmarks/serve_h200.sh          # from the repository root
#
# 1. Installs the serving stack (FastAPI, uvicorn, httpx and their dependencies) from
#    the wheels in .whl/ (if any) into $SITE (/tmp/site), offline.
# 2. Starts scripts/serve.py in the background on a free port; it builds the random
#    weights and, with --warmup, compiles every precision x batch bucket (1, 2, 4, 8,
#    16) for the load's prompt and token counts before it listens, logging each
#    bucket's seconds; waits for /health.
# 3. Runs scripts/bench_serve.py (per precision and concurrency: a warm-up of
#    2 x concurrency requests, then REQUESTS completions of exactly MAX_TOKENS tokens).
# 4. Saves /metrics and stops the server.
#
# Everything stops at DEADLINE seconds after the start (default 345): a bench cut short
# still leaves the rows it finished in serve.md (marked partial).
#
# Outputs in $OUT: serve.md (the table), bench.log, server.log (random weights, warm-up
# lines, errors), metrics.txt (/metrics at the end: batch sizes per precision),
# context.md (settings and timings), nvidia-smi.txt.
#
# Settings (environment): SHAPE (llama-2-7b), LAYERS (all), PRECISIONS (3,4,8),
# CONCURRENCY (1,4,16), REQUESTS (64), MAX_TOKENS (32), MAX_BATCH (16), PROMPT
# ("The capital of France is": 25 tokens with the built-in character tokenizer),
# WARMUP (1; 0: no server-side warm-up), DEADLINE (345), BENCH_MIN_S (60: seconds kept
# for the bench when waiting for /health).

set -uo pipefail

: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
SHAPE=${SHAPE:-llama-2-7b}
LAYERS=${LAYERS:-}
PRECISIONS=${PRECISIONS:-3,4,8}
CONCURRENCY=${CONCURRENCY:-1,4,16}
REQUESTS=${REQUESTS:-64}
MAX_TOKENS=${MAX_TOKENS:-32}
MAX_BATCH=${MAX_BATCH:-16}
PROMPT=${PROMPT:-The capital of France is}
WARMUP=${WARMUP:-1}
DEADLINE=${DEADLINE:-345}
BENCH_MIN_S=${BENCH_MIN_S:-60}
SITE=${SITE:-/tmp/site}
NAME="random-$SHAPE"
SERVER=

log() { echo "[serve_h200 ${SECONDS}s] $*" | tee -a "$OUT/context.md"; }

stop_server() {
  if [[ -n "$SERVER" ]] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$SERVER" 2>/dev/null
    wait "$SERVER" 2>/dev/null
    log "server stopped"
  fi
}
trap stop_server EXIT

{
  echo "# serve_h200.sh run"
  echo
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "settings: SHAPE=$SHAPE LAYERS=${LAYERS:-all} PRECISIONS=$PRECISIONS CONCURRENCY=$CONCURRENCY" \
       "REQUESTS=$REQUESTS MAX_TOKENS=$MAX_TOKENS MAX_BATCH=$MAX_BATCH WARMUP=$WARMUP DEADLINE=$DEADLINE"
  echo "prompt: \"$PROMPT\""
  echo
} > "$OUT/context.md"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# 1. The serving stack, offline.
if compgen -G ".whl/*.whl" > /dev/null; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl >> "$OUT/context.md" 2>&1 \
    || { log "pip install of .whl/*.whl failed"; exit 1; }
  export PYTHONPATH="$SITE:."
else
  export PYTHONPATH=.
fi
if ! python3 -c "import sys, fastapi, uvicorn, httpx; print('python', sys.version.split()[0], \
'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'httpx', httpx.__version__)" \
    >> "$OUT/context.md" 2>&1; then
  log "the serving stack does not import (see above); carry .whl/ with wheels for this python"
  exit 1
fi
log "serving stack ready"

# 2. The server.
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
PROMPT_TOKENS=$(( ${#PROMPT} + 1 ))  # The character tokenizer: one per character + <s>.
ARGS=(--random_shape="$SHAPE" --precisions="$PRECISIONS" --max_batch="$MAX_BATCH"
      --served_model_name="$NAME" --port="$PORT")
[[ -n "$LAYERS" ]] && ARGS+=(--random_layers="$LAYERS")
[[ "$WARMUP" != 0 ]] && ARGS+=(--warmup="$PROMPT_TOKENS,$MAX_TOKENS")
log "python3 scripts/serve.py ${ARGS[*]}"
python3 scripts/serve.py "${ARGS[@]}" > "$OUT/server.log" 2>&1 &
SERVER=$!

healthy=0
while (( SECONDS < DEADLINE - BENCH_MIN_S )); do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    log "the server exited; last lines of server.log:"
    tail -n 30 "$OUT/server.log" | tee -a "$OUT/context.md"
    exit 1
  fi
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
      2>/dev/null; then
    healthy=1
    break
  fi
  sleep 1
done
grep -E "^(warm-up|serving)" "$OUT/server.log" >> "$OUT/context.md"
if (( ! healthy )); then
  log "no /health before ${DEADLINE}s - ${BENCH_MIN_S}s; server.log has the warm-up so far"
  exit 1
fi
log "server healthy"

# 3. The load.
BENCH=(--url="http://127.0.0.1:$PORT" --model="$NAME" --precisions="$PRECISIONS"
       --concurrency="$CONCURRENCY" --requests="$REQUESTS" --max_tokens="$MAX_TOKENS"
       --prompt="$PROMPT" --output="$OUT/serve.md")
log "python3 scripts/bench_serve.py ${BENCH[*]}"
timeout --signal=INT --kill-after=15 "$(( DEADLINE - SECONDS ))" python3 scripts/bench_serve.py "${BENCH[@]}" \
    2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
log "bench exit code $rc"
if [[ ! -s "$OUT/serve.md" ]]; then  # Cut short: the rows it printed as it went.
  {
    python3 -c "from anyprec_jax.serving import loadtest; print(loadtest.markdown_table([]), end='')"
    grep -E '^\| [0-9]' "$OUT/bench.log"
    echo
    echo "(partial: bench_serve.py stopped with exit code $rc at ${SECONDS}s)"
  } > "$OUT/serve.md"
fi

# 4. Metrics, then the server stops (trap).
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics', timeout=10).read().decode())" \
    > "$OUT/metrics.txt" 2>&1 || true
log "done"
exit "$rc"
