#!/usr/bin/env bash
# Runs the load generator's ACME mode against a 3-node Sigil dev cluster and against Pebble
# (PEBBLE_VA_NOSLEEP=1, no deliberate nonce rejections) on this machine, one after the other, with
# the same concurrency, duration and http-01 responder, and prints both reports.
#
# Usage: scripts/bench-acme.sh [CONCURRENCY] [DURATION] [HTTP01_PORT]
set -euo pipefail

concurrency="${1:-16}"
duration="${2:-20s}"
http01_port="${3:-5002}"
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/sigil/target-ws}"
sigil="$target_dir/release/sigil"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {
    local what="$1" check="$2"
    for _ in $(seq 1 240); do
        if eval "$check"; then return 0; fi
        sleep 0.5
    done
    echo "bench-acme: $what did not start" >&2
    exit 1
}

cargo build --release --bins --bench load >/dev/null
load="$(ls -t "$target_dir"/release/deps/load-* | grep -v '\.d$' | head -1)"

echo "== Sigil: 3 nodes"
"$sigil" dev --dir "$work/sigil" --nodes 3 --acme-http01-port "$http01_port" >"$work/sigil.log" 2>&1 &
pids+=($!)
wait_for "sigil dev" "[[ -f $work/sigil/endpoints.json ]]"
"$load" --acme --dev-dir "$work/sigil" --nodes all --concurrency "$concurrency" --duration "$duration" \
    --acme-responder "127.0.0.1:$http01_port" --label "sigil, 3 nodes" --json >"$work/sigil.json"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

echo "== Pebble"
dns_port="$(free_port)"
pebble-challtestsrv -dns01 "127.0.0.1:$dns_port" -management "127.0.0.1:$(free_port)" -http01 "" -https01 "" \
    -tlsalpn01 "" -defaultIPv4 127.0.0.1 -defaultIPv6 "" >"$work/challtestsrv.log" 2>&1 &
pids+=($!)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=Pebble benchmark CA" \
    -keyout "$work/ca.key" -out "$work/ca.pem" >/dev/null 2>&1
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$work/pebble.key" -out "$work/pebble.csr" >/dev/null 2>&1
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$work/san.ext"
openssl x509 -req -in "$work/pebble.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
    -extfile "$work/san.ext" -out "$work/pebble.pem" >/dev/null 2>&1
pebble_port="$(free_port)"
cat >"$work/pebble.json" <<JSON
{"pebble": {"listenAddress": "127.0.0.1:$pebble_port", "managementListenAddress": "127.0.0.1:$(free_port)",
  "certificate": "$work/pebble.pem", "privateKey": "$work/pebble.key", "httpPort": $http01_port,
  "tlsPort": 5001, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
JSON
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 pebble -config "$work/pebble.json" -dnsserver "127.0.0.1:$dns_port" \
    >"$work/pebble.log" 2>&1 &
pids+=($!)
wait_for "pebble" "curl -s --cacert $work/ca.pem https://127.0.0.1:$pebble_port/dir >/dev/null"
"$load" --acme --acme-directory "https://127.0.0.1:$pebble_port/dir" --acme-roots "$work/ca.pem" \
    --concurrency "$concurrency" --duration "$duration" --acme-responder "127.0.0.1:$http01_port" \
    --label "pebble" --json >"$work/pebble.json.out"

echo "== Results ($(nproc) cores, $(date -u +%Y-%m-%d))"
for file in "$work/sigil.json" "$work/pebble.json.out"; do
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print("{label}: {orders_per_second:.1f} orders/s, p50 {p50_ms:.0f} ms, p99 {p99_ms:.0f} ms, {orders} orders, {failures} failed flows".format(**r))' "$file"
done
