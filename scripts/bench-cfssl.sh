#!/usr/bin/env bash
# Reference point for the load generator: cfssl's signing API (Debian package golang-cfssl) with an
# in-memory P-256 CA key, plain HTTP, no ledger, driven by wrk on loopback.
# Usage: scripts/bench-cfssl.sh [DURATION_SECONDS] [CONNECTIONS]
set -euo pipefail

duration=${1:-10}
connections=${2:-16}
for tool in cfssl wrk openssl; do
    command -v "$tool" >/dev/null || { echo "bench-cfssl: $tool is missing (apt-get install golang-cfssl wrk)" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/sigil-cfssl.XXXXXX")
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

cat >ca-csr.json <<'JSON'
{"CN": "cfssl bench CA", "key": {"algo": "ecdsa", "size": 256}}
JSON
cfssl genkey -initca ca-csr.json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
open("ca.pem", "w").write(d["cert"]); open("ca-key.pem", "w").write(d["key"])'
cat >config.json <<'JSON'
{"signing": {"default": {"expiry": "1h", "usages": ["digital signature", "server auth", "client auth"]}}}
JSON

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -subj /O=bench \
    -addext subjectAltName=URI:spiffe://example.org/bench -out leaf.csr 2>/dev/null
python3 - <<'PY'
import json
csr = open("leaf.csr").read()
body = json.dumps({"certificate_request": csr})
lua = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' % json.dumps(body)
open("sign.lua", "w").write(lua)
PY

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cfssl serve -address 127.0.0.1 -port "$port" -ca ca.pem -ca-key ca-key.pem -config config.json -loglevel 5 >serve.log 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    curl -sf -o /dev/null -X POST -d '{}' "http://127.0.0.1:$port/api/v1/cfssl/sign" 2>/dev/null && break
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

echo "cfssl: wrk -t2 -c$connections -d${duration}s, $(nproc) cores"
wrk -t2 -c"$connections" -d"${duration}s" --latency -s sign.lua "http://127.0.0.1:$port/api/v1/cfssl/sign"
