#!/usr/bin/env bash
# Compares one node with three- and five-node clusters on this machine: for each size it starts a
# fresh `sigil dev` deployment, drives the load generator over every node, then reads the nodes'
# metrics for the commit latency and the number of records per Raft entry, and prints one
# Markdown table row per size.
# Usage: scripts/bench-cluster.sh [SECONDS] [CONCURRENCY] [SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
concurrency=${2:-64}
shift $(($# < 2 ? $# : 2))
sizes=("$@")
((${#sizes[@]})) || sizes=(1 3 5)

target=${CARGO_TARGET_DIR:-target}
sigil="$target/release/sigil"
cargo build --release --bins --quiet
cargo bench --bench load --no-run --quiet
work=$(mktemp -d "${TMPDIR:-/tmp}/sigil-bench-cluster.XXXXXX")
dev_pid=""

cleanup() {
    if [[ -n $dev_pid ]] && kill -0 "$dev_pid" 2>/dev/null; then
        kill -TERM "$dev_pid"
        wait "$dev_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Sums one metric over every node's /metrics page.
metric_sum() {
    local dir=$1 name=$2
    python3 - "$dir/endpoints.json" "$name" <<'EOF'
import json, sys, urllib.request
endpoints, name = sys.argv[1], sys.argv[2]
total = 0.0
for node in json.load(open(endpoints))["nodes"]:
    page = urllib.request.urlopen(f"http://{node['metrics']}/metrics", timeout=5).read().decode()
    for line in page.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
print(total)
EOF
}

echo "| nodes | SVIDs/s | p50 (ms) | p99 (ms) | errors | commit mean (ms) | records per entry | ledger bytes per record |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for size in "${sizes[@]}"; do
    dir="$work/dev-$size"
    "$sigil" dev --dir "$dir" --nodes "$size" >"$work/dev-$size.log" 2>&1 &
    dev_pid=$!
    for _ in $(seq 1 600); do
        [[ -f $dir/endpoints.json ]] && break
        kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev-$size.log" >&2; exit 1; }
        sleep 0.2
    done
    report=$(cargo bench --quiet --bench load -- --dev-dir "$dir" --nodes all --concurrency "$concurrency" \
        --duration "${seconds}s" --json 2>"$work/load-$size.err")
    commit_sum=$(metric_sum "$dir" sigil_ledger_commit_duration_seconds_sum)
    commit_count=$(metric_sum "$dir" sigil_ledger_commit_duration_seconds_count)
    entries=$(metric_sum "$dir" sigil_raft_entries_proposed_total)
    commands=$(metric_sum "$dir" sigil_raft_commands_proposed_total)
    records=$(metric_sum "$dir" sigil_ledger_records)
    kill -TERM "$dev_pid"
    wait "$dev_pid" || true
    dev_pid=""
    ledger_bytes=$(du -sb "$dir/nodes/1/data/ledger" | cut -f1)
    python3 - "$size" "$report" "$commit_sum" "$commit_count" "$entries" "$commands" "$ledger_bytes" "$records" <<'EOF'
import json, sys
size, report, commit_sum, commit_count, entries, commands, ledger_bytes, records = sys.argv[1:]
total = json.loads(report)["total"]
errors = total["error_count"]
commit = 1000 * float(commit_sum) / max(float(commit_count), 1)
per_entry = float(commands) / max(float(entries), 1)
issued = max(float(records), float(commit_count) / int(size), 1)
per_record = int(ledger_bytes) / issued
print(f"| {size} | {total['per_second']:,.0f} | {total['latency_ms']['p50']:.1f} | {total['latency_ms']['p99']:.1f} "
      f"| {errors} | {commit:.1f} | {per_entry:.1f} | {per_record:,.0f} |")
EOF
done
