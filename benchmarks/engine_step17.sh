#!/usr/bin/env bash
# Engine step 17, third device call of session 8. `OUT=dir bash benchmarks/engine_step17.sh`
# (~7 min, bounded): the whole native tests/pallas again (off-by-default options now
# `slow`), interrupted with SIGINT at 270 s so pytest still prints its slowest cases;
# then bench_e2e on the 8B-GQA shape with the kernel's attention at 384 slots (G = 4 went
# to XLA in step 16).
source "$(dirname "$0")/device_common.sh"
step tests/pallas
pallas_tests 270 30
sleep 3
step e2e batch 1, 8B GQA
timeout 120 python3 scripts/bench_e2e.py --shape=llama-3-8b --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_8b.md" --output_json="$OUT/e2e_8b.json" > "$OUT/e2e_8b.log" 2>&1
tail -9 "$OUT/e2e_8b.md"
step done
