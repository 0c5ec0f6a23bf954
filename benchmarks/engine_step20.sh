#!/usr/bin/env bash
# Engine step 20, session 9 (issue 15; predictions in notes_kernels.md "Step 20").
# `OUT=dir bash benchmarks/engine_step20.sh` (~8 min, bounded).
#   1. native tests of the residual epilogue (gemv_tc, ops.linear_residual);
#   2. a traced 384-slot decode step, ANYPREC_FUSE_RESIDUAL=0 (bf16, 3, 8 bits) and =1
#      (3, 8 bits): per-kernel GPU tables;
#   3. the optimized HLO of a 2-layer 3-bit step with the fusion on;
#   4. bench_e2e batch 1, 7B, with the fusion on if 1 passed and 2 found it faster;
#   5. ncu of the 4096 x 4096 tensor-core GEMV (3 and 4 bits, M = 1).
source "$(dirname "$0")/device_common.sh"
step native tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/pallas/test_ops_dispatch.py -k "epilogue or residual or Residual" \
  2>&1 | grep -v Deprecation > "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}; tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head
step decode step 384 slots, fuse 0 / 1
for fuse in 0 1; do
  p=bf16,3,8; [ $fuse = 1 ] && p=3,8
  env ANYPREC_FUSE_RESIDUAL=$fuse timeout 110 python3 scripts/profile_e2e.py --precisions=$p \
    --iters=20 --context=384 --trace_dir=/tmp/tr_$fuse > "$OUT/step_fuse$fuse.log" 2>&1
  echo "fuse=$fuse: $(grep -E ' ms/step' "$OUT/step_fuse$fuse.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)|busy" "$OUT/step_fuse$fuse.log"
done
step optimized HLO, 2 layers, 3 bits, fuse 1
ANYPREC_FUSE_RESIDUAL=1 XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
  timeout 50 python3 scripts/profile_e2e.py --precisions=3 --layers=2 --iters=3 --context=384 \
  > "$OUT/hlo.log" 2>&1
find "$OUT/hlo" -type f ! -name "*after_optimizations.txt" -delete 2>/dev/null
find "$OUT/hlo" -name "*buffer*" -delete 2>/dev/null; ls "$OUT/hlo" | head -3
ms() { grep -E "^3: .* ms/step" "$OUT/step_fuse$1.log" | head -1 | awk '{print $2}'; }
fuse=0
if [ "$tests_rc" = 0 ] && awk -v a="$(ms 1)" -v b="$(ms 0)" 'BEGIN{exit !(a < b)}'; then fuse=1; fi
step e2e batch 1, 7B, fuse=$fuse
ANYPREC_FUSE_RESIDUAL=$fuse timeout 140 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 \
  --repeats=2 --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step ncu 4096
timeout 55 ncu --clock-control none -k regex:mosaic --launch-skip 1 --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
  python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=3,4 --n=4096 --k=4096 \
  --m=1 > "$OUT/ncu_4096.txt" 2>&1
grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp|No Eligible" \
  "$OUT/ncu_4096.txt" | head -18
step done
