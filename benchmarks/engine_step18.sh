#!/usr/bin/env bash
# Engine step 18, prepared in session 8 for the next device call (issue 15; predictions
# in notes_kernels.md "Step 18"). `OUT=dir bash benchmarks/engine_step18.sh` (~8 min):
#   1. the whole native tests/pallas, timed (item 7: < 5 min), SIGINT at 300 s so pytest
#      still prints its slowest cases;
#   2. ncu of the tensor-core GEMV (tiled planes, the model's launch): where a small
#      launch's fixed ~3 us goes (4096 x 4096, 3 and 4 bits, M = 1) and why M = 8 loses
#      at 5-8 bits (22016 x 4096, 8 bits, M = 1 and 8);
#   3. bench_e2e on the 8B-GQA shape, every width (step 17 was cut before 8 bits).
source "$(dirname "$0")/device_common.sh"
step tests/pallas
pallas_tests 300 25
step ncu
NCU="ncu --clock-control none -k regex:mosaic --launch-skip 1 --section SpeedOfLight \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
timeout 80 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=3,4 \
  --n=4096 --k=4096 --m=1 > "$OUT/ncu_4096.txt" 2>&1
timeout 80 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=8 \
  --n=22016 --k=4096 --m=1 > "$OUT/ncu_gateup_m1.txt" 2>&1
timeout 80 $NCU python3 scripts/profile_mosaic_gemv.py --kernel=tc --tiled --bits=8 \
  --n=22016 --k=4096 --m=8 > "$OUT/ncu_gateup_m8.txt" 2>&1
for f in "$OUT"/ncu_*.txt; do
  echo "-- $f"; grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Stall|Issued Warp|No Eligible" "$f" | head -24
done
step e2e batch 1, 8B GQA
timeout 150 python3 scripts/bench_e2e.py --shape=llama-3-8b --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_8b.md" --output_json="$OUT/e2e_8b.json" > "$OUT/e2e_8b.log" 2>&1
tail -9 "$OUT/e2e_8b.md"
step done
