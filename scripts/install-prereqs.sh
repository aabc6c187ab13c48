#!/usr/bin/env bash
# Installs what building, testing and the demo need on a Debian-based machine: SoftHSM2, protoc,
# libclang (for RocksDB's bindings), OpenSSL, OpenSC's pkcs11-tool, nftables (for the network
# partition test), the ACME clients lego and Pebble's challenge test server, plus pkilint and
# certbot in a Python virtual environment under the build cache. For the SPIRE plugin check in
# scripts/go-host-check.sh it installs Go with the go-plugin, gRPC and protobuf sources and code
# generators. Safe to run repeatedly; it installs only what is missing.
set -euo pipefail

cache_dir="${SIGIL_CACHE_DIR:-$HOME/.cache/sigil}"
venv="$cache_dir/venv"

missing=()
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v openssl >/dev/null || missing+=(openssl)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || missing+=(nftables)
command -v cc >/dev/null || missing+=(build-essential)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v curl >/dev/null || missing+=(curl)
command -v lego >/dev/null || missing+=(lego)
command -v pebble-challtestsrv >/dev/null || missing+=(pebble)
# scripts/go-host-check.sh builds its Go host offline in GOPATH mode from these Debian sources.
# golang-google-grpc-dev accepts protobuf 1.3 or 1.5, but the generated code needs 1.5.
go_sources=/usr/share/gocode/src
command -v go >/dev/null || missing+=(golang-go)
command -v protoc-gen-go >/dev/null || missing+=(protoc-gen-go)
command -v protoc-gen-go-grpc >/dev/null || missing+=(protoc-gen-go-grpc)
[[ -d $go_sources/github.com/hashicorp/go-plugin ]] || missing+=(golang-github-hashicorp-go-plugin-dev)
[[ -d $go_sources/google.golang.org/grpc ]] || missing+=(golang-google-grpc-dev)
[[ -d $go_sources/google.golang.org/protobuf ]] || missing+=(golang-google-protobuf-dev)
dpkg -s golang-github-golang-protobuf-1-5-dev >/dev/null 2>&1 || missing+=(golang-github-golang-protobuf-1-5-dev)

if ((${#missing[@]})); then
    echo "install-prereqs: installing ${missing[*]}"
    sudo_cmd=()
    if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x "$venv/bin/lint_pkix_cert" ]]; then
    echo "install-prereqs: installing pkilint into $venv"
    mkdir -p "$cache_dir"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pkilint
fi

if [[ ! -x "$venv/bin/certbot" ]]; then
    echo "install-prereqs: installing certbot into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check certbot
fi
