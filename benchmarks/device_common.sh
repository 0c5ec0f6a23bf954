# Sourced by benchmarks/engine_step*.sh: strict mode, $OUT required, the device
# environment, and `step` (a timestamped section header).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }
# pallas_tests LIMIT_S DURATIONS: the whole native tests/pallas into $OUT/tests_pallas.log,
# interrupted with SIGINT at LIMIT_S (pytest still prints its DURATIONS slowest cases);
# prints the time, the counts, failures and the slowest cases.
pallas_tests() {
  local start; start=$(date +%s)
  timeout -s INT "$1" python3 -m pytest -q -p no:cacheprovider --durations="$2" tests/pallas \
    > "$OUT/tests_pallas.log" 2>&1
  echo "tests/pallas rc=$? in $(( $(date +%s) - start )) s"
  grep -E "passed|failed|Interrupt" "$OUT/tests_pallas.log" | tail -3
  grep -E "^FAILED" "$OUT/tests_pallas.log" | head
  grep -A"$(( $2 + 2 ))" "slowest" "$OUT/tests_pallas.log" | cut -c1-150
}
