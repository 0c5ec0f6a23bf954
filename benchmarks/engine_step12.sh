#!/usr/bin/env bash
# Engine step 12, last device call of session 6 (issue 15). `OUT=dir bash
# benchmarks/engine_step12.sh` (~8.5 min, bounded). Defaults: gate/up fused,
# decode attention "auto" (the kernel from 1024 cache slots on).
#   1. bench_e2e batch 1, 3..8 bits (384-slot caches: XLA attention);
#   2. a 4096-slot decode step, bf16 and 3 bits: XLA attention vs the kernel;
#   3. the native GPU suite `tests/pallas`, timed (item 7: < 5 min).
source "$(dirname "$0")/device_common.sh"
step e2e batch 1
timeout 115 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step long context
for mode in xla auto; do
  env ANYPREC_DECODE_ATTENTION=$mode timeout 60 python3 scripts/profile_e2e.py \
    --precisions=bf16,3 --iters=20 --context=4096 > "$OUT/long_$mode.log" 2>&1
  echo "attention=$mode, 4096 slots: $(grep -E ' ms/step' "$OUT/long_$mode.log" | tr '\n' ' ')"
done
step native tests
start=$(date +%s)
timeout 270 python3 -m pytest -q -p no:cacheprovider tests/pallas 2>&1 | grep -v Deprecation \
  > "$OUT/tests_pallas.log"
echo "rc=$? wall=$(( $(date +%s) - start ))s"; tail -4 "$OUT/tests_pallas.log"
step done
