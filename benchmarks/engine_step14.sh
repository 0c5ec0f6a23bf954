#!/usr/bin/env bash
# Engine step 14, second device call of session 7 (issue 15). `OUT=dir bash
# benchmarks/engine_step14.sh` (~8 min, bounded).
#   1. native tests: decode attention (two-phase in-kernel merge), folded RMSNorm;
#   2. decode attention launches against XLA, GPU time (int32 mask for the kernel);
#   3. a 384-slot decode step (attention kernel on), bf16 and 3 bits, RMSNorm folded or not;
#   4. bench_e2e batch 1, 3..8 bits, attention kernel on, the fold on if 1 passed and
#      3 found it faster.
source "$(dirname "$0")/device_common.sh"
step native tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  tests/pallas/test_mosaic_gemv_tc.py tests/pallas/test_ops_dispatch.py -k "Native or rms or Rms" \
  2>&1 | grep -v Deprecation > "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}; tail -3 "$OUT/tests.log"; grep -E "^FAILED" "$OUT/tests.log" | head
step attention bench
timeout 140 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  --variants=c8t1d1k,c8t4d2k,c4t1d2k,c1t1d2k,c1t4d2k,c16t1d1x > "$OUT/attention.log" 2>&1
grep -E "^\||^copy" "$OUT/attention.log" | sed 's/DecodeAttentionConfig//'
step decode step 384 slots, fold 0 / 1
for fold in 0 1; do
  env ANYPREC_DECODE_ATTENTION=mosaic ANYPREC_FOLD_NORM=$fold timeout 100 \
    python3 scripts/profile_e2e.py --precisions=bf16,3 --iters=20 --context=384 \
    --trace_dir=/tmp/tr_$fold > "$OUT/step_fold$fold.log" 2>&1
  echo "fold=$fold: $(grep -E ' ms/step' "$OUT/step_fold$fold.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)" "$OUT/step_fold$fold.log"
done
ms() { grep -E "^3: .* ms/step" "$OUT/step_fold$1.log" | head -1 | awk '{print $2}'; }
fold=0
if [ "$tests_rc" = 0 ] && awk -v a="$(ms 1)" -v b="$(ms 0)" 'BEGIN{exit !(a < b)}'; then fold=1; fi
step e2e batch 1, attention kernel on, fold=$fold
ANYPREC_DECODE_ATTENTION=mosaic ANYPREC_FOLD_NORM=$fold timeout 115 python3 scripts/bench_e2e.py \
  --precisions=3,4,5,6,7,8 --repeats=2 --output_md="$OUT/e2e_b1.md" \
  --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step done
