#!/usr/bin/env bash
# Engine step 30, session 13 (issue 15), H200; predictions T69-T72 in notes_kernels.md
# step 30. `OUT=dir bash benchmarks/engine_step30.sh` (~9.5 min, bounded: 150 + 60 + 2 x 90 + 170 s):
#   1. GEMV GPU time, 7B gate_up / down / qkv at 3, 4, 5, 8 bits, M = 1 and 8, with the
#      4-bit shared tables beside (T66, T69);
#   2. a traced 384-slot decode step at batch 8 and batch 1 (bf16, 5 bits): where batch 8's
#      time goes (T70);
#   3. the whole native tests/pallas, timed (item 7; T71).
source "$(dirname "$0")/device_common.sh"
step GEMV M = 1 and 8
timeout 150 python3 scripts/bench_tc_gemv.py --shapes=qkv,gate_up,down --bits=3,4,5,8 \
  --m=1,8 --gpu_time --notriton --samples=8 --variants=model@tc_tiled \
  --out="$OUT/tc_m18" > "$OUT/tc_m18.log" 2>&1
echo "rc=$?"; grep -E "^\| 7b" "$OUT/tc_m18.log" | cut -d'|' -f2-5,11-13
timeout 60 python3 scripts/bench_tc_gemv.py --shapes=gate_up,down --bits=4 --m=1,8 \
  --gpu_time --notriton --samples=8 --variants=model_smem@tc_tiled \
  --out="$OUT/tc_smem" > "$OUT/tc_smem.log" 2>&1
echo "rc=$?"; grep -E "^\| 7b .* tc " "$OUT/tc_smem.log" | cut -d'|' -f2-5,11-13
for b in 8 1; do
  step "traced 384-slot step, batch $b"
  timeout 90 python3 scripts/profile_e2e.py --batch=$b --precisions=bf16,5 --iters=20 \
    --context=384 --trace_dir=/tmp/tr_b$b > "$OUT/step_b$b.log" 2>&1
  echo "rc=$?"; grep -E " ms/step" "$OUT/step_b$b.log"
  grep -E "busy" "$OUT/step_b$b.log" | cut -c1-160
  awk '/^\| family/{on=1} on&&/^$/{on=0} on' "$OUT/step_b$b.log" | head -24
done
step tests/pallas
pallas_tests "${TESTS_S:-170}" 12
step done
