#!/usr/bin/env bash
# Engine step 31, session 13 (issue 15), H200; prediction T72 in notes_kernels.md step 30.
# `OUT=dir bash benchmarks/engine_step31.sh` (~8 min, bounded: 160 + 300 s): the shipped
# defaults' e2e tables with the new bandwidth columns (MB/step, TB/s, % of the copy
# bandwidth measured in the same run): Llama-2-7B batch 1, then batch 8 (every width; the
# session-13 batch-8 runs were cut before 8 bits by 140-215 s bounds).
source "$(dirname "$0")/device_common.sh"
step e2e batch 1, 7B
timeout 160 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
echo "rc=$?"; grep -E "copy bandwidth|% copy" "$OUT/e2e_b1.md" | cut -c1-40; tail -7 "$OUT/e2e_b1.md"
step e2e batch 8, 7B
timeout 300 python3 scripts/bench_e2e.py --batch=8 --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b8.md" --output_json="$OUT/e2e_b8.json" > "$OUT/e2e_b8.log" 2>&1
echo "rc=$?"; tail -7 "$OUT/e2e_b8.md"; grep -E "decode" "$OUT/e2e_b8.log" | tail -7
step done
