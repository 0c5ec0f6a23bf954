#!/usr/bin/env bash
# Engine step 11, device call (issue 15): the landed defaults end to end.
# `OUT=dir bash benchmarks/engine_step11.sh` (~8 min). Defaults now: gate/up fused at
# load (one 22016-row GEMV), Mosaic decode attention on Hopper (C ~ S / 128 CTAs per
# head, U = 4, XLA merge).
#   1. native decode-attention tests; the default launch against XLA's attention;
#   2. bench_e2e, Llama-2-7B shape, batch 1 (3..8 bits) and batch 8 (3, 4, 8);
#   3. decode-step A/B of the attention switch (profile_e2e, bf16 / 3 / 8 bits).
source "$(dirname "$0")/device_common.sh"
step tests
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  2>&1 | grep -v Deprecation > "$OUT/logs.txt"; tail -3 "$OUT/logs.txt"
timeout 90 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  > "$OUT/attention.log" 2>&1; grep "^| [78]" "$OUT/attention.log"
step e2e batch 1
timeout 240 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 --repeats=2 \
  --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -12 "$OUT/e2e_b1.md"
step e2e batch 8
timeout 150 python3 scripts/bench_e2e.py --precisions=3,4,8 --batch=8 --repeats=2 \
  --output_md="$OUT/e2e_b8.md" > "$OUT/e2e_b8.log" 2>&1
tail -6 "$OUT/e2e_b8.md"
step attention A/B
for mode in xla mosaic; do
  env ANYPREC_DECODE_ATTENTION=$mode timeout 60 python3 scripts/profile_e2e.py \
    --precisions=bf16,3,8 --iters=20 > /tmp/ab_$mode.log 2>&1
  echo "attention=$mode: $(grep -E ' ms/step' /tmp/ab_$mode.log | tr '\n' ' ')"
done
step done
