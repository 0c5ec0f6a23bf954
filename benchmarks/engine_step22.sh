#!/usr/bin/env bash
# Engine step 22, session 9 (issue 15). `OUT=dir bash benchmarks/engine_step22.sh`
# (~7 min, bounded). Shipped defaults (both epilogue fusions on since step 21):
#   1. bench_e2e batch 1, 7B;  2. the whole native tests/pallas, timed (item 7).
source "$(dirname "$0")/device_common.sh"
step e2e batch 1, 7B, shipped defaults
timeout 140 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step tests/pallas
pallas_tests "${TESTS_S:-230}" 20
step done
