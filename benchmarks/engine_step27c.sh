#!/usr/bin/env bash
# Engine step 27c, session 12: the last ~4 min of device budget: native checks of the
# q/k/v epilogue, then e2e 7B batch 1 at 3 and 8 bits with it off and on (bf16 in each
# run). `OUT=dir bash benchmarks/engine_step27c.sh`
source "$(dirname "$0")/device_common.sh"
step native checks
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  -k "rope" 2>&1 | tail -4
for on in 0 1; do
  step "e2e batch 1, 7B, ANYPREC_FUSE_ROPE_KV=$on"
  ANYPREC_FUSE_ROPE_KV=$on timeout 70 python3 scripts/bench_e2e.py --precisions=3,8 \
    --repeats=2 --output_md="$OUT/e2e_rope$on.md" --output_json="$OUT/e2e_rope$on.json" \
    > "$OUT/e2e_rope$on.log" 2>&1
  echo "rc=$?"; tail -4 "$OUT/e2e_rope$on.md"; grep -iE "error|Traceback" "$OUT/e2e_rope$on.log" | tail -2
done
step done
