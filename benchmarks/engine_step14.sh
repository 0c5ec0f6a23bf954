#!/usr/bin/env bash
# Engine step 14, second device call of session 7 (issue 15). `OUT=dir bash
# benchmarks/engine_step14.sh` (~9 min, bounded).
#   1. native decode-attention tests (two-phase in-kernel merge);
#   2. decode attention launches against XLA, GPU time (int32 mask for the kernel);
#   3. bench_e2e batch 1, 3..8 bits, attention kernel on at 384 slots;
#   4. the native GPU suite `tests/pallas`, each test's end time-stamped (item 7).
source "$(dirname "$0")/device_common.sh"
step attention tests
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  2>&1 | grep -v Deprecation > "$OUT/tests_attention.log"
tail -3 "$OUT/tests_attention.log"
step attention bench
timeout 150 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  --variants=c8t1d1k,c8t2d2k,c8t4d2k,c4t1d2k,c1t1d2k,c1t2d2k,c1t4d2k,c16t1d1x \
  > "$OUT/attention.log" 2>&1
cp /tmp/att/attention.md "$OUT/" 2>/dev/null
grep -E "^\||^copy" "$OUT/attention.log" | sed 's/DecodeAttentionConfig//'
step e2e batch 1, attention kernel on
ANYPREC_DECODE_ATTENTION=mosaic timeout 130 python3 scripts/bench_e2e.py \
  --precisions=3,4,5,6,7,8 --repeats=2 --output_md="$OUT/e2e_b1.md" \
  --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step native tests
start=$(date +%s)
timeout 200 python3 -m pytest -v -p no:cacheprovider tests/pallas 2>&1 | grep -v Deprecation \
  | while IFS= read -r line; do echo "$(( $(date +%s) - start )) $line"; done \
  > "$OUT/tests_pallas.log"
echo "wall=$(( $(date +%s) - start ))s"; grep -cE "PASSED|SKIPPED" "$OUT/tests_pallas.log"
grep -E "FAILED|ERROR" "$OUT/tests_pallas.log" | head -5; tail -2 "$OUT/tests_pallas.log"
step done
