#!/usr/bin/env bash
# The demo behind `make demo`: starts a one-node dev deployment on SoftHSM, issues two X509-SVIDs,
# verifies them with openssl, runs a mutual-TLS handshake between them, and stops the node.
# Usage: scripts/demo.sh PATH_TO_SIGIL
set -euo pipefail

sigil=${1:?usage: demo.sh PATH_TO_SIGIL}
work=$(mktemp -d "${TMPDIR:-/tmp}/sigil-demo.XXXXXX")
dev_dir="$work/dev"
trust_domain=example.org
dev_pid=""
server_pid=""

cleanup() {
    local status=$?
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
    if [[ -n $dev_pid ]] && kill -0 "$dev_pid" 2>/dev/null; then
        kill -TERM "$dev_pid"
        wait "$dev_pid" || true
    fi
    if ((status != 0)); then
        echo "demo: FAILED (exit $status); files kept in $work" >&2
        [[ -f $dev_dir/nodes/1/node.log ]] && tail -n 20 "$dev_dir/nodes/1/node.log" >&2
    fi
    exit "$status"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "Starting a dev node on SoftHSM in $dev_dir"
"$sigil" dev --dir "$dev_dir" --trust-domain "$trust_domain" >"$work/dev.out" 2>&1 &
dev_pid=$!
for _ in $(seq 1 600); do
    [[ -f $dev_dir/endpoints.json ]] && break
    kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.out" >&2; exit 1; }
    sleep 0.1
done
[[ -f $dev_dir/endpoints.json ]] || { echo "dev node did not start within 60 s" >&2; cat "$work/dev.out" >&2; exit 1; }
cat "$dev_dir/endpoints.json"

step "Node status"
"$sigil" status --dev-dir "$dev_dir"

step "Issuing two X509-SVIDs"
"$sigil" issue svid --dev-dir "$dev_dir" --spiffe-id "spiffe://$trust_domain/demo/server" \
    --dns server.demo.$trust_domain --ttl 30m --out "$work/server"
"$sigil" issue svid --dev-dir "$dev_dir" --spiffe-id "spiffe://$trust_domain/demo/client" \
    --ttl 30m --out "$work/client"

step "Verifying both with openssl against the root, intermediates untrusted"
for who in server client; do
    dir="$work/$who"
    # svid.pem contains the leaf first, then the intermediates.
    awk 'BEGIN{n=0} /BEGIN CERT/{n++} n==1' "$dir/svid.pem" >"$dir/leaf.pem"
    awk 'BEGIN{n=0} /BEGIN CERT/{n++} n>1' "$dir/svid.pem" >"$dir/intermediates.pem"
    openssl verify -CAfile "$dir/bundle.pem" -untrusted "$dir/intermediates.pem" "$dir/leaf.pem"
    openssl x509 -in "$dir/leaf.pem" -noout -subject -ext subjectAltName,keyUsage,extendedKeyUsage,basicConstraints -enddate
done

step "Mutual-TLS handshake between the two SVIDs (openssl s_server and s_client)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# s_server stops when its standard input closes, so keep it open for the duration of the handshake.
sleep 60 | openssl s_server -accept "127.0.0.1:$port" -naccept 1 \
    -cert "$work/server/leaf.pem" -cert_chain "$work/server/intermediates.pem" -key "$work/server/svid.key" \
    -CAfile "$work/server/bundle.pem" -Verify 2 -verify_return_error >"$work/s_server.out" 2>&1 &
server_pid=$!
# s_server prints ACCEPT once it listens; a probe connection would use up its one accept.
for _ in $(seq 1 50); do
    grep -q ACCEPT "$work/s_server.out" && break
    sleep 0.1
done
echo "hello from the demo client" | openssl s_client -connect "127.0.0.1:$port" -servername server.demo.$trust_domain \
    -cert "$work/client/leaf.pem" -cert_chain "$work/client/intermediates.pem" -key "$work/client/svid.key" \
    -CAfile "$work/client/bundle.pem" -verify_return_error -verify_hostname server.demo.$trust_domain \
    -brief >"$work/s_client.out" 2>&1 || { cat "$work/s_client.out" >&2; exit 1; }
wait "$server_pid" || true
server_pid=""
cat "$work/s_client.out"
grep -q "Verification: OK" "$work/s_client.out"
grep -q "hello from the demo client" "$work/s_server.out" || { cat "$work/s_server.out" >&2; exit 1; }
echo "server received: $(grep 'hello from the demo client' "$work/s_server.out")"

step "Audit events written by the node"
wc -l <"$dev_dir/nodes/1/audit.jsonl" | xargs echo "events:"
tail -n 2 "$dev_dir/nodes/1/audit.jsonl"

step "Stopping the dev node"
kill -TERM "$dev_pid"
wait "$dev_pid"
dev_pid=""
echo
echo "demo: OK. Two SVIDs signed by a SoftHSM-held key, verified by openssl, used for mutual TLS."
echo "demo: files are in $work"
