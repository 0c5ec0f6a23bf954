# Sourced by benchmarks/engine_step*.sh: strict mode, $OUT required, the device
# environment, and `step` (a timestamped section header).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; }
