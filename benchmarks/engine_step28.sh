#!/usr/bin/env bash
# Engine step 28, session 12 (issue 15), H200. `OUT=dir bash benchmarks/engine_step28.sh`
# (~9 min, bounded): e2e 7B batch 1 with XLA's command buffers as they are and with
# custom calls kept out of them (same run); the 8B-GQA shape and batch 8 (7B) with the
# shipped defaults. Extra environment (e.g. ANYPREC_FUSE_ROPE_KV=1) passes through.
source "$(dirname "$0")/device_common.sh"
step e2e batch 1, 7B, graphs all vs no_custom_calls
timeout 300 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --decode_graphs=all,no_custom_calls --output_md="$OUT/e2e_graphs.md" \
  --output_json="$OUT/e2e_graphs.json" > "$OUT/e2e_graphs.log" 2>&1
echo "rc=$?"; tail -15 "$OUT/e2e_graphs.md"
step e2e batch 1, 8B GQA
timeout 140 python3 scripts/bench_e2e.py --shape=llama-3-8b --precisions=3,4,5,6,7,8 \
  --repeats=2 --output_md="$OUT/e2e_8b.md" --output_json="$OUT/e2e_8b.json" \
  > "$OUT/e2e_8b.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/e2e_8b.md"
step e2e batch 8, 7B
timeout 140 python3 scripts/bench_e2e.py --batch=8 --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b8.md" --output_json="$OUT/e2e_b8.json" > "$OUT/e2e_b8.log" 2>&1
echo "rc=$?"; tail -8 "$OUT/e2e_b8.md"
step done
