#!/usr/bin/env bash
# Engine step 9, device call (issue 15, plus issue 14's quantizer time). Run from the
# repository root on the H200: `OUT=dir bash benchmarks/engine_step9.sh` (~7 min).
#   1. native decode-attention tests (reference now f32-exact: HIGHEST precision);
#   2. decode attention: default launch (new CTA rule) against C = 4..32 CTAs per head,
#      U = 4, the kernel alone (no merge), and XLA;
#   3. one 7B decode step traced (CUPTI kernel table), bf16 and 3 bits, XLA attention
#      against the kernel: which kernels the switch adds or removes (layout copies?);
#   4. GEMV loads-only probes, landed launch vs bulk copies (3 bits): do bulk copies
#      move the bytes faster, so that the decode alone is what slows them;
#   5. quantizer: seed + upscale of every Llama-2-7B linear, greedy and optimal nesting.
source "$(dirname "$0")/device_common.sh"
step tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_decode_attention.py \
  2>&1 | grep -v Deprecation > "$OUT/logs.txt"; tail -4 "$OUT/logs.txt"
step attention
timeout 150 python3 scripts/bench_attention.py --gpu_time --samples=10 --out=/tmp/att \
  --ctas_per_head=4,8,16,32 --groups=4 > "$OUT/attention.log" 2>&1
grep "^|" "$OUT/attention.log"
step e2e
for mode in xla mosaic; do
  env ANYPREC_DECODE_ATTENTION=$mode timeout 120 python3 scripts/profile_e2e.py \
    --precisions=bf16,3 --iters=20 --trace_dir=/tmp/tr_$mode > "$OUT/e2e_$mode.log" 2>&1
  echo "attention=$mode: $(grep -E ' ms/step' "$OUT/e2e_$mode.log" | tr '\n' ' ')"
  grep -E "^GPU span|^\| (family|mosaic|dense|other|triton|total)" "$OUT/e2e_$mode.log"
done
step gemv probes
timeout 120 python3 scripts/bench_tc_gemv.py --shapes=gate/up --bits=3 --m=1 --gpu_time \
  --notriton --samples=8 --out=/tmp/gemv \
  --variants=model@tc_tiled,model_ploads@tc_tiled,model_b1_ploads@tc_tiled,model_b4_ploads@tc_tiled,model_pdecode@tc_tiled,model_b1_pdecode@tc_tiled \
  > "$OUT/gemv.log" 2>&1; grep "^| 7b" "$OUT/gemv.log"
step quantize
for n in greedy optimal; do
  timeout 150 python3 scripts/bench_quantize.py --preset=llama2-7b --nesting=$n \
    --shapes=4096x4096 --budget_s=100 --out=/tmp/quantize_$n.jsonl > "$OUT/quantize_$n.log" 2>&1
  echo "nesting=$n: $(tail -3 "$OUT/quantize_$n.log" | tr '\n' ' ' | cut -c1-600)"
done
step done
