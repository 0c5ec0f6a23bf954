#!/usr/bin/env bash
# Engine step 27, session 12 (issue 15), H200. `OUT=dir bash benchmarks/engine_step27.sh`
# (~9 min, bounded): native checks of the two new switches; e2e 7B batch 1 under XLA's
# default command buffers and with custom calls kept out of them (same run); the 3-4-bit
# GEMV with register against shared-memory tables.
source "$(dirname "$0")/device_common.sh"
step native checks
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/models/test_generate.py -k "shared_tables or DecodeOptions" 2>&1 | tail -3
step e2e batch 1, 7B, graphs all vs no_custom_calls
timeout 330 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --decode_graphs=all,no_custom_calls --output_md="$OUT/e2e_b1.md" \
  --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
echo "rc=$?"; tail -16 "$OUT/e2e_b1.md"
step 3-4-bit GEMV, register vs shared tables
timeout 150 python3 scripts/bench_tc_gemv.py --shapes=qkv,gate_up,down --bits=3,4 --m=1,8 \
  --gpu_time --notriton --samples=8 --variants=model@tc_tiled,model_smem@tc_tiled \
  --out="$OUT/tc_smem" > "$OUT/tc_smem.log" 2>&1
echo "rc=$?"; tail -30 "$OUT/tc_smem.log"
step done
