#!/usr/bin/env bash
# Engine step 19, first device call of session 9 (issue 15; predictions in
# notes_kernels.md "Step 19"). `OUT=dir bash benchmarks/engine_step19.sh` (~8 min, bounded).
#   1. E2E=1: bench_e2e batch 1, 7B, shipped defaults (the README's H200 row); else the
#      native tests/pallas, timed (item 7), SIGINT at TESTS_S (250) s;
#   2. one 384-slot decode step traced per model (PROFILE: bf16, 3): the per-kernel
#      GPU table, to count the non-GEMV launches per layer; the optimized HLO of a
#      2-layer 3-bit step (which XLA fusions they are);
#   3. ncu of the tensor-core GEMV (step 18's cases): a small launch's fixed cost and
#      the M = 8 loss at 8 bits.
source "$(dirname "$0")/device_common.sh"
if [ "${E2E:-0}" = 1 ]; then
  step e2e batch 1, 7B
  timeout 150 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
    --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
  tail -9 "$OUT/e2e_b1.md"
else
  step tests/pallas
  pallas_tests "${TESTS_S:-250}" 25
fi
step decode step traced, 384 slots
timeout 110 python3 scripts/profile_e2e.py --precisions=${PROFILE:-bf16,3} --iters=20 --context=384 \
  --trace_dir=/tmp/tr > "$OUT/profile.log" 2>&1
grep -E " ms/step|^\| (mosaic|other|total|dense)" "$OUT/profile.log" | head -30
step optimized HLO, 2 layers, 3 bits
XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*" \
  timeout 50 python3 scripts/profile_e2e.py --precisions=3 --layers=2 --iters=3 --context=384 \
  > "$OUT/hlo.log" 2>&1
find "$OUT/hlo" -name "*after_optimizations.txt" ! -name "*buffer*" | head -3
find "$OUT/hlo" -type f ! -name "*after_optimizations.txt" -delete 2>/dev/null
step ncu
NCU="ncu --clock-control none -k regex:mosaic --launch-skip 1 --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
timeout 55 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=3,4 \
  --n=4096 --k=4096 --m=1 > "$OUT/ncu_4096.txt" 2>&1
timeout 45 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=8 \
  --n=22016 --k=4096 --m=1 > "$OUT/ncu_gateup_m1.txt" 2>&1
timeout 45 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=8 \
  --n=22016 --k=4096 --m=8 > "$OUT/ncu_gateup_m8.txt" 2>&1
for f in "$OUT"/ncu_*.txt; do
  echo "-- $f"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp|No Eligible" "$f" | head -12
done
step done
