#!/usr/bin/env bash
# Engine step 8, first device call (issue 15): the two kernels built in step 7 without a
# GPU. Run from the repository root on the H200: `OUT=dir bash benchmarks/engine_step8.sh`
# (about 8-9 minutes; each part is bounded). Predictions: benchmarks/notes_kernels.md,
# end of step 7.
#   1. native tests of the bulk-copy GEMV and the decode attention;
#   2. GPU-time GEMV: landed launch against bulk copies in 1, 2, 4 chunks (3-5 bits);
#   3. decode attention: kernel against the decoder's XLA attention;
#   4. decode steps (7B shape, 3 bits and bf16): XLA attention, the kernel
#      (ANYPREC_DECODE_ATTENTION=mosaic), and XLA without dot strength reduction.
source "$(dirname "$0")/device_common.sh"
step tests
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  tests/pallas/test_mosaic_gemv_tc.py -k "bulk or Attention or attention" 2>&1 \
  | grep -v Deprecation | tee "$OUT/tests.log" | tail -8
step gemv
timeout 200 python3 scripts/bench_tc_gemv.py --shapes=gate/up,down,qkv --bits=3,4,5 --m=1 \
  --gpu_time --notriton --samples=8 --out="$OUT" \
  --variants=model@tc_tiled,model_b1@tc_tiled,model_b2@tc_tiled,model_b4@tc_tiled \
  > "$OUT/gemv.log" 2>&1; tail -40 "$OUT/gemv.log" | grep "^|"
step attention
timeout 120 python3 scripts/bench_attention.py --gpu_time --samples=10 --out="$OUT" \
  > "$OUT/attention.log" 2>&1; grep "^|" "$OUT/attention.log"
step e2e
for mode in xla mosaic nodsr; do
  if [[ $mode == nodsr ]]; then
    env XLA_FLAGS=--xla_gpu_enable_dot_strength_reduction=false timeout 100 \
      python3 scripts/profile_e2e.py --precisions=bf16,3 --iters=20 > "$OUT/e2e_$mode.log" 2>&1
  else
    env ANYPREC_DECODE_ATTENTION=$mode timeout 100 \
      python3 scripts/profile_e2e.py --precisions=bf16,3 --iters=20 > "$OUT/e2e_$mode.log" 2>&1
  fi
  echo "attention=$mode: $(grep -E '^\| (bf16|3) ' "$OUT/e2e_$mode.log" | tr '\n' ' ')"
done
step done
