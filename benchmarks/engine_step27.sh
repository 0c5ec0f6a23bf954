#!/usr/bin/env bash
# Engine step 27, session 12 (issue 15), H200. `OUT=dir bash benchmarks/engine_step27.sh`
# (~8 min, bounded; SMEM=1 adds the 4-bit table kernels, ~1.5 min): native checks of the new switches; e2e 7B batch 1 with the q/k/v
# RoPE + KV-write epilogue off and on; the 4-bit GEMV with register against
# shared-memory tables.
source "$(dirname "$0")/device_common.sh"
step native checks
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/models/test_generate.py -k "shared_tables or DecodeOptions or rope" 2>&1 | tail -4
for on in 0 1; do
  step "e2e batch 1, 7B, ANYPREC_FUSE_ROPE_KV=$on"
  ANYPREC_FUSE_ROPE_KV=$on timeout 150 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 \
    --repeats=2 --output_md="$OUT/e2e_rope$on.md" --output_json="$OUT/e2e_rope$on.json" \
    > "$OUT/e2e_rope$on.log" 2>&1
  echo "rc=$?"; tail -8 "$OUT/e2e_rope$on.md"
done
if [ "${SMEM:-0}" = 1 ]; then
  step 4-bit GEMV, register vs shared tables
  timeout 90 python3 scripts/bench_tc_gemv.py --shapes=qkv,gate_up,down --bits=4 --m=1,8 \
    --gpu_time --notriton --samples=8 --variants=model@tc_tiled,model_smem@tc_tiled \
    --out="$OUT/tc_smem" > "$OUT/tc_smem.log" 2>&1
  echo "rc=$?"; tail -16 "$OUT/tc_smem.log"
fi
step done
