#!/usr/bin/env bash
# Engine step 15, first device call of session 8 (issue 15). `OUT=dir bash
# benchmarks/engine_step15.sh` (~9 min, bounded).
#   1. the whole native tests/pallas, timed, with its slowest cases (item 7; the new
#      defaults: in-kernel attention merge, folded RMSNorm);
#   2. decode attention at short caches (where "auto" starts the kernel), batch 8 at 4096
#      slots, GQA at 384, default launch against XLA;
#   3. bench_e2e batch 1 with the shipped defaults (no switches).
source "$(dirname "$0")/device_common.sh"
step tests/pallas
start=$(date +%s)
timeout 320 python3 -m pytest -q -p no:cacheprovider --durations=40 tests/pallas \
  2>&1 | grep -v Deprecation > "$OUT/tests_pallas.log"
echo "tests/pallas rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
grep -E "passed|failed" "$OUT/tests_pallas.log" | tail -2; grep -E "^FAILED" "$OUT/tests_pallas.log" | head
step attention bench
timeout 100 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  "--shapes=7b b1 s128,7b b1 s256,7b b1 s384,7b b8 s4096,8b-gqa b1 s384" \
  > "$OUT/attention.log" 2>&1
grep -E "^\||^copy" "$OUT/attention.log" | sed 's/DecodeAttentionConfig//'
step e2e batch 1, defaults
timeout 120 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step done
