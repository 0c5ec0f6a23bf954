#!/usr/bin/env bash
# Engine step 27b, session 12: step 27 cut to the remaining device budget (~5 min):
# native checks of the q/k/v epilogue; e2e 7B batch 1 with the shipped defaults (every
# width) and with ANYPREC_FUSE_ROPE_KV=1 (3 and 8 bits). `OUT=dir bash benchmarks/engine_step27b.sh`
source "$(dirname "$0")/device_common.sh"
step native checks
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  -k "rope" 2>&1 | tail -4
step "e2e batch 1, 7B, defaults"
timeout 140 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_rope0.md" --output_json="$OUT/e2e_rope0.json" > "$OUT/e2e_rope0.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/e2e_rope0.md"
step "e2e batch 1, 7B, ANYPREC_FUSE_ROPE_KV=1"
ANYPREC_FUSE_ROPE_KV=1 timeout 75 python3 scripts/bench_e2e.py --precisions=3,8 --repeats=2 \
  --output_md="$OUT/e2e_rope1.md" --output_json="$OUT/e2e_rope1.json" > "$OUT/e2e_rope1.log" 2>&1
echo "rc=$?"; tail -5 "$OUT/e2e_rope1.md"; grep -iE "error|Traceback" "$OUT/e2e_rope1.log" | tail -3
step done
