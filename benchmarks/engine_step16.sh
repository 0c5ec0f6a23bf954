#!/usr/bin/env bash
# Engine step 16, second device call of session 8 (issues 15 and 14). `OUT=dir bash
# benchmarks/engine_step16.sh` (~9 min, bounded). Shipped defaults, no switches.
#   1. decode attention at short caches, batch 8 at 4096 slots, GQA at 384 (step 15's
#      run of it failed: "Failed to launch ptxas" right after a killed pytest);
#   2. bench_e2e batch 8 (7B) and batch 1 on the 8B-GQA shape;
#   3. optimal nesting on the GPU: phases of 4096 x 4096 rows, then the 7B seed + upscale.
source "$(dirname "$0")/device_common.sh"
step attention bench
timeout 90 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  "--shapes=7b b1 s128,7b b1 s256,7b b1 s384,7b b8 s4096,8b-gqa b1 s384" \
  > "$OUT/attention.log" 2>&1
grep -E "^\||^copy" "$OUT/attention.log" | sed 's/DecodeAttentionConfig//'; tail -2 "$OUT/attention.log"
step e2e batch 8, 7B
timeout 140 python3 scripts/bench_e2e.py --batch=8 --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b8.md" --output_json="$OUT/e2e_b8.json" > "$OUT/e2e_b8.log" 2>&1
tail -9 "$OUT/e2e_b8.md"
step e2e batch 1, 8B GQA
timeout 150 python3 scripts/bench_e2e.py --shape=llama-3-8b --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_8b.md" --output_json="$OUT/e2e_8b.json" > "$OUT/e2e_8b.log" 2>&1
tail -9 "$OUT/e2e_8b.md"
step nesting phases 4096 x 4096
timeout 60 python3 benchmarks/nesting_phases.py --rows=4096 --k=4096 > "$OUT/nesting.log" 2>&1
tail -12 "$OUT/nesting.log"
step quantize 7B optimal nesting
timeout 110 python3 scripts/bench_quantize.py --preset=llama2-7b --nesting=optimal \
  --shapes=4096x4096 --budget_s=80 --out="$OUT/quantize.jsonl" > "$OUT/quantize.log" 2>&1
tail -8 "$OUT/quantize.log"
step done
