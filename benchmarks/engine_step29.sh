#!/usr/bin/env bash
# Engine step 29, session 13 (issue 15), H200. `OUT=dir bash benchmarks/engine_step29.sh`
# (~5 min, bounded): step 27's q/k/v epilogue after the fix of its q_scale (a traced
# constant under jax 0.11's jit): native checks, then e2e 7B batch 1 at 3, 5, 8 bits with
# ANYPREC_FUSE_ROPE_KV off and on (bf16 measured in each run).
source "$(dirname "$0")/device_common.sh"
step native checks
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/pallas/test_ops_dispatch.py -k "rope" --tb=short 2>&1 | tail -30 | cut -c1-200
for on in 0 1; do
  step "e2e batch 1, 7B, ANYPREC_FUSE_ROPE_KV=$on"
  ANYPREC_FUSE_ROPE_KV=$on timeout 100 python3 scripts/bench_e2e.py --precisions=3,5,8 \
    --repeats=2 --output_md="$OUT/e2e_rope$on.md" --output_json="$OUT/e2e_rope$on.json" \
    > "$OUT/e2e_rope$on.log" 2>&1
  echo "rc=$?"; tail -5 "$OUT/e2e_rope$on.md"; grep -iE "error|Traceback" "$OUT/e2e_rope$on.log" | tail -2
done
step done
