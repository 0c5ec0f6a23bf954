#!/usr/bin/env bash
# Engine step 23, session 10 (issue 15; predictions in notes_kernels.md "Step 23").
# `OUT=dir bash benchmarks/engine_step23.sh` (~8 min, bounded).
#   0. does this jax launch Pallas Mosaic GPU kernels with PDL?
#   1. native tests: the PDL chain (bit-equal to the serial chain) and the epilogues;
#   2. a traced 384-slot decode step, 3 and 8 bits: ANYPREC_PDL=0 against 1;
#   3. bench_e2e batch 1, 7B, shipped defaults plus PDL where 1 passed and 2 found it faster.
source "$(dirname "$0")/device_common.sh"
step environment
python3 -c "import jax; from anyprec_jax.pallas.mosaic import ptx; \
print('jax', jax.__version__, jax.devices()[0].device_kind, 'pdl launches:', ptx.pdl_launches())"
step native tests
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/pallas/test_mosaic_gemv_tc.py \
  tests/pallas/test_decode_attention.py -k "pdl or launch_dependents or epilogue" \
  2>&1 | grep -v Deprecation > "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}; tail -3 "$OUT/tests.log"; grep -E "^FAILED|Error" "$OUT/tests.log" | head
step "decode step 384 slots: PDL 0 / 1"
for p in 0 1; do
  ANYPREC_PDL=$p timeout 110 python3 scripts/profile_e2e.py --precisions=3,8 --iters=20 \
    --context=384 --trace_dir=/tmp/tr_$p > "$OUT/step_pdl$p.log" 2>&1
  echo "PDL=$p: $(grep -E ' ms/step' "$OUT/step_pdl$p.log" | tr '\n' ' ')"
  grep -E "^\| (mosaic|other|total)|busy|started before" "$OUT/step_pdl$p.log"
done
ms() { grep -E "^3: .* ms/step" "$OUT/step_pdl$1.log" | head -1 | awk '{print $2}'; }
p=0
if [ "$tests_rc" = 0 ] && awk -v a="$(ms 1)" -v b="$(ms 0)" 'BEGIN{exit !(a < b)}'; then p=1; fi
step e2e batch 1, 7B, ANYPREC_PDL=$p
ANYPREC_PDL=$p timeout 140 python3 scripts/bench_e2e.py --precisions=3,4,5,6,7,8 \
  --repeats=2 --output_md="$OUT/e2e_b1.md" --output_json="$OUT/e2e_b1.json" > "$OUT/e2e_b1.log" 2>&1
tail -9 "$OUT/e2e_b1.md"
step done
