#!/usr/bin/env bash
# Engine step 24, session 10: does PDL engage without XLA's command buffers (CUDA graphs)?
# `OUT=dir bash benchmarks/engine_step24.sh` (~5 min): a traced 384-slot step, 3 and 8 bits,
# ANYPREC_PDL=0/1 with XLA_FLAGS=--xla_gpu_enable_command_buffer= (graphs off).
source "$(dirname "$0")/device_common.sh"
for p in 0 1; do
  step "graphs off, PDL=$p"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= ANYPREC_PDL=$p timeout 110 \
    python3 scripts/profile_e2e.py --precisions=3,8 --iters=20 \
    --context=384 --trace_dir=/tmp/trg_$p > "$OUT/step_nog_pdl$p.log" 2>&1
  echo "PDL=$p: $(grep -E ' ms/step' "$OUT/step_nog_pdl$p.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)|busy|started before" "$OUT/step_nog_pdl$p.log"
done
step done
