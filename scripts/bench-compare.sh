#!/usr/bin/env bash
# Measures cfssl and Sigil one after the other in the same run, since these machines are noisy,
# and prints both throughputs and their ratio. Needs a release build (make build).
# Usage: scripts/bench-compare.sh [DURATION_SECONDS] [SIGIL_CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-10}
concurrency=${2:-64}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sigil/target-ws}

cfssl_out=$(scripts/bench-cfssl.sh "$duration" 16)
echo "$cfssl_out"
sigil_out=$(cargo bench --quiet --bench load -- --concurrency "$concurrency" --duration "${duration}s" 2>&1)
echo "$sigil_out"

cfssl_rate=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$cfssl_out")
sigil_rate=$(sed -n 's/.* = \([0-9.]*\)\/s;.*/\1/p' <<<"$sigil_out")
python3 -c "print(f'compare: cfssl {float(\"$cfssl_rate\"):.0f}/s, sigil {float(\"$sigil_rate\"):.0f}/s, sigil/cfssl = {float(\"$sigil_rate\") / float(\"$cfssl_rate\"):.2f}')"
