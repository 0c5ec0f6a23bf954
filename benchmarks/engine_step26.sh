#!/usr/bin/env bash
# Engine step 26, session 10: e2e batch 1, 7B, every width, with PDL on, XLA's command
# buffers as default against custom calls kept out of them (so the GEMVs launch as
# programmatic dependents). `OUT=dir bash benchmarks/engine_step26.sh` (~5 min).
source "$(dirname "$0")/device_common.sh"
for setting in "default" "FUSION,CUBLAS,CUBLASLT"; do
  case $setting in default) flags="" ;; *) flags="--xla_gpu_enable_command_buffer=$setting" ;; esac
  tag=$(echo "$setting" | tr -c 'A-Za-z0-9' _)
  step "e2e, command buffers $setting, PDL 1"
  XLA_FLAGS="$flags" ANYPREC_PDL=1 timeout 140 python3 scripts/bench_e2e.py \
    --precisions=3,4,5,6,7,8 --repeats=2 --output_md="$OUT/e2e_$tag.md" \
    --output_json="$OUT/e2e_$tag.json" > "$OUT/e2e_$tag.log" 2>&1
  tail -8 "$OUT/e2e_$tag.md"
done
step done
