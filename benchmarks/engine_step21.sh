#!/usr/bin/env bash
# Engine step 21, session 9 (issue 15; predictions in notes_kernels.md "Step 21").
# `OUT=dir bash benchmarks/engine_step21.sh` (~8 min, bounded).
#   1. native tests of the residual epilogue (residual and weight loaded at the start,
#      bf16 or f32 weights read as stored) and the gated (SiLU x up) epilogue;
#   2. a traced 384-slot decode step, 3 and 8 bits: no fusion, residual, residual + GLU;
#   3. bench_e2e batch 1, 7B, with the fusions that 1 passed and 2 found faster.
source "$(dirname "$0")/device_common.sh"
step native tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/pallas/test_ops_dispatch.py -k "epilogue or residual or Residual or glu or Glu" \
  2>&1 | grep -v Deprecation > "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}; tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head
step "decode step 384 slots: fusions none 00, residual 10, residual + GLU 11"
for fg in 00 10 11; do
  env ANYPREC_FUSE_RESIDUAL=${fg:0:1} ANYPREC_FUSE_GLU=${fg:1:1} timeout 100 \
    python3 scripts/profile_e2e.py --precisions=3,8 --iters=20 --context=384 \
    --trace_dir=/tmp/tr_$fg > "$OUT/step_$fg.log" 2>&1
  echo "fusions=$fg: $(grep -E ' ms/step' "$OUT/step_$fg.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)|busy|wrapped|add_convert_fusion_15|multiply_fusion_1 " \
    "$OUT/step_$fg.log"
done
ms() { grep -E "^3: .* ms/step" "$OUT/step_$1.log" | head -1 | awk '{print $2}'; }
faster() { awk -v a="$(ms $1)" -v b="$(ms $2)" 'BEGIN{exit !(a < b)}'; }
fg=00
if [ "$tests_rc" = 0 ]; then
  if faster 11 10 && faster 11 00; then fg=11; elif faster 10 00; then fg=10; fi
fi
step e2e batch 1, 7B, fusions=$fg
ANYPREC_FUSE_RESIDUAL=${fg:0:1} ANYPREC_FUSE_GLU=${fg:1:1} timeout 140 \
  python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 \
  --repeats=2 --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step done
