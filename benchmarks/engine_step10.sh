#!/usr/bin/env bash
# Engine step 10, device call (issue 15). `OUT=dir bash benchmarks/engine_step10.sh` (~6 min).
#   1. native decode-attention tests (cluster merge: default, 2-CTA cluster, XLA merge);
#   2. decode attention: cluster-merged launches (C = 2, 4, 8; U = 4) against the XLA
#      merge (C = 16), the kernel alone and XLA;
#   3. fused gate_up (22016 x 4096) with 2 or 4 row tiles per CTA against gate/up: does
#      one launch of twice the rows beat two launches (fixed per-launch cost)?
#   4. one 7B decode step traced, bf16 and 3 bits, XLA attention against the kernel.
source "$(dirname "$0")/device_common.sh"
step tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  2>&1 | grep -v Deprecation > "$OUT/logs.txt"; tail -4 "$OUT/logs.txt"
step attention
timeout 150 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  --ctas_per_head=2,4,8,16 --groups=4 > "$OUT/attention.log" 2>&1
grep "^|" "$OUT/attention.log"
step gemv
timeout 150 python3 scripts/bench_tc_gemv.py --shapes=gate/up,gate_up --bits=3,4,8 --m=1 \
  --gpu_time --notriton --samples=8 --out=/tmp/gemv \
  --variants=model@tc_tiled,rt4_t1@tc_tiled,rt4_t2@tc_tiled,rt2_t2@tc_tiled \
  > "$OUT/gemv.log" 2>&1; grep "^| 7b" "$OUT/gemv.log"
step e2e
for mode in xla mosaic; do
  env ANYPREC_DECODE_ATTENTION=$mode timeout 120 python3 scripts/profile_e2e.py \
    --precisions=bf16,3 --iters=20 --trace_dir=/tmp/tr_$mode > "$OUT/e2e_$mode.log" 2>&1
  echo "attention=$mode: $(grep -E ' ms/step' "$OUT/e2e_$mode.log" | tr '\n' ' ')"
  grep -E "^GPU span|^\| (mosaic|dense|other|triton|total)" "$OUT/e2e_$mode.log"
done
step done
