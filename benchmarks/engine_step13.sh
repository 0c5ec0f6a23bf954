#!/usr/bin/env bash
# Engine step 13, first device call of session 7 (issue 15). `OUT=dir bash
# benchmarks/engine_step13.sh` (~7 min, bounded).
#   1. native decode-attention tests (in-kernel merge: CTA and cluster; depth; bf16 out);
#   2. the fixed GPU time of the shortest kernels (Mosaic, XLA);
#   3. decode attention launches (C, T, D, merge) against XLA, GPU time;
#   4. a 384-slot decode step, bf16 and 3 bits: XLA attention vs the kernel (auto launch),
#      with per-kernel traces.
source "$(dirname "$0")/device_common.sh"
step attention tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  2>&1 | grep -v Deprecation > "$OUT/tests_attention.log"
tail -4 "$OUT/tests_attention.log"
step launch floor
timeout 60 python3 scripts/bench_launch_floor.py > "$OUT/floor.log" 2>&1
grep "^|" "$OUT/floor.log"
step attention bench
timeout 200 python3 scripts/bench_attention.py --gpu_time --samples=10 --out="$OUT" \
  --variants=c4t1d6k,c3t1d2k,c2t2d3k,c1t4d2k,c1t8d1k,c8t1d1k,c4t2d3k,c8t4d4k,c8t2d8k,c16t1d4x,c12t1d1x \
  > "$OUT/attention.log" 2>&1
grep -E "^\||^copy" "$OUT/attention.log"
step decode step 384 slots
for mode in xla mosaic; do
  env ANYPREC_DECODE_ATTENTION=$mode timeout 100 python3 scripts/profile_e2e.py \
    --precisions=bf16,3 --iters=20 --context=384 --trace_dir=/tmp/tr_$mode \
    > "$OUT/step384_$mode.log" 2>&1
  echo "attention=$mode: $(grep -E ' ms/step|^\| [a-z0-9]+ \| [0-9.]+ \|$' "$OUT/step384_$mode.log" | tr '\n' ' ')"
  grep -E "^\| (family|mosaic|dense|other|triton|total)" "$OUT/step384_$mode.log"
done
step done
