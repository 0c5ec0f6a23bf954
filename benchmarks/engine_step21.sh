#!/usr/bin/env bash
# Engine step 21, session 9 (issue 15; predictions in notes_kernels.md "Step 21").
# `OUT=dir bash benchmarks/engine_step21.sh` (~6 min, bounded).
#   1. native tests of the residual epilogue (residual and weight loaded at the start,
#      bf16 or f32 weights read as stored);
#   2. a traced 384-slot decode step, ANYPREC_FUSE_RESIDUAL=0 and 1, 3 and 8 bits;
#   3. bench_e2e batch 1, 7B, with the fusion on if 1 passed and 2 found it faster.
source "$(dirname "$0")/device_common.sh"
step native tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/pallas/test_ops_dispatch.py -k "epilogue or residual or Residual" \
  2>&1 | grep -v Deprecation > "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}; tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head
step decode step 384 slots, fuse 0 / 1
for fuse in 0 1; do
  env ANYPREC_FUSE_RESIDUAL=$fuse timeout 100 python3 scripts/profile_e2e.py --precisions=3,8 \
    --iters=20 --context=384 --trace_dir=/tmp/tr_$fuse > "$OUT/step_fuse$fuse.log" 2>&1
  echo "fuse=$fuse: $(grep -E ' ms/step' "$OUT/step_fuse$fuse.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)|busy|wrapped|add_convert_fusion_15" "$OUT/step_fuse$fuse.log"
done
ms() { grep -E "^3: .* ms/step" "$OUT/step_fuse$1.log" | head -1 | awk '{print $2}'; }
fuse=0
if [ "$tests_rc" = 0 ] && awk -v a="$(ms 1)" -v b="$(ms 0)" 'BEGIN{exit !(a < b)}'; then fuse=1; fi
step e2e batch 1, 7B, fuse=$fuse
ANYPREC_FUSE_RESIDUAL=$fuse timeout 140 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 \
  --repeats=2 --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step done
