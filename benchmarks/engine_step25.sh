#!/usr/bin/env bash
# Engine step 25, session 10: which XLA command buffers (CUDA graphs) to keep with PDL.
# `OUT=dir bash benchmarks/engine_step25.sh` (~4 min): untraced 384-slot steps, bf16 / 3 / 8
# bits, per setting "command-buffer types | ANYPREC_PDL".
source "$(dirname "$0")/device_common.sh"
python3 -c "from jax._src import xla_bridge; import jax; print(jax.devices()[0].device_kind)"
for setting in "default|0" "FUSION|1" "FUSION,CUBLAS,CUBLASLT|1" "none|1"; do
  cb=${setting%|*}; p=${setting#*|}
  case $cb in default) flags="" ;; none) flags="--xla_gpu_enable_command_buffer=" ;;
    *) flags="--xla_gpu_enable_command_buffer=$cb" ;; esac
  tag=$(echo "$cb$p" | tr -c 'A-Za-z0-9' _)
  XLA_FLAGS="$flags" ANYPREC_PDL=$p timeout 100 python3 scripts/profile_e2e.py \
    --precisions=bf16,3,8 --iters=30 --context=384 > "$OUT/cb_$tag.log" 2>&1
  echo "cb=$cb PDL=$p: $(grep -E ' ms/step' "$OUT/cb_$tag.log" | tr '\n' ' ') $(grep -m1 -E 'Error|error:' "$OUT/cb_$tag.log")"
done
step done
